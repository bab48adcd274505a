"""Processes of a distributed run for the tests: leaders and workers against the delay server on PostgreSQL.

:class:`Cluster` starts ``stageopt optimize`` leaders and ``stageopt worker`` processes (each
logging to a file), polls for conditions and stops everything at teardown; the ``cluster``
fixture (conftest.py) builds one per test on a fresh database.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from benchmarks.delay_server import DelayServer
from optuna.trial import FrozenTrial

from stageopt.distributed import LEDGER_TABLE_NAME
from stageopt.tasks import data_dir
from tests.distributed._postgres import REPO

#: Heartbeat seconds of every process the tests start (a stale job is retried after twice as long).
HEARTBEAT_S = 2

#: ``python -c`` program of a leader, or of any stageopt command: ``main(argv)``.
CLI = "import sys; from stageopt.cli._main import main; sys.exit(main(sys.argv[1:]))"

#: ``python -c`` program of a worker: import, wait for GO (a file, "" for none) and the job queue, run.
WORKER = """
import sys, time
from pathlib import Path
import optuna
import stageopt.cli._commands, stageopt.cli._worker  # the slow imports, before the queue exists
from stageopt.cli._main import main
from stageopt.distributed import open_storage
url, study, go, *flags = sys.argv[1:]
storage = open_storage(url, heartbeat_interval=None)
deadline = time.monotonic() + 120
while (go and not Path(go).exists()) or study + ".jobs" not in optuna.get_all_study_names(storage):
    if time.monotonic() > deadline:
        sys.exit("the job queue never appeared")
    time.sleep(0.1)
storage.engine.dispose()
sys.exit(main(["worker", "--storage", url, "--study", study, "-v", *flags]))
"""

#: Flags of every leader: the delay server's LM, small validation and bootstrap sets, no early stop.
RUN_FLAGS = (
    "--task",
    "hotpotqa",
    "--strategy",
    "random",
    "--lm",
    "openai/delay",
    "--no-cache",
    "--bootstrap-size",
    "3",
    "--option",
    "patience=null",
    "--confirm-size",
    "0",
)


@dataclass
class Proc:
    """A process a test started, with its log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def name(self) -> str:
        """``host:pid``, as the jobs it ran record it (``outcome["worker"]``)."""
        return f"{socket.gethostname()}:{self.pid}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 90) -> int:
        """The exit code; fails the test with the log's tail when it takes longer than ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            pytest.fail(f"process {self.pid} did not exit within {timeout} s:\n{tail(self.output())}")


@dataclass
class Cluster:
    """The processes, delay server and storage of one test; everything is stopped at teardown."""

    url: str
    tmp: Path
    server: DelayServer
    base: str
    storage: optuna.storages.RDBStorage
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, code: str, args: list[str], label: str) -> Proc:
        log = self.tmp / f"{label}-{len(self.procs)}.log"
        env = {
            **os.environ,
            "STAGEOPT_DATA_DIR": str(data_dir()),
            "STAGEOPT_HEARTBEAT_S": str(HEARTBEAT_S),
            "DSPY_CACHEDIR": str(self.tmp / "dspy_cache"),
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                [sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def leader(self, study: str, *flags: str, budget: int, val_size: int = 4, out: Path | None = None) -> Proc:
        """``stageopt optimize`` of study ``study`` on this cluster's storage, written to ``out``."""
        out = out or self.tmp / study
        args = [
            "optimize",
            *RUN_FLAGS,
            "--api-base",
            self.base,
            "--storage",
            self.url,
            "--study",
            study,
            "--budget-calls",
            str(budget),
            "--val-size",
            str(val_size),
            "--out",
            str(out),
            *flags,
        ]
        return self.spawn(CLI, args, f"leader-{study}")

    def worker(self, study: str, *flags: str, go: Path | None = None) -> Proc:
        """A ``stageopt worker`` for ``study`` that starts once its job queue exists (and ``go`` does)."""
        return self.spawn(WORKER, [self.url, study, str(go or ""), *flags], f"worker-{study}")

    def jobs(self, study: str) -> list[FrozenTrial]:
        """The trials of the study's job queue (empty before it exists)."""
        if study + ".jobs" not in optuna.get_all_study_names(self.storage):
            return []
        return optuna.load_study(study_name=study + ".jobs", storage=self.storage).get_trials(deepcopy=False)

    def main_trials(self, study: str) -> list[FrozenTrial]:
        return optuna.load_study(study_name=study, storage=self.storage).get_trials(deepcopy=False)

    def ledger_calls(self, study: str) -> int:
        """``lm_calls`` of the study's row of the shared budget ledger, read with plain SQL."""
        table = sa.table(LEDGER_TABLE_NAME, sa.column("key"), sa.column("lm_calls"))
        with self.storage.engine.connect() as conn:
            value = conn.execute(sa.select(table.c.lm_calls).where(table.c.key == study)).scalar_one()
        return int(value)

    def until(self, what: str, check: Callable[[], bool], *, timeout: float = 60, watch: Proc | None = None) -> None:
        """Poll ``check`` until it holds; fail after ``timeout`` s or when ``watch`` exits first."""
        deadline = time.monotonic() + timeout
        while not check():
            if watch is not None and watch.popen.poll() is not None:
                pytest.fail(f"{what}: process {watch.pid} exited ({watch.popen.returncode}):\n{tail(watch.output())}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.log.name}\n{tail(p.output(), 1500)}" for p in self.procs)
                pytest.fail(f"{what}: not within {timeout} s\n{logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)
        self.storage.engine.dispose()
        self.server.stop()


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]

"""A run and one ``stageopt worker`` process share a PostgreSQL study on the real embedded model.

The run (random search, 2 trials at a time) and a worker started once the study's job queue
exists both score HotpotQA jobs with Gemma 3 270M on llama.cpp; the shared budget holds. The
response cache is off (the worker takes the run's setting), so jobs take real time and a
worker that started polling gets some. Expect 1-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from stageopt.distributed import open_storage
from tests.distributed._postgres import REPO
from tests.distributed.conftest import pg_url, postgres_url  # noqa: F401 - the PostgreSQL fixtures

pytestmark = pytest.mark.integration

STAGEOPT = str(Path(sys.executable).parent / "stageopt")
BUDGET = 60


def test_run_and_worker_score_jobs_with_the_embedded_model(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    run = subprocess.Popen(
        [STAGEOPT, "optimize", "--task", "hotpotqa", "--strategy", "random", "--option", "patience=null",
         "--budget-calls", str(BUDGET), "--val-size", "2", "--bootstrap-size", "2", "--n-train", "10",
         "--confirm-size", "0",
         "--storage", pg_url, "--study", "real", "--parallel-trials", "2", "--no-cache", "--out", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    storage = open_storage(pg_url, heartbeat_interval=None)
    deadline = time.monotonic() + 600
    while "real.jobs" not in optuna.get_all_study_names(storage):
        assert run.poll() is None, run.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never created its job queue"
        time.sleep(0.5)
    worker = subprocess.Popen(
        [STAGEOPT, "worker", "--storage", pg_url, "--study", "real"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    run_out, _ = run.communicate(timeout=900)
    worker_out, _ = worker.communicate(timeout=120)
    assert run.returncode == 0, run_out[-3000:]
    assert worker.returncode == 0, worker_out[-3000:]
    assert "stopped: the run is over" in worker_out

    result = json.loads((run_dir / "result.json").read_text())
    assert result["usage"]["lm_calls"] <= BUDGET
    note = result["notes"]["distributed"]
    by_process = note["jobs_by_process"]
    assert len(by_process) == 2, by_process  # the run and the worker each scored jobs
    assert sum(by_process.values()) == note["jobs"]["complete"]
    scored = [r for r in result["history"] if not r["repeated"]]
    assert len(scored) == note["jobs"]["complete"]  # one job per newly scored trial, none lost

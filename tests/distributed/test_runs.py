"""One live run per shared study: the run lease in ``NAME.runs`` on a real PostgreSQL server.

Most tests run the optimizer in this process on a fresh database (``pg_url``) with the scripted
LM of the toy two-stage program: on a shared storage the run scores its own jobs, so no worker
is needed. The last two start real ``stageopt optimize`` processes against the delay server,
as ``test_workers.py`` does (same helpers).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from stageopt import ConfigurationError, RunInProgressError
from stageopt.distributed import RUNS_SUFFIX, RunLease, load_study, open_storage
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import RandomSearch
from stageopt.strategies._state import RunState
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm
from tests.distributed._cluster import HEARTBEAT_S, Cluster, Proc
from tests.distributed._postgres import REPO

#: ``python -c`` program that takes the lease of a study, says so, and holds it until killed.
HOLDER = """
import sys, time
from stageopt.distributed import RunLease
lease = RunLease.open(sys.argv[1], sys.argv[2], strategy="holder", heartbeat_s=int(sys.argv[3]))
print("held", lease.number, flush=True)
time.sleep(600)
"""


def _leases(url: str, study: str) -> list[FrozenTrial]:
    """The trials of ``study``'s lease study, oldest first (empty before it exists)."""
    storage = open_storage(url, heartbeat_interval=None)
    try:
        if study + RUNS_SUFFIX not in optuna.get_all_study_names(storage):
            return []
        return optuna.load_study(study_name=study + RUNS_SUFFIX, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _optimizer(url: str, study: str, **kwargs: Any) -> RandomSearch:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 4,
        "val_size": 3,
        "storage": url,
        "study_name": study,
        "n_trials": 2,
    }
    settings.update(kwargs)
    return RandomSearch(capital_metric, budget=400, **settings)


def _calls(optimizer: RandomSearch) -> int:
    lm = optimizer.lm
    assert isinstance(lm, dspy.LM)
    return int(lm.engine.calls)


@pytest.fixture
def holder(pg_url: str) -> Iterator[RunLease]:
    """A live run of study ``busy``, simulated: its lease, held (and beating) by this process."""
    lease = RunLease.open(pg_url, "busy", strategy="joint", heartbeat_s=1)
    yield lease
    lease.release()


# ---- the storage of the leases -------------------------------------------------------------------


def test_a_storage_without_retry_only_fails_stale_trials(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=1, max_retry=0)
    try:
        assert storage.get_heartbeat_stale_trial_callback() is None
        study = optuna.create_study(storage=storage, study_name="plain")
        with warnings.catch_warnings():  # heartbeats outside Study.optimize are "experimental"
            warnings.simplefilter("ignore")
            trial = study.ask()
            storage.record_heartbeat(trial._trial_id)
            time.sleep(2.3)  # silent for longer than the grace period (twice the heartbeat)
            optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.get_trials()] == [TrialState.FAIL]  # failed, not enqueued again
        with pytest.raises(ConfigurationError, match="without a stale-trial retry callback"):
            RunLease(open_storage(pg_url, heartbeat_interval=1), "s")
        with pytest.raises(ConfigurationError, match="needs a storage with heartbeats"):
            RunLease(open_storage(pg_url, heartbeat_interval=None), "s")
        with pytest.raises(ConfigurationError, match=r"`max_retry` must be an integer >= 0 or None, got max_retry=-1"):
            open_storage(pg_url, max_retry=-1)
    finally:
        storage.engine.dispose()


def test_load_study_lists_a_runs_helper_studies_under_its_name(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=None)
    try:
        for name in ("run", "run.jobs", "run.runs", "other.runs"):
            optuna.create_study(storage=storage, study_name=name)
        with pytest.raises(ConfigurationError) as info:
            load_study(storage, "absent")
        assert "(studies there: 'other.runs', 'run')" in str(info.value)  # a lone helper study stays listed
    finally:
        storage.engine.dispose()


# ---- (1) a second run is refused ---------------------------------------------------------------


def test_a_second_run_on_a_live_study_is_refused_before_it_spends(pg_url: str, holder: RunLease) -> None:
    for attempt in range(2):
        optimizer = _optimizer(pg_url, "busy")
        with pytest.raises(RunInProgressError) as info:
            optimizer.compile(CapitalOfCity(), trainset=city_examples())
        message = str(info.value)
        assert "study 'busy' is already being optimized by another run" in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "strategy joint, started 20" in message
        assert f"`stageopt worker --storage {pg_url} --study busy`" in message
        assert "wait for it to finish, or choose another --study" in message
        assert info.value.holder["pid"] == os.getpid()
        assert _calls(optimizer) == 0  # nothing proposed, nothing scored
        if attempt == 0:
            time.sleep(2.5)  # longer than the holder's grace period: its heartbeats keep it live
    storage = open_storage(pg_url, heartbeat_interval=None)
    study = optuna.load_study(study_name="busy", storage=storage)
    assert "space" not in study.user_attrs
    assert study.trials == []
    assert "busy.jobs" not in optuna.get_all_study_names(storage)
    storage.engine.dispose()
    leases = _leases(pg_url, "busy")
    assert [t.state for t in leases] == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs.get("outcome") for t in leases[1:]] == ["refused", "refused"]
    assert leases[1].user_attrs["strategy"] == "random"


# ---- (2) and (5): completed and failed runs ------------------------------------------------------


def test_a_run_after_a_completed_run_proceeds_and_resumes_it(pg_url: str) -> None:
    first = _optimizer(pg_url, "twice")
    first.compile(CapitalOfCity(), trainset=city_examples())
    assert first.result is not None
    (lease,) = _leases(pg_url, "twice")
    assert lease.state == TrialState.COMPLETE
    assert lease.value is not None
    assert lease.value > 0  # the seconds the run held it
    assert lease.user_attrs["outcome"] == "completed"
    assert lease.user_attrs["pid"] == os.getpid()
    assert lease.user_attrs["host"] == socket.gethostname()
    assert lease.user_attrs["strategy"] == "random"
    assert lease.user_attrs["started"] <= lease.user_attrs["ended"]

    second = _optimizer(pg_url, "twice", n_trials=4)
    second.compile(CapitalOfCity(), trainset=city_examples())
    assert second.result is not None
    assert second.result.history[: len(first.result.history)] == first.result.history  # resumed, not redone
    assert len(second.result.history) > len(first.result.history)
    assert [t.state for t in _leases(pg_url, "twice")] == [TrialState.COMPLETE, TrialState.COMPLETE]


class _Broken(RandomSearch):
    def _search(self, state: RunState) -> tuple[str, str | None]:
        raise RuntimeError("the search broke")


def test_the_lease_fails_when_compile_raises_and_blocks_nothing(pg_url: str) -> None:
    broken = _Broken(
        capital_metric,
        budget=400,
        lm=scripted_lm(demo_sensitive_answer),
        adapter=SmallLMAdapter(),
        bootstrap_size=4,
        val_size=3,
        storage=pg_url,
        study_name="broken",
    )
    with pytest.raises(RuntimeError, match="the search broke"):
        broken.compile(CapitalOfCity(), trainset=city_examples())
    (lease,) = _leases(pg_url, "broken")
    assert lease.state == TrialState.FAIL
    assert lease.user_attrs["outcome"] == "failed"

    fixed = _optimizer(pg_url, "broken")
    fixed.compile(CapitalOfCity(), trainset=city_examples())  # not refused: the failed run holds nothing
    assert fixed.result is not None
    assert fixed.result.status == "completed"
    assert [t.state for t in _leases(pg_url, "broken")] == [TrialState.FAIL, TrialState.COMPLETE]


def test_sqlite_runs_take_no_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    optimizer = _optimizer(url, "local")
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    assert optuna.get_all_study_names(url) == ["local"]


# ---- (4) two runs starting together --------------------------------------------------------------


def _race(url: str, study: str, n: int) -> tuple[list[RunLease], list[RunInProgressError]]:
    """``n`` threads, each with its own connection, acquire the lease of ``study`` at the same moment."""
    gate = threading.Barrier(n)
    lock = threading.Lock()
    won: list[RunLease] = []
    refused: list[RunInProgressError] = []

    def start() -> None:
        storage = open_storage(url, pool_size=1, heartbeat_interval=1, max_retry=0)
        lease = RunLease(storage, study)
        gate.wait(30)
        try:
            lease.acquire(strategy="joint")
        except RunInProgressError as exc:
            with lock:
                refused.append(exc)
            storage.engine.dispose()
            return
        with lock:
            won.append(lease)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return won, refused


def test_of_leases_asked_together_exactly_one_is_taken(pg_url: str) -> None:
    n = 4
    open_storage(pg_url, heartbeat_interval=None).engine.dispose()  # Optuna's tables, as the run's study makes them
    for round_ in range(3):
        won, refused = _race(pg_url, "race", n)
        assert len(won) == 1, (round_, len(won), [str(e) for e in refused])
        assert len(refused) == n - 1
        winner = won[0]
        leases = _leases(pg_url, "race")[-n:]
        assert [t.number for t in leases if t.state == TrialState.RUNNING] == [winner.number]
        assert winner.number == min(t.number for t in leases)  # the oldest wins
        winner.release()
        winner.storage.engine.dispose()
    assert [t.state for t in _leases(pg_url, "race")].count(TrialState.COMPLETE) == 3


# ---- (3) a killed run ----------------------------------------------------------------------------


def test_a_killed_runs_lease_refuses_until_it_is_stale(pg_url: str, tmp_path: Path) -> None:
    beat = 2  # grace period 4 s
    log = tmp_path / "holder.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, pg_url, "dead", str(beat)], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "held" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(beat + 0.5)  # a heartbeat or two from its thread
    finally:
        proc.kill()
    assert proc.wait(10) == -signal.SIGKILL

    with pytest.raises(RunInProgressError) as info:
        RunLease.open(pg_url, "dead", strategy="random", heartbeat_s=beat)
    message = str(info.value)
    assert f"the previous run of study 'dead' (pid {proc.pid} on host {socket.gethostname()}" in message
    assert "has exited without ending its run lease" in message
    assert "the lease is still fresh: retry in" in message
    wait = info.value.retry_after_s
    assert wait is not None
    assert 0 < wait <= 2 * beat
    assert f"retry in {wait:.0f} s" in message

    time.sleep(wait + 1.0)
    lease = RunLease.open(pg_url, "dead", strategy="random", heartbeat_s=beat)
    lease.release()
    killed, refused, taken = _leases(pg_url, "dead")
    assert killed.state == TrialState.FAIL  # failed as stale by the later run
    assert "outcome" not in killed.user_attrs
    assert killed.user_attrs["pid"] == proc.pid
    assert (refused.state, refused.user_attrs["outcome"]) == (TrialState.FAIL, "refused")
    assert (taken.state, taken.user_attrs["outcome"]) == (TrialState.COMPLETE, "completed")


def test_a_lease_killed_before_its_first_heartbeat_expires_by_its_age(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=1, max_retry=0)
    lease = RunLease(storage, "mute")
    attrs = {"host": "elsewhere", "pid": 1, "started": "2020-01-01T00:00:00+00:00", "strategy": "joint"}
    template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs)
    storage.create_new_trial(lease.study_id, template_trial=template)  # and never a heartbeat
    recent = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={**attrs, "started": _now()})
    storage.create_new_trial(lease.study_id, template_trial=recent)  # its first heartbeat is still to come
    with pytest.raises(RunInProgressError, match="no heartbeat yet") as info:
        lease.acquire(strategy="random")
    assert info.value.holder["started"] == recent.user_attrs["started"]
    assert [t.state for t in _leases(pg_url, "mute")] == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]
    storage.engine.dispose()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---- the CLI ------------------------------------------------------------------------------------


def _one_line_error(proc: Proc) -> str:
    assert proc.wait(90) == 2, proc.output()
    lines = proc.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("stageopt: error: ")
    return lines[0]


def test_the_cli_refuses_a_second_run_in_one_line(cluster: Cluster, holder: RunLease) -> None:
    error = _one_line_error(cluster.leader("busy", budget=100))
    assert "study 'busy' is already being optimized by another run" in error
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in error
    assert f"Start `stageopt worker --storage {cluster.url} --study busy` to help it" in error
    assert cluster.server.stats()["requests"] == 0
    assert not (cluster.tmp / "busy" / "result.json").exists()


def test_a_killed_run_resumes_once_its_lease_is_stale(cluster: Cluster) -> None:
    flags = ("--option", "n_trials=6")
    first = cluster.leader("killed", *flags, budget=400, val_size=2)
    cluster.until("the job queue", lambda: bool(cluster.jobs("killed")), watch=first)
    cluster.server.delay = 0.3
    cluster.until(
        "two finished trials",
        lambda: sum(t.state == TrialState.COMPLETE for t in cluster.main_trials("killed")) >= 2,
        watch=first,
    )
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL

    # Restarted within the grace period: refused, with the seconds left (as `--resume` now would be).
    with pytest.raises(RunInProgressError, match=r"still fresh: retry in \d+ s") as info:
        RunLease.open(cluster.url, "killed", strategy="random", heartbeat_s=HEARTBEAT_S)
    assert info.value.holder["pid"] == first.pid
    assert info.value.retry_after_s is not None
    time.sleep(info.value.retry_after_s + 1.0)

    second = cluster.leader("killed", *flags, "--resume", budget=400, val_size=2)
    assert second.wait() == 0, second.output()
    result = (cluster.tmp / "killed" / "result.json").read_text()
    assert '"status": "completed"' in result
    states = [(t.state, t.user_attrs.get("pid"), t.user_attrs.get("outcome")) for t in _leases(cluster.url, "killed")]
    assert states == [
        (TrialState.FAIL, first.pid, None),  # the killed run's lease, failed as stale
        (TrialState.FAIL, os.getpid(), "refused"),
        (TrialState.COMPLETE, second.pid, "completed"),
    ]

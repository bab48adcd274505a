"""Several ``stageopt worker`` processes sharing one run on a real PostgreSQL server.

Every test starts a leader (``stageopt optimize --storage postgresql://... --study NAME``) and
worker processes against a fresh database (``pg_url``); the LM is the OpenAI-compatible delay
server of ``benchmarks/delay_server.py``, run in this process so that its request counts (and
its delay) are at hand. Workers are started before the study exists, import everything, then
wait until the run's job queue appears (or until the test says go), so they join within a poll.
Heartbeats are shortened through ``STAGEOPT_HEARTBEAT_S`` so that a killed process's job is
retried within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from benchmarks.delay_server import start_in_thread
from optuna.trial import FrozenTrial, TrialState

from tests.distributed._cluster import CLI, HEARTBEAT_S, RUN_FLAGS, Cluster


def _result(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "result.json").read_text()))


def _outcomes(jobs: list[FrozenTrial]) -> list[dict[str, Any]]:
    """Outcomes of the jobs that completed (scored)."""
    return [dict(t.user_attrs["outcome"]) for t in jobs if t.state == TrialState.COMPLETE]


def _completed_keys(jobs: list[FrozenTrial]) -> Counter[str]:
    return Counter(t.user_attrs["job"]["key"] for t in jobs if t.state == TrialState.COMPLETE)


def _recorded(trials: list[FrozenTrial]) -> list[int]:
    """Numbers of the main study's finished trials (the ones a result's history lists)."""
    return sorted(t.number for t in trials if t.state == TrialState.COMPLETE and "phase" in t.user_attrs)


def _running(jobs: list[FrozenTrial]) -> int:
    return sum(t.state == TrialState.RUNNING for t in jobs)


def _keys(data: Any) -> dict[str, Any]:
    """The key structure of a result (top level, ``usage``, ``best`` and a history entry)."""
    return {
        "top": sorted(data),
        "usage": sorted(data["usage"]),
        "best": sorted(data["best"]),
        "baseline": sorted(data["baseline"]),
        "history": sorted(data["history"][0]),
    }


# ---- a run with workers --------------------------------------------------------------------------


def test_workers_share_a_run_and_its_budget(cluster: Cluster) -> None:
    budget = 160
    reference_server, reference_base = start_in_thread(delay=0.0)
    try:
        sqlite_out = cluster.tmp / "sqlite"
        reference = cluster.spawn(
            CLI,
            [
                "optimize",
                *RUN_FLAGS,
                "--api-base",
                reference_base,
                "--budget-calls",
                "40",
                "--val-size",
                "2",
                "--out",
                str(sqlite_out),
            ],
            "reference",
        )
        cluster.server.delay = 0.15
        leader = cluster.leader("run", "--parallel-trials", "3", budget=budget)
        workers = [cluster.worker("run") for _ in range(2)]
        assert leader.wait() == 0, leader.output()
        assert [w.wait(30) for w in workers] == [0, 0], [w.output() for w in workers]
        assert reference.wait() == 0, reference.output()
    finally:
        reference_server.stop()

    result = _result(cluster.tmp / "run")
    assert _keys(result) == _keys(_result(sqlite_out))  # the same result format as a one-process run
    assert result["status"] == "budget_exhausted"
    jobs = cluster.jobs("run")
    outcomes = _outcomes(jobs)
    by = Counter(o["worker"] for o in outcomes)
    assert len(by) >= 2, by  # the jobs were scored by several processes
    assert set(by) <= {p.name for p in (leader, *workers)}
    assert max(_completed_keys(jobs).values()) == 1  # nothing scored twice
    assert all(t.state == TrialState.COMPLETE for t in jobs)

    history = [h["trial"] for h in result["history"]]
    assert history == _recorded(cluster.main_trials("run"))  # every finished trial is in the history
    assert len(history) >= 6
    calls = result["usage"]["lm_calls"]
    assert calls <= budget
    assert calls == cluster.server.stats()["requests"]  # no cache: every logical call reached the server
    assert cluster.ledger_calls("run") == calls
    assert sum(o["lm_calls"] for o in outcomes) < calls  # the proposals were paid from the same budget


def test_workers_never_spend_more_than_the_shared_budget(cluster: Cluster) -> None:
    budget, val_size = 80, 2
    cluster.server.delay = 0.1
    leader = cluster.leader("tight", "--parallel-trials", "4", budget=budget, val_size=val_size)
    workers = [cluster.worker("tight") for _ in range(3)]
    assert leader.wait() == 0, leader.output()
    assert [w.wait(30) for w in workers] == [0, 0, 0]

    result = _result(cluster.tmp / "tight")
    seen = cluster.server.stats()
    assert result["status"] == "budget_exhausted"
    assert seen["requests"] <= budget
    # Every process charged the one ledger: the run's usage counts the workers' calls too.
    assert seen["requests"] == result["usage"]["lm_calls"] == cluster.ledger_calls("tight")
    outcomes = _outcomes(cluster.jobs("tight"))
    per_job = {o["lm_calls"] for o in outcomes}
    assert len(per_job) == 1  # hotpotqa: three calls per example, whatever the configuration
    assert budget - seen["requests"] < per_job.pop()  # it stopped only when no further job fitted
    assert len({o["worker"] for o in outcomes}) >= 2
    assert seen["max_concurrency"] >= 2


# ---- processes that die --------------------------------------------------------------------------


def test_a_killed_worker_loses_no_finished_trial(cluster: Cluster) -> None:
    leader = cluster.leader("kill", "--parallel-trials", "3", "--option", "n_trials=3", budget=400, val_size=2)
    doomed, survivor = cluster.worker("kill"), cluster.worker("kill")
    cluster.until("the job queue", lambda: bool(cluster.jobs("kill")), watch=leader)
    cluster.server.delay = 0.5  # a job now takes seconds: long enough to be killed in the middle
    # Three running jobs: the leader runs one at a time, so each worker runs one.
    cluster.until("three jobs running", lambda: _running(cluster.jobs("kill")) == 3, watch=leader)
    finished = _recorded(cluster.main_trials("kill"))
    os.kill(doomed.pid, signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    assert leader.wait() == 0, leader.output()
    assert survivor.wait(30) == 0

    jobs = cluster.jobs("kill")
    stale = [t for t in jobs if t.state == TrialState.FAIL]
    assert len(stale) == 1, [(t.number, t.state, t.user_attrs) for t in jobs]
    assert "outcome" not in stale[0].user_attrs  # failed as stale, not by its evaluation
    retries = [t for t in jobs if t.system_attrs.get("failed_trial") == stale[0].number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert retries[0].user_attrs["job"]["id"] == stale[0].user_attrs["job"]["id"]
    assert retries[0].user_attrs["outcome"]["worker"] != doomed.name
    assert all(t.state == TrialState.COMPLETE for t in jobs if t is not stale[0])
    assert max(_completed_keys(jobs).values()) == 1  # every configuration was scored once

    result = _result(cluster.tmp / "kill")
    history = [h["trial"] for h in result["history"]]
    assert history == _recorded(cluster.main_trials("kill"))
    assert set(finished) <= set(history)
    assert [h["phase"] for h in result["history"]] == ["baseline", "random", "random", "random"]
    assert result["status"] == "completed"
    assert result["usage"]["lm_calls"] == cluster.ledger_calls("kill") <= 400


def test_a_restarted_worker_takes_further_jobs(cluster: Cluster) -> None:
    go = cluster.tmp / "go"
    leader = cluster.leader("restart", "--parallel-trials", "2", "--option", "n_trials=8", budget=400, val_size=2)
    first = cluster.worker("restart", "--max-jobs", "1")
    second = cluster.worker("restart", go=go)  # the same worker started again, once the first is gone
    cluster.until("the job queue", lambda: bool(cluster.jobs("restart")), watch=leader)
    cluster.server.delay = 0.3
    assert first.wait(60) == 0, first.output()
    assert "1 jobs (0 failed)" in first.output()
    assert "stopped: 1 jobs done" in first.output()
    go.touch()
    assert leader.wait() == 0, leader.output()
    assert second.wait(30) == 0, second.output()
    assert "stopped: the run is over" in second.output()

    by = Counter(o["worker"] for o in _outcomes(cluster.jobs("restart")))
    assert by[first.name] == 1
    assert by[second.name] >= 1
    assert sum(by.values()) == 9  # the baseline and 8 trials, each scored once
    assert len(_result(cluster.tmp / "restart")["history"]) == 9


def test_a_killed_run_resumes_without_redoing_trials(cluster: Cluster) -> None:
    budget = 130
    flags = ("--parallel-trials", "2")
    first = cluster.leader("resume", *flags, budget=budget, val_size=2)
    worker = cluster.worker("resume")
    cluster.until("the job queue", lambda: bool(cluster.jobs("resume")), watch=first)
    cluster.server.delay = 0.3
    cluster.until("three finished trials", lambda: len(_recorded(cluster.main_trials("resume"))) >= 3, watch=first)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    finished = set(_recorded(trials := cluster.main_trials("resume")))
    before = {t.number: t.user_attrs["params"] for t in trials if t.number in finished}
    time.sleep(2 * HEARTBEAT_S + 0.5)  # the killed run's lease goes stale; a resume sooner is refused (test_runs.py)

    second = cluster.leader("resume", *flags, "--resume", budget=budget, val_size=2)
    assert second.wait() == 0, second.output()
    assert worker.wait(30) == 0, worker.output()

    result = _result(cluster.tmp / "resume")
    history = {h["trial"]: h["params"] for h in result["history"]}
    assert {n: history.get(n) for n in before} == before  # the finished trials are kept as they were
    assert sorted(history) == _recorded(cluster.main_trials("resume"))
    assert len(history) > len(before)
    jobs = cluster.jobs("resume")
    assert max(_completed_keys(jobs).values()) == 1  # no configuration was scored twice
    calls = result["usage"]["lm_calls"]
    assert cluster.server.stats()["requests"] <= cluster.ledger_calls("resume") == calls <= budget


# ---- what stays the same -------------------------------------------------------------------------


def test_workers_do_not_change_the_search(cluster: Cluster) -> None:
    flags = ("--parallel-trials", "2", "--option", "n_trials=6")
    alone = cluster.leader("alone", *flags, budget=400, val_size=2)
    shared = cluster.leader("shared", *flags, budget=400, val_size=2)
    workers = [cluster.worker("shared") for _ in range(2)]
    cluster.until("the job queues", lambda: bool(cluster.jobs("alone")) and bool(cluster.jobs("shared")))
    cluster.server.delay = 0.2
    assert alone.wait() == 0, alone.output()
    assert shared.wait() == 0, shared.output()
    assert [w.wait(30) for w in workers] == [0, 0]

    def trials(study: str) -> list[tuple[Any, ...]]:
        history = _result(cluster.tmp / study)["history"]
        return [(h["trial"], h["phase"], h["params"], h["score"], h["lm_calls"]) for h in history]

    assert len(trials("alone")) == 7
    assert trials("shared") == trials("alone")
    assert {o["worker"] for o in _outcomes(cluster.jobs("alone"))} == {alone.name}
    assert len({o["worker"] for o in _outcomes(cluster.jobs("shared"))}) >= 2


# ---- errors --------------------------------------------------------------------------------------


def test_clear_errors(cluster: Cluster) -> None:
    optuna.create_study(storage=cluster.storage, study_name="present")
    unreachable = "postgresql://postgres:hunter2@127.0.0.1:1/x"
    runs = {
        "sqlite": cluster.spawn(CLI, ["worker", "--storage", f"sqlite:///{cluster.tmp / 'x.db'}", "--study", "s"], "e"),
        "unreachable": cluster.spawn(CLI, ["worker", "--storage", unreachable, "--study", "s"], "e"),
        "wrong study": cluster.spawn(CLI, ["worker", "--storage", cluster.url, "--study", "absent"], "e"),
        "no storage": cluster.spawn(
            CLI,
            [
                "optimize",
                *RUN_FLAGS,
                "--api-base",
                cluster.base,
                "--budget-calls",
                "50",
                "--parallel-trials",
                "2",
                "--out",
                str(cluster.tmp / "none"),
            ],
            "e",
        ),
    }
    errors = {}
    for what, proc in runs.items():
        assert proc.wait(60) == 2, (what, proc.output())
        lines = proc.output().strip().splitlines()
        assert len(lines) == 1, (what, lines)  # one line: the error, nothing else
        assert lines[0].startswith("stageopt: error: "), (what, lines)
        errors[what] = lines[0]
    assert "storage 'sqlite:///" in errors["sqlite"]
    assert "--storage postgresql://" in errors["sqlite"]  # it says what to pass instead
    assert "hunter2" not in errors["unreachable"]
    assert "postgres:***@127.0.0.1:1/x" in errors["unreachable"]
    assert "scripts/postgres.sh start" in errors["unreachable"]
    assert "no study named 'absent'" in errors["wrong study"]
    assert "(studies there: 'present')" in errors["wrong study"]
    assert "parallel_trials=2 needs a study storage that several processes share" in errors["no storage"]
    assert "got no storage" in errors["no storage"]
    assert not (cluster.tmp / "none" / "result.json").exists()

"""The job queue and the run's side of it, in one process on a SQLite file (fast, no server).

SQLite is refused for several processes, but within one process it holds the same Optuna
trials and state changes as PostgreSQL, which is all the queue relies on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest
from optuna.trial import TrialState

from stageopt import EvaluationError
from stageopt.distributed import DistributedExecutor, Job, JobQueue, open_storage
from stageopt.distributed._worker import worker_name
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import RandomSearch, config_key
from stageopt.strategies._space import Config, SearchSpace
from stageopt.strategies._state import RunState, ScoredConfig, StopSearch
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[optuna.storages.RDBStorage]:
    opened = open_storage(f"sqlite:///{tmp_path / 'queue.db'}", heartbeat_interval=None)
    yield opened
    opened.engine.dispose()


def _jobs(queue: JobQueue, n: int) -> list[Job]:
    jobs = [Job.new(f"config{i}@4", {"stage": {"instruction": i, "demos": 0}}, 4) for i in range(n)]
    queue.submit(jobs)
    return jobs


def _ok(score: float) -> dict[str, Any]:
    return {"status": "ok", "score": score, "stage_metrics": {}, "measures": {}, "lm_calls": 8, "n": 4}


# ---- the queue -----------------------------------------------------------------------------------


def test_a_job_round_trips_through_its_dict() -> None:
    job = Job.new("k@3", {"a": {"instruction": 2, "demos": 1}}, 3)
    assert Job.from_dict(job.to_dict()) == job
    assert Job.new("k@3", {}, 3).id != job.id


def test_each_job_is_claimed_by_exactly_one_claimant(storage: optuna.storages.RDBStorage, tmp_path: Path) -> None:
    run = JobQueue(storage, "study")
    jobs = _jobs(run, 3)
    # A second process: its own storage object on the same database, joining an existing queue.
    other_storage = open_storage(f"sqlite:///{tmp_path / 'queue.db'}", heartbeat_interval=None)
    other = JobQueue(other_storage, "study", create=False)
    claims = [run.claim(), other.claim(), other.claim()]
    assert [c.job if c is not None else None for c in claims] == jobs  # oldest first, each once
    assert run.claim() is None
    assert other.claim() is None
    # A claimed job cannot be claimed again: the WAITING -> RUNNING change fails for it.
    assert claims[0] is not None
    assert not storage.set_trial_state_values(claims[0].trial_id, state=TrialState.RUNNING)
    other_storage.engine.dispose()


def test_a_worker_cannot_join_a_study_without_a_queue(storage: optuna.storages.RDBStorage) -> None:
    with pytest.raises(KeyError):
        JobQueue(storage, "missing", create=False)


def test_outcomes_report_ended_jobs_only(storage: optuna.storages.RDBStorage) -> None:
    queue = JobQueue(storage, "study")
    scored, out_of_budget, broken, waiting = _jobs(queue, 4)
    claims = {c.job.id: c for c in (queue.claim(), queue.claim(), queue.claim()) if c is not None}
    queue.complete(claims[scored.id], _ok(0.5))
    queue.complete(claims[out_of_budget.id], {"status": "budget", "error": "lm_calls limit 8 reached"})
    queue.complete(claims[broken.id], {"status": "error", "error": "EvaluationError: boom"})

    ids = [j.id for j in (scored, out_of_budget, broken, waiting)] + ["unknown"]
    ended = queue.outcomes(ids)
    assert set(ended) == {scored.id, out_of_budget.id, broken.id}
    assert ended[scored.id]["score"] == 0.5
    assert ended[out_of_budget.id]["status"] == "budget"
    assert ended[broken.id]["error"] == "EvaluationError: boom"
    states = {t.user_attrs["job"]["id"]: t.state for t in queue.study.get_trials()}
    assert states == {
        scored.id: TrialState.COMPLETE,
        out_of_budget.id: TrialState.FAIL,
        broken.id: TrialState.FAIL,
        waiting.id: TrialState.WAITING,
    }
    assert queue.outcomes([scored.id]) == {scored.id: ended[scored.id]}


def test_a_dead_job_without_a_retry_ends_as_an_error(storage: optuna.storages.RDBStorage) -> None:
    queue = JobQueue(storage, "study")
    (job,) = _jobs(queue, 1)
    claimed = queue.claim()
    assert claimed is not None
    assert queue.outcomes([job.id]) == {}  # running: not ended
    storage.set_trial_state_values(claimed.trial_id, state=TrialState.FAIL)  # failed as stale, no retry left
    outcome = queue.outcomes([job.id])[job.id]
    assert outcome["status"] == "error"
    assert "retry limit" in outcome["error"]


def test_a_dead_job_waits_for_its_retry_to_be_enqueued(tmp_path: Path) -> None:
    # Optuna fails every stale trial first and enqueues the retries after: a reader in between
    # sees a dead copy and no retry. With retries on, that is not yet the retry limit.
    storage = open_storage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, max_retry=1)
    queue = JobQueue(storage, "study", retry_wait_s=0.5)
    late, lost = _jobs(queue, 2)
    for _ in range(2):
        claimed = queue.claim()
        assert claimed is not None
        storage.set_trial_state_values(claimed.trial_id, state=TrialState.FAIL)  # failed as stale ...
    assert queue.outcomes([late.id, lost.id]) == {}  # ... its retry may be on its way
    queue.submit([late])  # the retry of one arrives
    time.sleep(0.6)
    ended = queue.outcomes([late.id, lost.id])
    assert list(ended) == [lost.id]  # the other never came: the retry limit, after the wait
    assert "retry limit" in ended[lost.id]["error"]
    storage.engine.dispose()


def test_a_stale_job_is_retried_under_the_same_id(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1, max_retry=1)
    queue = JobQueue(storage, "study")
    (job,) = _jobs(queue, 1)
    claimed = queue.claim()  # and never beats again: its worker "died"
    assert claimed is not None
    time.sleep(3.2)  # past the grace period of twice the heartbeat (SQLite counts whole seconds)
    retry = queue.claim()  # fails the stale job, then claims its retry
    assert retry is not None
    assert retry.job == job
    assert retry.trial_id != claimed.trial_id
    assert queue.outcomes([job.id]) == {}  # the retry is running: the job has not ended
    queue.complete(retry, _ok(1.0))
    assert queue.outcomes([job.id])[job.id]["score"] == 1.0
    failed = storage.get_trial(claimed.trial_id)
    assert failed.state == TrialState.FAIL
    assert storage.get_trial(retry.trial_id).system_attrs["failed_trial"] == failed.number
    storage.engine.dispose()


def test_completed_and_alive_find_jobs_by_key(storage: optuna.storages.RDBStorage) -> None:
    queue = JobQueue(storage, "study")
    scored, out_of_budget, running, waiting = _jobs(queue, 4)
    claims = [queue.claim() for _ in range(3)]
    assert all(c is not None for c in claims)
    queue.complete(claims[0], _ok(0.25))  # type: ignore[arg-type]
    queue.complete(claims[1], {"status": "budget", "error": "out"})  # type: ignore[arg-type]
    assert queue.completed(scored.key) == _ok(0.25)
    assert queue.completed(out_of_budget.key) is None  # only scored jobs are reused
    assert queue.completed("never@4") is None
    assert queue.alive(running.key) == running
    assert queue.alive(waiting.key) == waiting
    assert queue.alive(scored.key) is None
    assert queue.alive(out_of_budget.key) is None


def test_the_spec_and_the_end_of_the_run(storage: optuna.storages.RDBStorage) -> None:
    queue = JobQueue(storage, "study")
    joined = JobQueue(storage, "study", create=False)
    assert joined.spec() is None
    queue.set_spec({"schema_version": 1, "valset": []})
    assert joined.spec() == {"schema_version": 1, "valset": []}
    assert not joined.finished()
    queue.finish()
    assert joined.finished()
    queue.set_spec({"schema_version": 1, "valset": []})  # a resumed run starts again
    assert not joined.finished()


# ---- the run's side: DistributedExecutor ----------------------------------------------------------


def _state(storage: optuna.storages.RDBStorage, lm: dspy.LM, *, budget: int = 10_000, **kwargs: Any) -> RunState:
    """A run of the toy two-stage program whose evaluations go through the queue of study ``toy``.

    Stage ``locate`` is right only with its demo set 1; ``capital`` has three instructions that
    change nothing but the configuration.
    """
    optimizer = RandomSearch(capital_metric, budget=budget, lm=lm, adapter=SmallLMAdapter(), **kwargs)
    program = CapitalOfCity()
    space = SearchSpace.initial(program)
    space.stages["locate"].demo_sets.append([{"city": "Lyon", "country": "France"}])
    space.stages["capital"].instructions += ["Name the capital city.", "Which city is the capital?"]
    ledger = BudgetLedger(Budget(lm_calls=budget))
    study = optuna.create_study(storage=storage, study_name="toy", load_if_exists=True)
    state = RunState(optimizer, program, space, study, ledger, city_examples()[1:5], MeteredLM(lm, ledger))
    state.executor = DistributedExecutor(JobQueue(storage, "toy"), poll_s=0.01)
    return state


def _config(locate_demos: int, capital_instruction: int = 0) -> Config:
    return {
        "locate": {"instruction": 0, "demos": locate_demos},
        "capital": {"instruction": capital_instruction, "demos": 0},
    }


def _key(config: Config) -> str:
    return f"{config_key(config)}@4"


def _calls(lm: dspy.LM) -> int:
    return int(lm.engine.calls)


def _queue(state: RunState) -> JobQueue:
    queue = state.executor.queue
    assert isinstance(queue, JobQueue)
    return queue


def _queued(state: RunState) -> list[str]:
    """Score keys of the queue's jobs, in the order they were enqueued."""
    return [t.user_attrs["job"]["key"] for t in _queue(state).study.get_trials()]


def _scored(outcomes: list[ScoredConfig | StopSearch]) -> list[ScoredConfig]:
    assert all(isinstance(o, ScoredConfig) for o in outcomes), outcomes
    return [o for o in outcomes if isinstance(o, ScoredConfig)]


def test_results_come_back_in_order_and_repeats_are_free(storage: optuna.storages.RDBStorage) -> None:
    lm = scripted_lm(demo_sensitive_answer)
    state = _state(storage, lm)
    right, wrong = _config(1), _config(0)
    outcomes = _scored(state.evaluate_many([right, wrong, right]))
    assert [(o.config, o.score, o.repeated) for o in outcomes] == [
        (right, 1.0, False),
        (wrong, 0.0, False),
        (right, 1.0, True),
    ]
    assert _calls(lm) == 2 * 4 * 2  # two configurations, four examples, two stages
    assert _queued(state) == [_key(right), _key(wrong)]
    queue = _queue(state)
    ids = [t.user_attrs["job"]["id"] for t in queue.study.get_trials()]
    assert {o["worker"] for o in queue.outcomes(ids).values()} == {worker_name()}  # the run worked itself
    assert state.calls_per_example == 2.0

    again = _scored(state.evaluate_many([wrong]))
    assert again[0].repeated
    assert again[0].score == 0.0
    assert _calls(lm) == 16
    assert len(_queued(state)) == 2


def test_a_restarted_run_reuses_finished_and_pending_jobs(storage: optuna.storages.RDBStorage) -> None:
    lm = scripted_lm(demo_sensitive_answer)
    finished, orphan = _config(1), _config(0, 2)
    first = _state(storage, lm)
    _scored(first.evaluate_many([finished]))
    _queue(first).submit([Job.new(_key(orphan), orphan, 4)])  # handed out, then the run died
    calls = _calls(lm)

    restarted = _state(storage, lm)  # the same study again, nothing scored in this process yet
    outcomes = _scored(restarted.evaluate_many([finished, orphan]))
    assert [(o.score, o.repeated) for o in outcomes] == [(1.0, False), (0.0, False)]
    assert restarted.scores[_key(finished)][0] == 1.0
    assert _calls(lm) == calls + 8  # the finished job was reused, the waiting one scored once
    assert _queued(restarted) == [_key(finished), _key(orphan)]  # neither was enqueued again
    assert all(t.state == TrialState.COMPLETE for t in _queue(restarted).study.get_trials())


def test_the_budget_stops_what_it_cannot_pay_for(storage: optuna.storages.RDBStorage) -> None:
    lm = scripted_lm(demo_sensitive_answer)
    state = _state(storage, lm, budget=20)
    _scored(state.evaluate_many([_config(0)]))  # 8 calls: 2 per example from now on
    outcomes = state.evaluate_many([_config(1), _config(0), _config(0, 1), _config(1, 1)])
    assert isinstance(outcomes[0], ScoredConfig)
    assert isinstance(outcomes[1], ScoredConfig)
    assert outcomes[1].repeated  # a repeat costs nothing, even with the budget nearly spent
    assert all(isinstance(o, StopSearch) and o.status == "budget_exhausted" for o in outcomes[2:])
    assert state.ledger.usage().lm_calls == _calls(lm) == 16
    assert _queued(state) == [_key(_config(0)), _key(_config(1))]  # nothing it cannot pay for is handed out


def test_a_job_that_ran_out_of_budget_stops_the_search(storage: optuna.storages.RDBStorage) -> None:
    lm = scripted_lm(demo_sensitive_answer)
    state = _state(storage, lm, budget=13)
    # Unchecked (the caller checked a batch): the second evaluation runs out in the middle.
    outcomes = state.evaluate_many([_config(0), _config(1)], check_budget=False)
    assert isinstance(outcomes[0], ScoredConfig)
    assert isinstance(outcomes[1], StopSearch)
    assert outcomes[1].status == "budget_exhausted"
    assert state.ledger.usage().lm_calls == 13


def test_a_failing_job_raises_in_the_run(storage: optuna.storages.RDBStorage) -> None:
    def broken(prompt: str) -> str:
        raise RuntimeError("the LM is down")

    state = _state(storage, scripted_lm(broken), max_errors=0)
    with pytest.raises(EvaluationError, match=r"failed in worker .*:\d+: EvaluationError"):
        state.evaluate_many([_config(1)])

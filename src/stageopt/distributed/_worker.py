"""Both ends of the job queue: the run hands out evaluations, workers (and the run) do them.

:class:`DistributedExecutor` is what a run on a shared storage scores configurations with
(:attr:`RunState.executor`): it enqueues the new ones as jobs, works on waiting jobs itself while
it waits, and turns the outcomes back into scores, in the order it was given, so a run's history
does not depend on which process did what. :func:`run_worker` is the loop of a ``stageopt
worker``: rebuild the evaluation from the stored spec, claim jobs, score them, repeat until the
run is over.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy
import optuna

from stageopt._errors import BudgetExhaustedError, ConfigurationError, EvaluationError
from stageopt.distributed._ledger import SharedBudgetLedger
from stageopt.distributed._queue import JOBS_SUFFIX, ClaimedJob, Job, JobQueue
from stageopt.distributed._storage import check_shared, load_study, open_storage
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM, ModelPrice
from stageopt.strategies._constraints import TrialMeasures
from stageopt.strategies._space import Config, SearchSpace, config_key
from stageopt.strategies._state import Scored, ScoredConfig, Scorer, StopSearch

if TYPE_CHECKING:
    from stageopt.strategies._state import RunState

logger = logging.getLogger(__name__)

#: Version of the spec a run stores for its workers.
SPEC_VERSION = 1

#: Environment variable that overrides :data:`HEARTBEAT_S` (whole seconds >= 1), read at import.
HEARTBEAT_ENV = "STAGEOPT_HEARTBEAT_S"

#: Default seconds between heartbeats of a job being scored.
DEFAULT_HEARTBEAT_S = 5


def heartbeat_seconds() -> int:
    """Seconds between heartbeats: ``$STAGEOPT_HEARTBEAT_S`` when set to a whole number >= 1, else 5.

    Every process of a run (the run and its workers) should use the same value: a job silent
    for twice as long is failed as stale and retried. Tests shorten it to see a killed worker's
    job retried sooner. An invalid value is ignored with a warning.
    """
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return DEFAULT_HEARTBEAT_S
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        logger.warning(
            "ignoring %s=%r: give a whole number of seconds >= 1; using %d", HEARTBEAT_ENV, raw, DEFAULT_HEARTBEAT_S
        )
        return DEFAULT_HEARTBEAT_S
    return value


#: Seconds between heartbeats of a job being scored; a job silent for twice as long is retried.
HEARTBEAT_S = heartbeat_seconds()


def worker_name() -> str:
    """``host:pid`` of this process, stored with each job it ran."""
    return f"{socket.gethostname()}:{os.getpid()}"


def example_to_dict(example: dspy.Example) -> dict[str, Any]:
    """A JSON-ready example: its fields and which of them are inputs."""
    return {"data": dict(example.toDict()), "inputs": sorted(example.inputs().keys())}


def example_from_dict(data: Mapping[str, Any]) -> dspy.Example:
    """Inverse of :func:`example_to_dict`."""
    return dspy.Example(**data["data"]).with_inputs(*data["inputs"])


def make_spec(state: RunState, context: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a worker needs to score this run's jobs the way the run would."""
    opt = state.optimizer
    return {
        "schema_version": SPEC_VERSION,
        "strategy": opt.strategy_name,
        "budget": opt.budget.to_dict(),
        "valset": [example_to_dict(e) for e in state.valset],
        "num_threads": opt.num_threads,
        "max_errors": opt.max_errors,
        "prices": {name: [p.prompt_per_million, p.completion_per_million] for name, p in opt.price_table().items()},
        "context": dict(context or {}),
    }


def execute(queue: JobQueue, claimed: ClaimedJob, scorer: Scorer) -> dict[str, Any]:
    """Score a claimed job with heartbeats, store its outcome in the queue, return it.

    Never raises for a failing evaluation: the outcome says ``budget`` (the shared budget ran
    out during it) or ``error`` (the evaluation raised), and the run decides.
    """
    job = claimed.job
    outcome: dict[str, Any]
    start = time.monotonic()
    try:
        with queue.heartbeat(claimed):
            scored = scorer.score(job.config, job.n, desc=f"job {claimed.number}")
        outcome = {
            "status": "ok",
            "score": scored.score,
            "stage_metrics": scored.stage_metrics,
            "measures": scored.measures.to_dict(),
            "lm_calls": scored.lm_calls,
            "n": scored.n,
        }
    except BudgetExhaustedError as exc:
        outcome = {"status": "budget", "error": str(exc)}
    except Exception as exc:  # an LM that is down, a metric that raises too often: the run reports it
        logger.warning("job %s failed: %s", job.id, exc, exc_info=True)
        outcome = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    outcome["worker"] = worker_name()
    outcome["seconds"] = round(time.monotonic() - start, 3)
    try:
        queue.complete(claimed, outcome)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Failed as stale meanwhile (heartbeats starved): its retry redoes it.
        logger.warning("job %s was failed as stale before it finished; its retry will run it again", job.id)
    return outcome


def scored_from(outcome: Mapping[str, Any]) -> Scored:
    """The :class:`Scored` of a job's ``ok`` outcome."""
    return Scored(
        float(outcome["score"]),
        dict(outcome["stage_metrics"]),
        TrialMeasures.from_dict(outcome["measures"]),
        int(outcome["lm_calls"]),
        int(outcome["n"]),
    )


class DistributedExecutor:
    """Scores a run's configurations through its job queue (see :mod:`~stageopt.distributed`).

    Args:
        queue: The run's job queue.
        work: Whether this process also runs waiting jobs while it waits (default True: a run
            with no worker started still finishes, and with N workers N + 1 processes score).
        poll_s: Seconds between looks at the queue while waiting.
    """

    def __init__(self, queue: JobQueue, *, work: bool = True, poll_s: float = 0.2) -> None:
        self.queue = queue
        self.work = work
        self.poll_s = poll_s

    def evaluate_many(
        self, state: RunState, configs: Sequence[Config], n: int, *, check_budget: bool = True
    ) -> list[ScoredConfig | StopSearch]:
        """Score ``configs`` on the first ``n`` validation examples (``RunState.evaluate_many``).

        Raises:
            EvaluationError: when a job's evaluation raised in the process that ran it.
        """
        results: list[ScoredConfig | StopSearch | None] = [None] * len(configs)
        jobs: dict[str, Job] = {}  # by score key: the jobs waited for, new or handed out before a restart
        new: list[Job] = []
        pending: list[tuple[int, str]] = []
        stop: StopSearch | None = None
        for i, config in enumerate(configs):
            key = f"{config_key(config)}@{n}"
            if key in state.scores:
                results[i] = _repeat(state, key, config, n)
            elif key in jobs:
                pending.append((i, key))
            elif (adopted := self.queue.completed(key)) is not None:  # finished before a restart
                results[i] = state.remember(key, config, scored_from(adopted))
            elif (running := self.queue.alive(key)) is not None:  # handed out before a restart, not done yet
                jobs[key] = running
                pending.append((i, key))
            else:
                if stop is None and check_budget:
                    reason = state.ledger.exhausted_reason(calls_needed=state.calls_needed(n) * (len(jobs) + 1))
                    stop = StopSearch("budget_exhausted", reason) if reason is not None else None
                if stop is not None:
                    results[i] = stop
                    continue
                jobs[key] = Job.new(key, {s: dict(c) for s, c in config.items()}, n)
                new.append(jobs[key])
                pending.append((i, key))
        if jobs:
            self.queue.submit(new)
            outcomes = self.wait([job.id for job in jobs.values()], state.scorer())
            for i, key in pending:
                if key in state.scores:  # the same configuration earlier in this batch
                    results[i] = _repeat(state, key, configs[i], n)
                    continue
                job = jobs[key]
                outcome = outcomes[job.id]
                if outcome["status"] == "ok":
                    results[i] = state.remember(key, configs[i], scored_from(outcome))
                elif outcome["status"] == "budget":
                    results[i] = StopSearch("budget_exhausted", str(outcome["error"]))
                else:
                    raise EvaluationError(
                        f"job {job.id} (configuration {key}) failed in worker {outcome.get('worker', '?')}: "
                        f"{outcome.get('error')}"
                    )
        return [r for r in results if r is not None]

    def wait(self, ids: Sequence[str], scorer: Scorer) -> dict[str, dict[str, Any]]:
        """Outcomes of the jobs ``ids``, running waiting jobs here meanwhile when :attr:`work`."""
        pending = set(ids)
        done: dict[str, dict[str, Any]] = {}
        while pending:
            ended = self.queue.outcomes(sorted(pending))
            done.update(ended)
            pending -= set(ended)
            if not pending:
                break
            claimed = self.queue.claim() if self.work else None
            if claimed is not None:
                execute(self.queue, claimed, scorer)
            else:
                time.sleep(self.poll_s)
        return done


def _repeat(state: RunState, key: str, config: Config, n: int) -> ScoredConfig:
    score, stage_metrics = state.scores[key]
    return ScoredConfig(config, n, score, stage_metrics, repeated=True, measures=state.measures.get(key))


@dataclass(frozen=True)
class WorkerReport:
    """What one :func:`run_worker` call did."""

    jobs: int
    failed: int
    seconds: float
    reason: str


def build_scorer(
    spec: Mapping[str, Any],
    main_study: optuna.Study,
    *,
    program: dspy.Module,
    metric: Callable[..., float],
    lm: dspy.BaseLM,
    ledger: BudgetLedger,
    adapter: dspy.Adapter | None = None,
    stage_metrics: Mapping[str, Callable[..., float]] | None = None,
    models: Mapping[str, dspy.BaseLM] | None = None,
    num_threads: int | None = None,
) -> Scorer:
    """The :class:`Scorer` of a worker: the run's space and examples, this process's LMs on ``ledger``."""
    if spec.get("schema_version") != SPEC_VERSION:
        raise ConfigurationError(
            f"study {main_study.study_name!r} was written by another stageopt version "
            f"(spec version {spec.get('schema_version')}, this one reads {SPEC_VERSION}); "
            "run the workers with the same stageopt version as the run"
        )
    if "space" not in main_study.user_attrs:
        raise ConfigurationError(f"study {main_study.study_name!r} holds no search space yet")
    metered_models = {name: MeteredLM(model, ledger) for name, model in (models or {}).items()}
    space = SearchSpace.from_dict(main_study.user_attrs["space"], models=metered_models)
    return Scorer(
        program=program,
        space=space,
        valset=[example_from_dict(e) for e in spec["valset"]],
        lm=MeteredLM(lm, ledger),
        ledger=ledger,
        metric=metric,
        adapter=adapter,
        stage_metrics=dict(stage_metrics or {}),
        num_threads=num_threads or int(spec["num_threads"]),
        max_errors=spec["max_errors"],
        prices={name: ModelPrice(*p) for name, p in spec["prices"].items()},
    )


def open_queue(storage: optuna.storages.BaseStorage, study_name: str) -> tuple[optuna.Study, JobQueue]:
    """The run's study and its job queue, for a worker.

    Raises:
        ConfigurationError: when the study does not exist (the message lists those that do) or
            was not started for workers (no queue).
    """
    main_study = load_study(storage, study_name)
    try:
        queue = JobQueue(storage, study_name, create=False)
    except KeyError as exc:
        raise ConfigurationError(
            f"study {study_name!r} has no job queue ({study_name + JOBS_SUFFIX!r}): it was not started for workers; "
            "start it with `stageopt optimize ... --storage URL --study NAME` (a server database such as PostgreSQL)"
        ) from exc
    return main_study, queue


def wait_for_spec(queue: JobQueue, *, timeout_s: float | None, poll_s: float = 0.5) -> dict[str, Any]:
    """The run's spec, waiting for a run that is still proposing candidates.

    Raises:
        ConfigurationError: when no spec appeared within ``timeout_s``.
    """
    start = time.monotonic()
    while (spec := queue.spec()) is None:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise ConfigurationError(
                f"the run of study {queue.name.removesuffix(JOBS_SUFFIX)!r} has not started handing out jobs "
                f"after {timeout_s:.0f} s; start `stageopt optimize ... --study NAME` with the same storage"
            )
        time.sleep(poll_s)
    return spec


def run_worker(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    *,
    program: dspy.Module,
    metric: Callable[..., float],
    lm: dspy.BaseLM,
    adapter: dspy.Adapter | None = None,
    stage_metrics: Mapping[str, Callable[..., float]] | None = None,
    models: Mapping[str, dspy.BaseLM] | None = None,
    num_threads: int | None = None,
    max_jobs: int | None = None,
    max_idle_s: float | None = None,
    wait_s: float | None = 600.0,
    poll_s: float = 0.25,
) -> WorkerReport:
    """Score jobs of the run of ``study_name`` until it is over: the API behind ``stageopt worker``.

    Give the same program, metric, stage metrics and LMs (``models``: the run's routed LMs by
    name) as the run; the validation examples, the candidate pools and the budget come from the
    study. Any number of workers on any machines may run this against one server database.

    Args:
        storage: A server-database URL (``postgresql://...``) or an opened ``RDBStorage``.
        study_name: The run's study name.
        program, metric, lm, adapter, stage_metrics, models: As given to the run's optimizer.
        num_threads: Examples scored in parallel per job (default: the run's setting).
        max_jobs: Stop after this many jobs (None: until the run is over).
        max_idle_s: Stop after this long without a job (None: until the run is over).
        wait_s: How long to wait for a run that has not yet stored its spec.
        poll_s: Seconds between looks at an empty queue.

    Raises:
        ConfigurationError: for a SQLite or in-memory storage, a wrong study name, or a study
            not started for workers.
        StorageUnavailableError: when the database cannot be reached.
    """
    if isinstance(storage, str):
        check_shared(storage, what="stageopt worker")
        storage = open_storage(storage, heartbeat_interval=HEARTBEAT_S)
    main_study, queue = open_queue(storage, study_name)
    spec = wait_for_spec(queue, timeout_s=wait_s, poll_s=poll_s)
    ledger = SharedBudgetLedger(storage, key=study_name, budget=Budget.from_dict(spec["budget"]))
    scorer = build_scorer(
        spec,
        main_study,
        program=program,
        metric=metric,
        lm=lm,
        ledger=ledger,
        adapter=adapter,
        stage_metrics=stage_metrics,
        models=models,
        num_threads=num_threads,
    )
    return work(queue, scorer, max_jobs=max_jobs, max_idle_s=max_idle_s, poll_s=poll_s)


def work(
    queue: JobQueue,
    scorer: Scorer,
    *,
    max_jobs: int | None = None,
    max_idle_s: float | None = None,
    poll_s: float = 0.25,
) -> WorkerReport:
    """Claim and score jobs until the run is over (or ``max_jobs`` / ``max_idle_s`` is reached).

    A job whose evaluation fails is stored with its error for the run to report; the worker goes
    on. The budget is the run's, shared through the database: a worker never pays for more calls
    than the run has left.
    """
    start = time.monotonic()
    done = failed = 0
    idle_since = time.monotonic()
    while True:
        if max_jobs is not None and done >= max_jobs:
            reason = f"{max_jobs} jobs done"
            break
        claimed = queue.claim()
        if claimed is None:
            if queue.finished():
                reason = "the run is over"
                break
            if max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                reason = f"no job for {max_idle_s:.0f} s"
                break
            time.sleep(poll_s)
            continue
        outcome = execute(queue, claimed, scorer)
        done += 1
        failed += outcome["status"] != "ok"
        logger.info("job %d: %s (%.1f s)", claimed.number, outcome["status"], outcome["seconds"])
        idle_since = time.monotonic()
    return WorkerReport(done, failed, round(time.monotonic() - start, 3), reason)

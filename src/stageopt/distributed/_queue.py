"""Evaluations handed to worker processes through a second Optuna study, used as a job queue.

A run on a shared storage keeps its trials in its study ``NAME`` exactly as a one-process run
does. Each configuration it wants scored becomes a *job*: a ``WAITING`` trial of the study
``NAME.jobs`` whose user attribute ``job`` says what to score. A worker claims a job by moving
it from ``WAITING`` to ``RUNNING`` (the storage's row-locked state change, the same one Optuna's
``ask`` uses to pop an enqueued trial), records heartbeats while it works, and completes it with
the outcome in the user attribute ``outcome``. A worker that dies stops its heartbeats; whoever
polls next fails the stale job, and Optuna's retry callback enqueues a copy with the same
``job`` attribute, which another worker claims. Jobs are matched by ``job["id"]`` across retries.

The queue study's user attributes hold the run's ``spec`` (what a worker needs to rebuild the
evaluation: validation examples, budget, evaluation settings, and for the CLI how to rebuild the
task and LMs) and ``finished`` once the run is over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

logger = logging.getLogger(__name__)

#: Suffix of the queue study's name.
JOBS_SUFFIX = ".jobs"


@contextlib.contextmanager
def record_heartbeats(
    storage: optuna.storages.RDBStorage,
    trial_id: int,
    *,
    what: str,
    name: str,
    after: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Record heartbeats of ``trial_id`` every heartbeat interval in a daemon thread while the block runs.

    The first one is recorded at once. A failed beat is logged (``what`` names the trial) and the
    next one retries: a trial silent past the grace period goes stale, as Optuna decides.
    ``after`` runs after each recorded beat (e.g. to notice that the trial was failed as stale).
    """
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                storage.record_heartbeat(trial_id)
                if after is not None:
                    after()
            except Exception:
                logger.warning("heartbeat of %s failed", what, exc_info=True)
            stop.wait(interval)

    thread = threading.Thread(target=beat, name=f"stageopt-heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class Job:
    """One evaluation to run: a configuration on the first ``n`` validation examples.

    Attributes:
        id: Unique id, kept by retries of the job.
        key: The run's score key of the configuration (``config_key@n``): a finished job with
            the same key is reused by a resumed run instead of scoring again.
        config: The configuration, as stored in trials (``{stage: {knob: index}}``).
        n: Number of validation examples.
    """

    id: str
    key: str
    config: dict[str, dict[str, int]]
    n: int

    @classmethod
    def new(cls, key: str, config: dict[str, dict[str, int]], n: int) -> Job:
        """A job with a fresh id."""
        return cls(uuid.uuid4().hex, key, config, n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored as the queue trial's ``job`` attribute."""
        return {"id": self.id, "key": self.key, "config": self.config, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["id"]), str(data["key"]), data["config"], int(data["n"]))


def _retries_stale_trials(storage: optuna.storages.BaseStorage) -> bool:
    """Whether ``storage`` runs a callback (a retry) on each trial it fails as stale."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        return False
    getter = getattr(storage, "get_heartbeat_stale_trial_callback", None) or storage.get_failed_trial_callback
    return getter() is not None


@dataclass(frozen=True)
class ClaimedJob:
    """A job this process claimed: its queue trial and what to run."""

    trial_id: int
    number: int
    job: Job


class JobQueue:
    """The job queue of the study ``study_name``: the study ``study_name + ".jobs"``.

    Args:
        storage: The storage of the run's study, opened with heartbeats and a retry callback
            (:func:`~stageopt.distributed.open_storage`), so that jobs of dead workers return.
        study_name: The run's study name.
        create: Create the queue study when missing (the run does); a worker passes False
            and gets a :class:`KeyError` for a study without a queue.
        retry_wait_s: How long a job whose copy was failed as stale, with no retry of it in
            sight, still counts as pending when the storage retries stale trials. Optuna fails
            all stale trials first and enqueues their retries after; a reader between the two
            would otherwise take a job about to be retried for one that reached the retry limit.
    """

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        study_name: str,
        *,
        create: bool = True,
        retry_wait_s: float = 10.0,
    ) -> None:
        self.storage = storage
        self.name = study_name + JOBS_SUFFIX
        self.retry_wait_s = retry_wait_s
        self._retries = _retries_stale_trials(storage)
        self._dead_since: dict[str, float] = {}  # job id -> when this process first saw it dead without a retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if create:
                self.study = optuna.create_study(
                    storage=storage, study_name=self.name, direction="maximize", load_if_exists=True
                )
            else:
                self.study = optuna.load_study(storage=storage, study_name=self.name)
        self.study_id = storage.get_study_id_from_name(self.name)

    # ---- the run's side ------------------------------------------------------------------

    def set_spec(self, spec: dict[str, Any]) -> None:
        """Store what workers need to rebuild the evaluation (JSON only)."""
        self.study.set_user_attr("spec", spec)
        self.study.set_user_attr("finished", False)

    def spec(self) -> dict[str, Any] | None:
        """The stored spec, None before the run stored it."""
        spec = self.storage.get_study_user_attrs(self.study_id).get("spec")
        return dict(spec) if spec is not None else None

    def submit(self, jobs: Sequence[Job]) -> None:
        """Enqueue ``jobs`` (in order) for any worker to claim."""
        for job in jobs:
            self.study.enqueue_trial({}, user_attrs={"job": job.to_dict()}, skip_if_exists=False)

    def finish(self) -> None:
        """Mark the run over: idle workers exit."""
        self.study.set_user_attr("finished", True)

    def finished(self) -> bool:
        """Whether the run marked itself over."""
        return bool(self.storage.get_study_user_attrs(self.study_id).get("finished", False))

    def outcomes(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Outcomes of the jobs among ``ids`` that ended, by job id.

        A job ends when a copy of it completed (its ``outcome``) or failed with an outcome
        (budget, evaluation error). A copy failed because its worker died counts as ended only
        when no retry of it is waiting or running (the retry limit was reached): the outcome
        then says so. Where the storage retries stale trials, that verdict waits
        :attr:`retry_wait_s` from the moment this process first saw the job so: the retry
        is enqueued by whoever failed the copy, just after the failure.
        """
        wanted = set(ids)
        ended: dict[str, dict[str, Any]] = {}
        alive: set[str] = set()
        dead: dict[str, int] = {}
        for trial in self.study.get_trials(deepcopy=False):
            job = trial.user_attrs.get("job")
            if not job or job["id"] not in wanted:
                continue
            outcome = trial.user_attrs.get("outcome")
            if outcome is not None and trial.state in (TrialState.COMPLETE, TrialState.FAIL):
                ended[job["id"]] = dict(outcome)
            elif trial.state in (TrialState.WAITING, TrialState.RUNNING):
                alive.add(job["id"])
            elif trial.state == TrialState.FAIL:
                dead[job["id"]] = dead.get(job["id"], 0) + 1
        now = time.monotonic()
        for job_id, deaths in dead.items():
            if job_id in ended or job_id in alive:
                self._dead_since.pop(job_id, None)
                continue
            since = self._dead_since.setdefault(job_id, now)
            if self._retries and now - since < self.retry_wait_s:
                continue  # its retry may not be enqueued yet
            ended[job_id] = {
                "status": "error",
                "error": f"the job's worker died {deaths} time(s) and the retry limit was reached",
            }
        return ended

    def summary(self) -> dict[str, Any]:
        """Counts for the run's notes: jobs by state, jobs of dead workers, jobs scored by each process."""
        by_state: dict[str, int] = {}
        by_process: dict[str, int] = {}
        stale = 0
        for trial in self.study.get_trials(deepcopy=False):
            by_state[trial.state.name.lower()] = by_state.get(trial.state.name.lower(), 0) + 1
            outcome = trial.user_attrs.get("outcome")
            if outcome is None and trial.state == TrialState.FAIL:
                stale += 1
            elif outcome is not None and outcome.get("status") == "ok":
                worker = str(outcome.get("worker", "?"))
                by_process[worker] = by_process.get(worker, 0) + 1
        return {"queue": self.name, "jobs": by_state, "stale_jobs_retried": stale, "jobs_by_process": by_process}

    def completed(self, key: str) -> dict[str, Any] | None:
        """The outcome of a completed job with score key ``key`` (from an earlier run of the study)."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            job = trial.user_attrs.get("job")
            outcome = trial.user_attrs.get("outcome") or {}
            if job and job.get("key") == key and outcome.get("status") == "ok":
                return dict(outcome)
        return None

    def alive(self, key: str) -> Job | None:
        """A job with score key ``key`` still waiting or running (handed out by an earlier run of the study).

        A run restarted after it was killed waits for such a job instead of enqueueing the same
        evaluation again.
        """
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
            job = trial.user_attrs.get("job")
            if job and job.get("key") == key:
                return Job.from_dict(job)
        return None

    # ---- the worker's side ---------------------------------------------------------------

    def fail_stale(self) -> None:
        """Fail jobs whose worker stopped sending heartbeats (their retries are enqueued)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def claim(self) -> ClaimedJob | None:
        """Claim the oldest waiting job, or None when none is waiting.

        The state change ``WAITING`` → ``RUNNING`` is made under the storage's row lock and
        succeeds for exactly one claimant. A heartbeat is recorded just before it: Optuna only
        counts a running trial as stale once it has a heartbeat, so a claimant killed between
        the claim and its first beat would otherwise leave the job running forever.
        """
        self.fail_stale()
        storage = self.storage
        beating = (
            storage if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() else None
        )
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            job = trial.user_attrs.get("job")
            if not job:
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            if beating is not None:
                beating.record_heartbeat(trial_id)
            try:
                claimed = self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            if claimed:
                return ClaimedJob(trial_id, trial.number, Job.from_dict(job))
        return None

    @contextlib.contextmanager
    def heartbeat(self, claimed: ClaimedJob) -> Iterator[None]:
        """Record heartbeats for ``claimed`` in a background thread while the block runs."""
        storage = self.storage
        interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
        if not interval:
            yield
            return
        assert isinstance(storage, optuna.storages.RDBStorage)
        with record_heartbeats(storage, claimed.trial_id, what=f"job {claimed.job.id}", name=f"{claimed.number}"):
            yield

    def complete(self, claimed: ClaimedJob, outcome: dict[str, Any]) -> None:
        """Store ``outcome`` and end the job: COMPLETE when it scored, FAIL otherwise."""
        self.storage.set_trial_user_attr(claimed.trial_id, "outcome", outcome)
        if outcome.get("status") == "ok":
            self.storage.set_trial_state_values(claimed.trial_id, TrialState.COMPLETE, [float(outcome["score"])])
        else:
            self.storage.set_trial_state_values(claimed.trial_id, TrialState.FAIL)

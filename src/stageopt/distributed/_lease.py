"""One live run per shared study: a run lease kept as a heartbeating trial of ``NAME.runs``.

Two ``stageopt optimize`` processes on the same study would both run the strategy, asking and
telling trials into one study and spending one budget. A run on a shared storage therefore
holds a *lease* before it proposes or scores anything: a ``RUNNING`` trial of a third study,
``NAME.runs`` (beside ``NAME`` and ``NAME.jobs``), whose user attributes say who holds it
(``host``, ``pid``, ``started``, ``strategy``) and whose Optuna heartbeat a daemon thread keeps
fresh. The run ends it ``COMPLETE`` (its value: the seconds it was held) or ``FAIL`` when the
run raised.

The rule, race-free: create your own lease (one transaction, attributes included), record a
heartbeat, fail the stale leases (:func:`optuna.storages.fail_stale_trials`: a killed run's
lease, silent past the grace period of twice the heartbeat), then list the ``RUNNING`` leases;
when one with a smaller trial number is among them, end yours ``FAIL`` and raise
:class:`~stageopt.RunInProgressError`. Optuna numbers a study's trials under a row lock of the
study, so numbers follow commit order: of two runs starting together, the later one always
sees the earlier, and exactly one proceeds. A killed run's lease blocks the study until it goes
stale; the error then says in how many seconds to retry. The lease storage has no retry
callback, so a stale lease is only failed, never enqueued again.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
import warnings
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from stageopt._errors import ConfigurationError, RunInProgressError
from stageopt.distributed._queue import record_heartbeats
from stageopt.distributed._storage import RUNS_SUFFIX, mask_url, open_storage

logger = logging.getLogger(__name__)

#: Optuna's table of trial heartbeats (read for the age of another run's last heartbeat).
_HEARTBEATS = sa.table("trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat"))


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _process_gone(host: Any, pid: Any) -> bool:
    """Whether ``pid`` on ``host`` is known to have exited (only decidable on this host)."""
    if host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class RunLease:
    """The lease of the one live run of ``study_name`` (see :mod:`~stageopt.distributed._lease`).

    Build it with :meth:`open` (which opens its own storage), or on a storage opened with
    ``open_storage(url, heartbeat_interval=..., max_retry=0)``, then :meth:`acquire` it; use it
    as a context manager to release it ``COMPLETE``, or ``FAIL`` when the block raises.

    Args:
        storage: An RDB storage with heartbeats and no stale-trial retry callback.
        study_name: The run's study; the leases live in ``study_name + ".runs"``.

    Raises:
        ConfigurationError: When ``storage`` has no heartbeat or re-enqueues stale trials.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str) -> None:
        interval = storage.get_heartbeat_interval()
        if not interval:
            raise ConfigurationError("a run lease needs a storage with heartbeats: open_storage(url, max_retry=0)")
        if storage.get_heartbeat_stale_trial_callback() is not None:
            raise ConfigurationError(
                "a run lease needs a storage without a stale-trial retry callback (a stale lease must not come "
                "back as WAITING): open it with open_storage(url, heartbeat_interval=..., max_retry=0)"
            )
        self.storage = storage
        self.study_name = study_name
        self.name = study_name + RUNS_SUFFIX
        self.url = mask_url(str(storage.url))  # as messages name it
        self.interval = interval
        self.grace_s = float(storage.grace_period or 2 * interval)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study = optuna.create_study(
                storage=storage, study_name=self.name, direction="minimize", load_if_exists=True
            )
        self.study_id = storage.get_study_id_from_name(self.name)
        self.number: int | None = None
        self._trial_id: int | None = None
        self._start = 0.0
        self._beating = contextlib.ExitStack()
        self._warned = False
        self._owns_storage = False

    @classmethod
    def open(cls, url: str, study_name: str, *, strategy: str, heartbeat_s: int) -> RunLease:
        """Open a storage of its own at ``url`` and acquire the lease of ``study_name``.

        Args:
            url: The run's storage URL.
            study_name: The run's study.
            strategy: The run's strategy name, stored with the lease.
            heartbeat_s: Seconds between heartbeats; a lease silent for twice as long is stale.

        Raises:
            RunInProgressError: When another run of the study holds a live lease.
            StorageUnavailableError: When the database cannot be reached.
        """
        storage = open_storage(url, pool_size=1, max_overflow=2, heartbeat_interval=heartbeat_s, max_retry=0)
        try:
            lease = cls(storage, study_name)
            lease._owns_storage = True
            lease.url = mask_url(url)  # as the user gave it (the storage's has its driver named)
            lease.acquire(strategy=strategy)
        except BaseException:
            storage.engine.dispose()
            raise
        return lease

    # ---- acquiring ---------------------------------------------------------------------------

    def acquire(self, *, strategy: str) -> None:
        """Take the lease, or end this attempt ``FAIL`` and raise when another run holds it.

        Raises:
            RunInProgressError: When a live lease older than this one exists.
        """
        if self._trial_id is not None:
            raise ConfigurationError(f"the run lease of study {self.study_name!r} is already held by this object")
        attrs = {"host": socket.gethostname(), "pid": os.getpid(), "started": _utc_now(), "strategy": strategy}
        template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs)
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        self._trial_id, self.number = trial_id, self.storage.get_trial_number_from_id(trial_id)
        self._start = time.monotonic()
        self.storage.record_heartbeat(trial_id)
        try:
            self._check()
        except BaseException:
            self._end(TrialState.FAIL, outcome="refused")
            raise
        what = f"the run lease of study {self.study_name!r}"
        self._beating.enter_context(
            record_heartbeats(self.storage, trial_id, what=what, name=f"run-lease-{self.number}", after=self._watch)
        )
        logger.info("run lease %d of study %r taken (%s)", self.number, self.study_name, self.name)

    def _check(self) -> None:
        """Fail stale leases, then raise when a live lease older than this one remains."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        assert self.number is not None
        running = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,))
        ages = self._heartbeat_ages([t._trial_id for t in running])
        for trial in running:
            # A lease killed before its first heartbeat is never stale for Optuna: fail it by its age.
            if trial.number != self.number and trial._trial_id not in ages and self._silent(trial):
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed by another run
                    self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                continue
            if trial.number < self.number:
                raise self._refusal(trial, ages.get(trial._trial_id))

    def _silent(self, trial: FrozenTrial) -> bool:
        try:
            started = datetime.datetime.fromisoformat(str(trial.user_attrs.get("started")))
        except ValueError:
            return False
        if started.tzinfo is None:
            return False
        return (datetime.datetime.now(datetime.UTC) - started).total_seconds() > self.grace_s

    def _heartbeat_ages(self, trial_ids: list[int]) -> dict[int, float]:
        """Seconds since the last heartbeat of each of ``trial_ids`` that has one (database clock)."""
        if not trial_ids:
            return {}
        query = sa.select(_HEARTBEATS.c.trial_id, _HEARTBEATS.c.heartbeat).where(_HEARTBEATS.c.trial_id.in_(trial_ids))
        try:
            with self.storage.engine.connect() as conn:
                now = conn.execute(sa.select(sa.func.now())).scalar_one()
                rows = conn.execute(query).all()
        except sa.exc.SQLAlchemyError:  # Optuna's own table, not an API: the message then omits the age
            logger.debug("could not read the heartbeats of %s", trial_ids, exc_info=True)
            return {}
        now = now.replace(tzinfo=None)  # as Optuna compares them: both in the session's time zone
        return {int(tid): max(0.0, (now - beat.replace(tzinfo=None)).total_seconds()) for tid, beat in rows}

    def _refusal(self, other: FrozenTrial, age: float | None) -> RunInProgressError:
        attrs = dict(other.user_attrs)
        host, pid, started = attrs.get("host", "?"), attrs.get("pid", "?"), attrs.get("started", "?")
        left = max(1, round(self.grace_s - (age or 0.0)))
        url = self.url
        who = f"pid {pid} on host {host}, strategy {attrs.get('strategy', '?')}, started {started}"
        if _process_gone(host, pid):
            message = (
                f"the previous run of study {self.study_name!r} ({who}) has exited without ending its run lease "
                f"(was it killed?), and the lease is still fresh: retry in {left} s, when it is stale "
                f"(with --resume to continue that run)"
            )
        else:
            beat = f"last heartbeat {age:.0f} s ago" if age is not None else "no heartbeat yet"
            message = (
                f"study {self.study_name!r} is already being optimized by another run ({who}, {beat}); two runs "
                f"would ask trials of one study and spend one budget. Start `stageopt worker --storage {url} "
                f"--study {self.study_name}` to help it, wait for it to finish, or choose another --study. "
                f"If that run was killed, its lease is still fresh: retry in {left} s (with --resume)"
            )
        return RunInProgressError(message, holder=attrs, retry_after_s=float(left))

    # ---- holding and releasing -----------------------------------------------------------------

    def _watch(self) -> None:
        """After a heartbeat: say once that the lease was failed as stale (another run may start now)."""
        assert self._trial_id is not None
        if not self._warned and self.storage.get_trial(self._trial_id).state != TrialState.RUNNING:
            self._warned = True
            logger.error(
                "the run lease of study %r was failed as stale (no heartbeat for %.0f s): another run of the "
                "study may start now; make sure only one runs",
                self.study_name,
                self.grace_s,
            )

    def release(self, *, failed: bool = False) -> None:
        """End the lease: ``COMPLETE``, or ``FAIL`` when the run raised. Idempotent; never raises."""
        if self._trial_id is None:
            return
        self._beating.close()
        self._end(TrialState.FAIL if failed else TrialState.COMPLETE, outcome="failed" if failed else "completed")

    def _end(self, state: TrialState, *, outcome: str) -> None:
        trial_id, self._trial_id = self._trial_id, None
        assert trial_id is not None
        held = round(time.monotonic() - self._start, 3)
        try:
            self.storage.set_trial_user_attr(trial_id, "outcome", outcome)
            self.storage.set_trial_user_attr(trial_id, "ended", _utc_now())
            self.storage.set_trial_state_values(trial_id, state, [held] if state == TrialState.COMPLETE else None)
        except optuna.exceptions.UpdateFinishedTrialError:
            logger.warning("the run lease of study %r had already been failed as stale", self.study_name)
        except Exception:  # a database gone at the end: the lease goes stale by itself
            logger.warning("could not end the run lease of study %r", self.study_name, exc_info=True)
        finally:
            if self._owns_storage:
                self.storage.engine.dispose()

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.release(failed=exc_type is not None)

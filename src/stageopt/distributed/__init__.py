"""Sharing one optimization among many worker processes: storages, a shared budget, a job queue.

A run whose ``storage`` is a database server (PostgreSQL) keeps its study there as usual, and
hands every evaluation to the study's job queue (:class:`JobQueue`, a second Optuna study named
``NAME.jobs``), where ``stageopt worker`` processes (:func:`run_worker`), possibly on several
machines, and the run itself claim and score them. The budget of logical LM calls lives in the
same database (:class:`SharedBudgetLedger`): every call of every process is reserved there in one
transaction, so together they never exceed it. A worker that dies stops its heartbeats; its job
is failed as stale and enqueued again for another worker, and finished jobs are never redone
(a restarted run reuses them). SQLite stays the embedded default for one process;
:func:`check_shared` refuses it where several processes would share it.

One study has one live run: before it proposes or scores anything, a run takes the study's run
lease (:class:`RunLease`, a heartbeating trial of a third study, ``NAME.runs``), and a second
``stageopt optimize`` on the same study is refused with :class:`~stageopt.RunInProgressError`,
which names the live run and says to start workers for it instead. A run that was killed stops
its heartbeats; its lease goes stale after twice the heartbeat, and ``--resume`` then continues
the run (earlier, it is refused with the seconds left to wait). Workers never read ``NAME.runs``.

How much runs at once is the strategy's choice, bounded by ``parallel_trials``: ``joint``,
``random`` and ``pareto`` ask that many trials of their sampler at a time (TPE with the constant
liar, so they differ); ``coordinate`` scores that many candidates of one stage within a round at
a time; ``evolutionary`` scores a generation's new members together; ``independent`` and
``hierarchical`` with ``parallel=True`` score a wave (one trial per stage) together. The others
(``multifidelity``'s rungs, ``pbt``, sequential ``independent``/``hierarchical`` phases, the
baseline and warm-start trials) decide each step from the previous one: their trials go through
the queue one at a time, so extra workers wait.
"""

from stageopt.distributed._lease import RunLease
from stageopt.distributed._ledger import LEDGER_TABLE_NAME, SharedBudgetLedger
from stageopt.distributed._queue import JOBS_SUFFIX, Job, JobQueue
from stageopt.distributed._storage import (
    RUNS_SUFFIX,
    check_shared,
    is_shared_storage,
    load_study,
    mask_url,
    open_storage,
    resolve_storage_url,
)
from stageopt.distributed._worker import DistributedExecutor, WorkerReport, run_worker

__all__ = [
    "JOBS_SUFFIX",
    "LEDGER_TABLE_NAME",
    "RUNS_SUFFIX",
    "DistributedExecutor",
    "Job",
    "JobQueue",
    "RunLease",
    "SharedBudgetLedger",
    "WorkerReport",
    "check_shared",
    "is_shared_storage",
    "load_study",
    "mask_url",
    "open_storage",
    "resolve_storage_url",
    "run_worker",
]

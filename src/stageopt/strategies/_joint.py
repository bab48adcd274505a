"""Joint Bayesian optimization: every stage's choices sampled at once by one Optuna sampler."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._base import BaseStageOptimizer, RunState
from stageopt.strategies._checks import check_early_stopping
from stageopt.strategies._state import TrialRequest

#: Sampled configurations per counted (not previously scored) trial before a loop gives up.
MAX_ATTEMPTS_PER_TRIAL = 3


def check_loop_settings(n_trials: int | None, patience: int | None, min_delta: float) -> None:
    """Raise a clear error for bad settings of :func:`sampler_loop`."""
    if n_trials is not None and n_trials < 1:
        raise ConfigurationError(f"`n_trials` must be >= 1 or None (until the budget ends), got {n_trials=}")
    check_early_stopping(patience, min_delta)


def sampler_loop(
    state: RunState,
    *,
    phase: str,
    n_trials: int | None,
    patience: int | None,
    min_delta: float,
) -> tuple[str, str | None]:
    """Ask the study's sampler for whole-program configurations and score them, until done.

    Ends after ``n_trials`` counted trials of ``phase`` (finished trials of an earlier, resumed
    run included), when ``patience`` counted trials in a row improve the best validation score
    by less than ``min_delta``, when the sampler keeps proposing configurations already scored
    (a small space is exhausted), or when the budget cannot pay for a trial (:class:`StopSearch`).
    A configuration scored before is told again at no cost and does not count as a trial.
    """
    misses = 0
    while True:
        records = state.trials_in(phase=phase)
        fresh = [r for r in records if not r.repeated]
        if n_trials is not None and len(fresh) >= n_trials:
            return "completed", f"{n_trials} {phase} trials done"
        if patience is not None and len(fresh) >= patience:
            before = _best_before(state, fresh[-patience])
            best = state.best.score if state.best else 0.0
            if best - before < min_delta:
                return "early_stopped", (
                    f"{patience} {phase} trials in a row improved the best score by {best - before:.4f} "
                    f"< min_delta={min_delta}"
                )
        # Trials asked together (parallel_trials > 1, a shared storage) are scored at once by the workers.
        k = state.optimizer.parallel_trials
        if n_trials is not None:
            k = min(k, n_trials - len(fresh))
        requests = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for _ in range(max(1, k)):
                trial = state.study.ask()
                config = state.space.suggest(trial)  # define-by-run: a stage's knobs only when it runs
                requests.append(TrialRequest(config, phase=phase, trial=trial))
        for record in state.run_trials(requests):
            misses = misses + 1 if record.repeated else 0
        if misses >= MAX_ATTEMPTS_PER_TRIAL * 4:
            return "completed", f"the sampler proposed only configurations scored before {misses} times in a row"


def _best_before(state: RunState, record: Any) -> float:
    """Best feasible full-fidelity score among trials before ``record``."""
    scores = [
        r.score
        for r in state.records
        if r.trial < record.trial and r.fidelity == state.full_fidelity and r.variant is None and r.feasible
    ]
    return max(scores, default=0.0)


class JointBayesian(BaseStageOptimizer):
    """Joint Bayesian optimization over all stages' choices at once (multivariate TPE).

    Every trial samples the instruction, demo set and enabled settings of every stage together,
    the MIPROv2-style search done within stageopt's budget and evaluation. Pass ``sampler=`` for
    another Optuna sampler (e.g. ``GPSampler``).

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        n_trials: Upper bound on trials (None: until the budget or patience ends the run).
        patience: Trials in a row without an improvement of ``min_delta`` before stopping early
            (None: never).
        min_delta: Smallest improvement of the best validation score that counts as progress.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, storage, ...).
    """

    strategy_name = "joint"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        n_trials: int | None = None,
        patience: int | None = 12,
        min_delta: float = 0.005,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        check_loop_settings(n_trials, patience, min_delta)
        self.n_trials = n_trials
        self.patience = patience
        self.min_delta = min_delta

    def _search(self, state: RunState) -> tuple[str, str | None]:
        return sampler_loop(
            state, phase="joint", n_trials=self.n_trials, patience=self.patience, min_delta=self.min_delta
        )

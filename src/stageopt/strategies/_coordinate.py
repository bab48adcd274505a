"""Coordinate descent: one stage at a time, the others frozen at the best so far, in rounds."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._base import BaseStageOptimizer, RunState
from stageopt.strategies._space import config_from_params

#: Sampled configurations tried per counted (not previously scored) trial before a stage gives up.
MAX_ATTEMPTS_PER_TRIAL = 3


class CoordinateDescent(BaseStageOptimizer):
    """Optimize each stage in turn with the other stages frozen at the best configuration so far.

    Each round visits the stages in program order; a stage gets ``trials_per_stage`` trials in
    which Optuna (ask/tell) proposes that stage's instruction and demo-set choice. The run ends
    after ``max_rounds`` rounds, when the budget cannot pay for another trial, or when
    ``patience`` consecutive rounds improve the best score by less than ``min_delta``.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        max_rounds: Upper bound on rounds.
        trials_per_stage: Trials per stage per round (default: the stage's number of choices,
            capped at 6).
        min_delta: Smallest round improvement that counts as progress.
        patience: Rounds without progress before stopping early.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, storage, ...).
    """

    strategy_name = "coordinate"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        max_rounds: int = 3,
        trials_per_stage: int | None = None,
        min_delta: float = 0.005,
        patience: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        if max_rounds < 1:
            raise ConfigurationError(f"`max_rounds` must be >= 1, got {max_rounds=}")
        if trials_per_stage is not None and trials_per_stage < 1:
            raise ConfigurationError(f"`trials_per_stage` must be >= 1 or None, got {trials_per_stage=}")
        if min_delta < 0:
            raise ConfigurationError(f"`min_delta` must be >= 0, got {min_delta=}")
        if patience < 1:
            raise ConfigurationError(f"`patience` must be >= 1, got {patience=}")
        self.max_rounds = max_rounds
        self.trials_per_stage = trials_per_stage
        self.min_delta = min_delta
        self.patience = patience

    def _trials_for(self, state: RunState, stage: str) -> int:
        choices = len(list(state.space.stage_configs(stage)))
        if choices <= 1:
            return 0
        return min(self.trials_per_stage or 6, choices - 1)

    def _search(self, state: RunState) -> tuple[str, str | None]:
        stale = 0
        for round_no in range(1, self.max_rounds + 1):
            before = state.best.score if state.best else 0.0
            for stage in state.space.names():
                target = self._trials_for(state, stage)
                # A sampled configuration scored before is told again for free and does not count
                # toward the stage's trials; attempts are capped so a small pool cannot loop forever.
                while True:
                    records = state.trials_in(phase="coordinate", stage=stage, round=round_no)
                    fresh = sum(1 for r in records if not r.repeated)
                    if fresh >= target or len(records) >= MAX_ATTEMPTS_PER_TRIAL * target:
                        break
                    base = state.best_config()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        trial = state.study.ask(state.space.distributions(stage))
                    config = config_from_params(trial.params, base)
                    state.run_trial(config, phase="coordinate", stage=stage, round=round_no, trial=trial)
            after = state.best.score if state.best else 0.0
            if after - before < self.min_delta:
                stale += 1
                if stale >= self.patience and round_no < self.max_rounds:
                    return "early_stopped", (
                        f"round {round_no} improved the best score by {after - before:.4f} < min_delta={self.min_delta}"
                    )
            else:
                stale = 0
        return "completed", f"{self.max_rounds} rounds done"

"""Random search baseline: whole-program configurations drawn uniformly by Optuna's RandomSampler."""

from __future__ import annotations

import optuna

from stageopt.strategies._base import RunState
from stageopt.strategies._joint import JointBayesian, sampler_loop


class RandomSearch(JointBayesian):
    """Baseline: every stage's choices drawn uniformly at random, independently per trial.

    Same settings as :class:`~stageopt.strategies.JointBayesian` (``n_trials``, ``patience``,
    ``min_delta``); only the sampler differs (``optuna.samplers.RandomSampler``, seeded).
    """

    strategy_name = "random"

    def default_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.seed)

    def _search(self, state: RunState) -> tuple[str, str | None]:
        return sampler_loop(
            state, phase="random", n_trials=self.n_trials, patience=self.patience, min_delta=self.min_delta
        )

"""Grid search baseline for small spaces: every whole-program configuration, in a seeded order."""

from __future__ import annotations

import math
from typing import Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._base import BaseStageOptimizer, RunState
from stageopt.strategies._joint import sampler_loop


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """``GridSampler`` for ask/tell: it does not call ``study.stop()``, which only works inside
    ``study.optimize``; :class:`GridSearch` stops by itself when every grid point is scored."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


class GridSearch(BaseStageOptimizer):
    """Baseline: score every combination of every stage's choices (Optuna's ``GridSampler``).

    The grid is visited in an order shuffled by ``seed``, so a budget smaller than the grid
    scores a uniform sample of it; a resumed run skips the grid points already scored. Meant for
    small spaces: a grid larger than ``max_grid`` is refused with a pointer to ``random``.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        max_grid: Largest grid accepted.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, storage, ...);
            ``sampler`` is ignored.
    """

    strategy_name = "grid"

    def __init__(self, metric: Any, *, budget: Any, max_grid: int = 100_000, **kwargs: Any) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        if max_grid < 1:
            raise ConfigurationError(f"`max_grid` must be >= 1, got {max_grid=}")
        self.max_grid = max_grid

    def _search(self, state: RunState) -> tuple[str, str | None]:
        distributions = state.space.all_distributions()
        grid = {name: list(d.choices) for name, d in distributions.items()}  # type: ignore[attr-defined]
        size = math.prod(len(choices) for choices in grid.values())
        if size > self.max_grid:
            raise ConfigurationError(
                f"the grid has {size} configurations, more than max_grid={self.max_grid}; "
                "use --strategy random (or joint) for a space this large, or raise max_grid"
            )
        state.study.sampler = _AskTellGridSampler(grid, seed=self.seed)
        status, reason = sampler_loop(state, phase="grid", n_trials=size, patience=None, min_delta=0.0)
        if status == "completed":
            reason = f"all {size} grid configurations scored"
        return status, reason

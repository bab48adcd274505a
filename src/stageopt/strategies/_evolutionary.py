"""A population of whole-program configurations: tournament, stage-wise crossover, mutation, elitism."""

from __future__ import annotations

from stageopt.strategies._base import BaseStageOptimizer, RunState


class Evolutionary(BaseStageOptimizer):
    """A population of whole-program configurations: tournament, stage-wise crossover, mutation, elitism. (being written)."""

    strategy_name = "evolutionary"

    def _search(self, state: RunState) -> tuple[str, str | None]:
        raise NotImplementedError("evolutionary is being written")

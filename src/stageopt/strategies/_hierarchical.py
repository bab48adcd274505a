"""Hierarchical BO: stage-wise phase on half the budget, then joint TPE warm-started with the stage optima."""

from __future__ import annotations

from stageopt.strategies._base import BaseStageOptimizer, RunState


class HierarchicalBayesian(BaseStageOptimizer):
    """Hierarchical BO: stage-wise phase on half the budget, then joint TPE warm-started with the stage optima. (being written)."""

    strategy_name = "hierarchical"

    def _search(self, state: RunState) -> tuple[str, str | None]:
        raise NotImplementedError("hierarchical is being written")

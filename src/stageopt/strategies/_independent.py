"""Decomposition: each stage optimized on its own (stage metric where defined), optima combined."""

from __future__ import annotations

from stageopt.strategies._base import BaseStageOptimizer, RunState


class IndependentStages(BaseStageOptimizer):
    """Decomposition: each stage optimized on its own (stage metric where defined), optima combined. (being written)."""

    strategy_name = "independent"

    def _search(self, state: RunState) -> tuple[str, str | None]:
        raise NotImplementedError("independent is being written")

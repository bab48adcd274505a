"""Multi-fidelity successive halving across validation subsets (paired), promoting only the best."""

from __future__ import annotations

from stageopt.strategies._base import BaseStageOptimizer, RunState


class SuccessiveHalving(BaseStageOptimizer):
    """Multi-fidelity successive halving across validation subsets (paired), promoting only the best. (being written)."""

    strategy_name = "multifidelity"

    def _search(self, state: RunState) -> tuple[str, str | None]:
        raise NotImplementedError("multifidelity is being written")

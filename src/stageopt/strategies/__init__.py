"""Search strategies across stages, all DSPy Teleprompters sharing one machinery."""

from stageopt.strategies._base import BaseStageOptimizer, RunState, StopSearch, check_metric
from stageopt.strategies._coordinate import CoordinateDescent
from stageopt.strategies._result import SCHEMA_VERSION, OptimizationResult, TrialRecord
from stageopt.strategies._space import SearchSpace, StageCandidates, config_key

STRATEGIES: dict[str, type[BaseStageOptimizer]] = {"coordinate": CoordinateDescent}


def get_strategy(name: str) -> type[BaseStageOptimizer]:
    """The optimizer class registered as ``name``; raises listing the known names."""
    from stageopt._errors import ConfigurationError

    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigurationError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


__all__ = [
    "SCHEMA_VERSION",
    "STRATEGIES",
    "BaseStageOptimizer",
    "CoordinateDescent",
    "OptimizationResult",
    "RunState",
    "SearchSpace",
    "StageCandidates",
    "StopSearch",
    "TrialRecord",
    "check_metric",
    "config_key",
    "get_strategy",
]

"""Search strategies across stages, all DSPy Teleprompters sharing one machinery."""

from stageopt.strategies._allocation import BlameAllocation
from stageopt.strategies._base import BaseStageOptimizer
from stageopt.strategies._checks import check_metric
from stageopt.strategies._constraints import Limits, TrialMeasures, measure
from stageopt.strategies._coordinate import CoordinateDescent
from stageopt.strategies._evolutionary import Evolutionary
from stageopt.strategies._grid import GridSearch
from stageopt.strategies._hierarchical import HierarchicalBayesian
from stageopt.strategies._independent import IndependentStages
from stageopt.strategies._joint import JointBayesian
from stageopt.strategies._multifidelity import SuccessiveHalving
from stageopt.strategies._pareto import Pareto, ParetoFront, ParetoPoint, ParetoRule, hypervolume, pick
from stageopt.strategies._pbt import PopulationBasedTraining
from stageopt.strategies._racing import Racing
from stageopt.strategies._random import RandomSearch
from stageopt.strategies._result import SCHEMA_VERSION, OptimizationResult, TrialRecord
from stageopt.strategies._softprompt import SoftPrompt
from stageopt.strategies._softprompt_schedule import TrainingSchedule
from stageopt.strategies._space import SearchSpace, StageCandidates, config_key
from stageopt.strategies._state import RunState, ScoredConfig, StopSearch
from stageopt.strategies._structure import STRUCTURE, StructuredProgram, StructureKnobs, StructureSpace
from stageopt.strategies._warmstart import WarmStart

#: Every strategy by its CLI name (``--strategy NAME``).
STRATEGIES: dict[str, type[BaseStageOptimizer]] = {
    cls.strategy_name: cls
    for cls in (
        IndependentStages,
        CoordinateDescent,
        JointBayesian,
        HierarchicalBayesian,
        SuccessiveHalving,
        Evolutionary,
        RandomSearch,
        GridSearch,
        PopulationBasedTraining,
        Pareto,
    )
}

#: Strategies that train continuous parameters with torch (``pip install 'stageopt[train]'``), by CLI
#: name. Kept apart from :data:`STRATEGIES`: they search no instructions or demos, so the discrete
#: strategies' contract (and ``compare``/``bench`` with ``all``) does not apply to them.
TRAINING_STRATEGIES: dict[str, type[BaseStageOptimizer]] = {SoftPrompt.strategy_name: SoftPrompt}


def get_strategy(name: str) -> type[BaseStageOptimizer]:
    """The optimizer class registered as ``name``; raises listing the known names."""
    from stageopt._errors import ConfigurationError

    known = {**STRATEGIES, **TRAINING_STRATEGIES}
    try:
        return known[name]
    except KeyError:
        raise ConfigurationError(f"unknown strategy {name!r}; known: {', '.join(sorted(known))}") from None


__all__ = [
    "SCHEMA_VERSION",
    "STRATEGIES",
    "STRUCTURE",
    "TRAINING_STRATEGIES",
    "BaseStageOptimizer",
    "BlameAllocation",
    "CoordinateDescent",
    "Evolutionary",
    "GridSearch",
    "HierarchicalBayesian",
    "IndependentStages",
    "JointBayesian",
    "Limits",
    "OptimizationResult",
    "Pareto",
    "ParetoFront",
    "ParetoPoint",
    "ParetoRule",
    "PopulationBasedTraining",
    "Racing",
    "RandomSearch",
    "RunState",
    "ScoredConfig",
    "SearchSpace",
    "SoftPrompt",
    "StageCandidates",
    "StopSearch",
    "StructureKnobs",
    "StructureSpace",
    "StructuredProgram",
    "SuccessiveHalving",
    "TrainingSchedule",
    "TrialMeasures",
    "TrialRecord",
    "WarmStart",
    "check_metric",
    "config_key",
    "get_strategy",
    "hypervolume",
    "measure",
    "pick",
]

"""stageopt: optimize multi-stage language-model programs written with DSPy."""

import os

# Keep LiteLLM from fetching its model cost map over the network when dspy imports it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from stageopt._errors import (
    BudgetExhaustedError,
    ConfigurationError,
    ContextWindowError,
    DataError,
    EvaluationError,
    ModelNotAvailableError,
    RunInProgressError,
    StageoptError,
    StorageUnavailableError,
)
from stageopt.evaluation import Budget, EvaluationReport, evaluate
from stageopt.lm import LocalLM, SmallLMAdapter, resolve_lm
from stageopt.strategies import (
    CoordinateDescent,
    Limits,
    OptimizationResult,
    Pareto,
    ParetoRule,
    SoftPrompt,
    TrainingSchedule,
    get_strategy,
)
from stageopt.tasks import get_task

__all__ = [
    "Budget",
    "BudgetExhaustedError",
    "ConfigurationError",
    "ContextWindowError",
    "CoordinateDescent",
    "DataError",
    "EvaluationError",
    "EvaluationReport",
    "Limits",
    "LocalLM",
    "ModelNotAvailableError",
    "OptimizationResult",
    "Pareto",
    "ParetoRule",
    "RunInProgressError",
    "SmallLMAdapter",
    "SoftPrompt",
    "StageoptError",
    "StorageUnavailableError",
    "TrainingSchedule",
    "evaluate",
    "get_strategy",
    "get_task",
    "resolve_lm",
]

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
    StageoptError,
)

__all__ = [
    "BudgetExhaustedError",
    "ConfigurationError",
    "ContextWindowError",
    "DataError",
    "EvaluationError",
    "ModelNotAvailableError",
    "StageoptError",
]

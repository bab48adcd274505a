"""Language-model backends: the embedded llama.cpp models and the small-model adapter."""

from stageopt.lm._adapter import SmallLMAdapter, parse_completion
from stageopt.lm._llamacpp import EngineStats, LlamaCppEngine, LocalLM, available_cores
from stageopt.lm._registry import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel, embedded_model
from stageopt.lm._resolve import default_adapter, resolve_lm

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "EngineStats",
    "LlamaCppEngine",
    "LocalLM",
    "SmallLMAdapter",
    "available_cores",
    "default_adapter",
    "embedded_model",
    "parse_completion",
    "resolve_lm",
]

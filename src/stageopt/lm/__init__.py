"""Language-model backends: the embedded llama.cpp models and the small-model adapter."""

from stageopt.lm._adapter import SmallLMAdapter, parse_completion
from stageopt.lm._batching import BatchStats
from stageopt.lm._llamacpp import EngineStats, LlamaCppEngine, LocalLM, available_cores
from stageopt.lm._registry import DEFAULT_MODEL, EMBEDDED_MODELS, LAYOUTS, EmbeddedModel, Layout, embedded_model
from stageopt.lm._resolve import default_adapter, resolve_lm
from stageopt.lm._torch import LoraState, SoftPromptState, TorchModel, load_torch_model
from stageopt.lm._torch_io import load_torch_stages, save_torch_stages, torch_stages
from stageopt.lm._torch_lm import TorchEngine, TorchLM
from stageopt.lm._weights import ChunkedWeights, ChunkPart, RequantizedWeights, assemble_chunks, cache_dir

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "LAYOUTS",
    "BatchStats",
    "ChunkPart",
    "ChunkedWeights",
    "EmbeddedModel",
    "EngineStats",
    "Layout",
    "LlamaCppEngine",
    "LocalLM",
    "LoraState",
    "RequantizedWeights",
    "SmallLMAdapter",
    "SoftPromptState",
    "TorchEngine",
    "TorchLM",
    "TorchModel",
    "assemble_chunks",
    "available_cores",
    "cache_dir",
    "default_adapter",
    "embedded_model",
    "load_torch_model",
    "load_torch_stages",
    "parse_completion",
    "resolve_lm",
    "save_torch_stages",
    "torch_stages",
]

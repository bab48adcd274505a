"""Turn a user's ``--lm`` value into a DSPy LM and the adapter that suits it."""

from __future__ import annotations

from typing import Any

import dspy

from stageopt.lm._adapter import SmallLMAdapter
from stageopt.lm._llamacpp import LocalLM
from stageopt.lm._registry import DEFAULT_MODEL, EMBEDDED_MODELS


def resolve_lm(
    spec: str = DEFAULT_MODEL,
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    model_type: str = "chat",
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    parallel: int = 1,
    **kwargs: Any,
) -> dspy.BaseLM:
    """An embedded model by short name (``gemma3-270m``), else a LiteLLM model string.

    An embedded name may end in ``@completion`` or ``@chat`` to choose the prompt layout
    (``qwen2.5-coder-0.5b@completion``); without it the model's measured default is used.
    ``parallel`` is how many requests an embedded model decodes together (the evaluation's
    thread count; see :class:`~stageopt.lm.LlamaCppEngine`); hosted models ignore it.

    LiteLLM strings (``openai/<name>`` with ``api_base``, ``ollama_chat/llama3``, hosted
    models) go to ``dspy.LM`` unchanged; ``max_tokens`` is always sent, since some
    OpenAI-compatible servers ignore ``max_completion_tokens``.
    """
    if spec.partition("@")[0] in EMBEDDED_MODELS or spec.startswith("local/"):
        return LocalLM(spec, max_tokens=max_tokens, temperature=temperature, seed=seed, parallel=parallel, **kwargs)
    options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, **kwargs}
    if api_base:
        options["api_base"] = api_base
        options.setdefault("api_key", api_key or "not-needed")
    elif api_key:
        options["api_key"] = api_key
    return dspy.LM(spec, model_type=model_type, num_retries=2, **options)


def default_adapter(name: str = "small") -> dspy.Adapter:
    """``small`` (plain completion layout), ``chat`` (DSPy's ChatAdapter) or ``json``."""
    adapters: dict[str, type[dspy.Adapter]] = {
        "small": SmallLMAdapter,
        "chat": dspy.ChatAdapter,
        "json": dspy.JSONAdapter,
    }
    if name not in adapters:
        from stageopt._errors import ConfigurationError

        raise ConfigurationError(f"unknown adapter {name!r}; known: {', '.join(adapters)}")
    return adapters[name]()

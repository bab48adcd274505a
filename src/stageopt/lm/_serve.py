"""Serve an embedded model over the OpenAI API with ``llama_cpp.server``.

This is how the LiteLLM path is exercised without any network: ``stageopt serve`` starts
llama-cpp-python's own server on 127.0.0.1, and ``--lm openai/<alias> --api-base
http://127.0.0.1:<port>/v1`` reaches it through ``dspy.LM``. A base model has no chat
template, so the server is given a ``stageopt-raw`` chat format: a single user message is the
completion prompt itself (what :class:`~stageopt.lm.SmallLMAdapter` sends), anything else a plain
``Role: text`` transcript.
"""

from __future__ import annotations

from typing import Any

from stageopt._errors import ModelNotAvailableError
from stageopt.lm._llamacpp import available_cores
from stageopt.lm._registry import embedded_model

RAW_CHAT_FORMAT = "stageopt-raw"


def _register_raw_format() -> None:
    from llama_cpp import llama_chat_format

    if RAW_CHAT_FORMAT in llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers:
        return

    @llama_chat_format.register_chat_format(RAW_CHAT_FORMAT)
    def _raw(messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        texts = [(m.get("role", "user"), m.get("content") or "") for m in messages]
        if len(texts) == 1 and texts[0][0] == "user":
            prompt = str(texts[0][1])
        else:
            prompt = "\n\n".join(f"{role.capitalize()}: {text}" for role, text in texts) + "\n\nAssistant:"
        return llama_chat_format.ChatFormatterResponse(prompt=prompt)


def build_app(model: str, *, alias: str | None = None, n_ctx: int | None = None, n_threads: int | None = None) -> Any:
    """The FastAPI app of ``llama_cpp.server`` serving embedded ``model`` as ``alias``."""
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise ModelNotAvailableError(
            "serving needs llama-cpp-python's server extra: run `pip install 'llama-cpp-python[server]'`"
        ) from exc
    spec = embedded_model(model)
    chat_format = None if spec.chat else RAW_CHAT_FORMAT
    _register_raw_format()
    settings = ModelSettings(
        model=str(spec.path()),
        model_alias=alias or spec.name,
        n_ctx=n_ctx or spec.n_ctx,
        n_threads=n_threads or available_cores(),
        chat_format=chat_format,
        verbose=False,
    )
    return create_app(server_settings=ServerSettings(), model_settings=[settings])


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    alias: str | None = None,
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = build_app(model, alias=alias, n_ctx=n_ctx, n_threads=n_threads)
    uvicorn.run(app, host=host, port=port, log_level="warning")

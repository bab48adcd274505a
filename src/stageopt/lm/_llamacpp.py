"""In-process llama.cpp backend for DSPy: an lm15 engine plus the ``LocalLM`` that uses it.

The engine renders a request to text, runs llama-cpp-python on the CPU and returns an
``lm15.Response`` with token usage and latency. DSPy's ``LM`` around it supplies the response
cache, history, callbacks and usage tracking, exactly as for hosted models.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from stageopt._errors import ContextWindowError, ModelNotAvailableError
from stageopt.lm._registry import DEFAULT_MODEL, EmbeddedModel, embedded_model

logger = logging.getLogger(__name__)

#: Bytes of llama.cpp state kept in RAM to reuse shared prompt prefixes (instruction + demos).
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@dataclass
class _Loaded:
    """One loaded model shared by every engine that names it; ``lock`` serialises calls."""

    llama: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


_LOADED: dict[tuple[str, int, int], _Loaded] = {}
_LOAD_LOCK = threading.Lock()


def _load(spec: EmbeddedModel, n_ctx: int, n_threads: int, prefix_cache_bytes: int) -> _Loaded:
    key = (spec.name, n_ctx, n_threads)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        try:
            import llama_cpp
        except ImportError as exc:
            raise ModelNotAvailableError(
                "the embedded backend needs llama-cpp-python: run `pip install 'stageopt[local]'`"
            ) from exc
        path = spec.path()
        logger.info("loading %s from %s (n_ctx=%d, n_threads=%d)", spec.name, path, n_ctx, n_threads)
        llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_batch=512, seed=0, verbose=False
        )
        if prefix_cache_bytes > 0:
            llama.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=prefix_cache_bytes))
        _LOADED[key] = _Loaded(llama)
        return _LOADED[key]


@dataclass
class EngineStats:
    """Backend work done by one engine: calls that reached the model, tokens and seconds."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class LlamaCppEngine:
    """An lm15 engine (``complete(Request) -> Response``) running a GGUF model in-process.

    A request with a single user message and no system text is sent as a raw completion
    prompt (the layout :class:`stageopt.lm.SmallLMAdapter` produces). Anything else is rendered
    with the model's chat template when it has one, or as a plain ``Role: text`` transcript.

    Invariants: ``max_tokens`` and the stop sequences of the request are always passed to
    llama.cpp; a prompt that leaves no room for ``max_tokens`` raises
    :class:`~stageopt.ContextWindowError` instead of being truncated; calls on one loaded model
    are serialised by its lock, so the engine is thread-safe.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        seed: int = 0,
        default_max_tokens: int = 256,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        self.spec = embedded_model(model)
        self.n_ctx = n_ctx or self.spec.n_ctx
        self.n_threads = n_threads or available_cores()
        if self.n_ctx < 256:
            raise ValueError(f"`n_ctx` must be at least 256, got {self.n_ctx=}")
        if default_max_tokens <= 0:
            raise ValueError(f"`default_max_tokens` must be positive, got {default_max_tokens=}")
        self.seed = seed
        self.default_max_tokens = default_max_tokens
        self.prefix_cache_bytes = prefix_cache_bytes
        self.stats = EngineStats()
        self._loaded: _Loaded | None = None

    @property
    def loaded(self) -> _Loaded:
        """The shared loaded model, loaded on first use."""
        if self._loaded is None:
            self._loaded = _load(self.spec, self.n_ctx, self.n_threads, self.prefix_cache_bytes)
        return self._loaded

    def render(self, request: Request) -> str | list[dict[str, str]]:
        """Return the raw prompt, or chat messages when the model should apply its template."""
        system = _text(request.system) if request.system is not None else None
        messages = [(m.role, m.text or "") for m in request.messages]
        if system is None and len(messages) == 1 and messages[0][0] == "user":
            return messages[0][1]
        if self.spec.chat:
            chat = [{"role": "system", "content": system}] if system else []
            chat += [{"role": role, "content": text} for role, text in messages]
            return chat
        blocks = [system] if system else []
        blocks += [f"{role.capitalize()}: {text}" for role, text in messages]
        return "\n\n".join(blocks) + "\n\nAssistant:"

    def complete(self, request: Request) -> Response:
        """Run one request; see the class docstring for the invariants."""
        config = request.config
        extensions = config.extensions or {}
        max_tokens = config.max_tokens or self.default_max_tokens
        seed = config.seed if config.seed is not None else extensions.get("seed", self.seed)
        options: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": 0.0 if config.temperature is None else config.temperature,
            "stop": list(config.stop),
            "seed": int(seed),
        }
        if config.top_p is not None:
            options["top_p"] = config.top_p
        rendered = self.render(request)
        loaded = self.loaded
        with loaded.lock:
            start = time.perf_counter()
            if isinstance(rendered, str):
                self._check_fits(loaded.llama, rendered, max_tokens)
                raw = loaded.llama.create_completion(rendered, **options)
                text = raw["choices"][0]["text"]
            else:
                raw = loaded.llama.create_chat_completion(messages=rendered, **options)
                text = raw["choices"][0]["message"]["content"] or ""
            elapsed = time.perf_counter() - start
        usage = raw.get("usage", {})
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion_tokens = int(usage.get("completion_tokens", 0))
        self.stats.calls += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.seconds += elapsed
        finish = raw["choices"][0].get("finish_reason") or "stop"
        return Response(
            id=None,
            model=self.spec.name,
            message=Message.assistant([TextPart(text)]),
            finish_reason="length" if finish == "length" else "stop",
            usage=Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens),
            provider_data={"latency_s": round(elapsed, 6), "backend": "llama.cpp"},
        )

    def _check_fits(self, llama: Any, prompt: str, max_tokens: int) -> None:
        n_prompt = len(llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=False))
        if n_prompt + max_tokens > self.n_ctx:
            raise ContextWindowError(
                f"prompt of {n_prompt} tokens plus max_tokens={max_tokens} exceeds the context window "
                f"of {self.spec.name} ({self.n_ctx} tokens); use fewer or shorter demos/passages, "
                "or a larger n_ctx"
            )

    def stream(self, request: Request) -> Any:
        """Stream one request (the whole response as one event sequence)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to release per engine: loaded models are shared for the process's life."""

    def dump_state(self) -> dict[str, Any]:
        """JSON state to rebuild the engine when a program is loaded."""
        return {
            "model": self.spec.name,
            "n_ctx": self.n_ctx,
            "seed": self.seed,
            "default_max_tokens": self.default_max_tokens,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LlamaCppEngine:
        """Inverse of :meth:`dump_state`."""
        return cls(**state)


def _text(system: Any) -> str:
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") for part in system)


class LocalLM(dspy.LM):
    """A DSPy LM running an embedded model in-process (``LocalLM("gemma3-270m")``).

    It is a regular ``dspy.LM`` with a :class:`LlamaCppEngine`, so DSPy's cache, history and
    usage tracking work as for any other model. ``max_tokens`` and stop sequences are always
    sent; sampling is seeded.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        temperature: float = 0.0,
        max_tokens: int = 128,
        cache: bool = True,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        seed: int = 0,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        **kwargs: Any,
    ) -> None:
        if model.startswith("local/"):
            model = model.removeprefix("local/")
        engine = kwargs.pop("engine", None) or LlamaCppEngine(
            model,
            n_ctx=n_ctx,
            n_threads=n_threads,
            seed=seed,
            default_max_tokens=max_tokens,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        super().__init__(
            f"local/{engine.spec.name}",
            model_type="chat",
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            engine=engine,
            num_retries=0,
            **kwargs,
        )

    @property
    def local_engine(self) -> LlamaCppEngine:
        """The engine, for its :class:`EngineStats`."""
        engine = self.engine
        assert isinstance(engine, LlamaCppEngine)
        return engine

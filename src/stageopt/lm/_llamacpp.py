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

from stageopt._errors import ConfigurationError, ContextWindowError, ModelNotAvailableError
from stageopt.lm._batching import Batcher, BatchStats
from stageopt.lm._llamalog import route_llama_logs
from stageopt.lm._registry import DEFAULT_MODEL, LAYOUTS, EmbeddedModel, Layout, embedded_model

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
    _blank_ids: Any = None
    _chat_formatter: Any = None
    _batchers: dict[tuple[int, int], Batcher] = field(default_factory=dict)

    def batcher(self, slots: int, n_ctx: int) -> Batcher:
        """The batched decoder with ``slots`` sequences of ``n_ctx`` tokens, opened on first use."""
        key = (slots, n_ctx)
        with _LOAD_LOCK:
            if key not in self._batchers:
                self._batchers[key] = Batcher(self.llama, slots=slots, n_ctx=n_ctx, lock=self.lock)
            return self._batchers[key]

    def chat_formatter(self) -> Any:
        """The GGUF's own chat template as llama-cpp-python's Jinja2 formatter (None without one)."""
        if self._chat_formatter is None:
            template = self.llama.metadata.get("tokenizer.chat_template")
            if not template:
                return None
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def token_text(token: int) -> str:
                return str(self.llama._model.token_get_text(token)) if token != -1 else ""

            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=token_text(self.llama.token_eos()),
                bos_token=token_text(self.llama.token_bos()),
                add_generation_prompt=True,
            )
        return self._chat_formatter

    def blank_token_ids(self) -> Any:
        """Ids of tokens that are blank or start a new line (special tokens and EOS included)."""
        if self._blank_ids is None:
            import numpy as np

            ids = []
            for token in range(self.llama.n_vocab()):
                piece = self.llama.detokenize([token])
                if not piece.strip(b" \t") or piece.lstrip(b" \t")[:1] in (b"\n", b"\r"):
                    ids.append(token)
            self._blank_ids = np.array(ids, dtype=np.int64)
        return self._blank_ids


_LOADED: dict[tuple[str, int, int], _Loaded] = {}
#: Guards every engine's EngineStats (module-level: an engine stays deep-copyable).
_STATS_LOCK = threading.Lock()
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
        route_llama_logs()
        path = spec.path()
        logger.info("loading %s from %s (n_ctx=%d, n_threads=%d)", spec.name, path, n_ctx, n_threads)
        llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_batch=512, seed=0, verbose=False
        )
        if prefix_cache_bytes > 0:
            llama.set_cache(_slim_ram_cache(prefix_cache_bytes))
        _LOADED[key] = _Loaded(llama)
        return _LOADED[key]


def _slim_ram_cache(capacity_bytes: int) -> Any:
    """llama.cpp's RAM prefix cache without the logits copy it keeps per entry.

    ``Llama.save_state`` copies the whole logits buffer (512 x 262k floats = 512 MiB for Gemma)
    into every cached state, and ``LlamaRAMCache`` does not count it against its capacity: a
    50-example HotpotQA run grew past 20 GB. Without ``logits_all`` sampling never reads those
    logits back, so each entry keeps a one-row placeholder (it broadcasts on ``load_state``) and
    the capacity counts every byte an entry holds.
    """
    import llama_cpp
    import numpy as np

    class SlimRAMCache(llama_cpp.LlamaRAMCache):
        @property
        def cache_size(self) -> int:
            return sum(s.llama_state_size + s.scores.nbytes + s.input_ids.nbytes for s in self.cache_state.values())

        def __setitem__(self, key: Any, value: Any) -> None:
            placeholder = np.zeros((1, value.scores.shape[1]), dtype=np.single)
            slim = llama_cpp.LlamaState(
                input_ids=value.input_ids,
                scores=placeholder,
                n_tokens=value.n_tokens,
                llama_state=value.llama_state,
                llama_state_size=value.llama_state_size,
                seed=value.seed,
            )
            super().__setitem__(key, slim)

    return SlimRAMCache(capacity_bytes=capacity_bytes)


@dataclass
class EngineStats:
    """Backend work done by one engine: calls that reached the model, tokens and seconds."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class LlamaCppEngine:
    """An lm15 engine (``complete(Request) -> Response``) running a GGUF model in-process.

    A request with a single user message and no system text is a plain completion prompt (the
    layout :class:`stageopt.lm.SmallLMAdapter` produces). With ``layout="completion"`` it is sent
    as it is; with ``layout="chat"`` (for instruct models) it is wrapped in the GGUF's own chat
    template: everything before the prompt's last line is the user's turn, and the last line (the
    first output field's label, ``Answer:``) opens the assistant's turn, so the completion still
    continues right after the label and parses the same way. The layout is the model's default
    (:attr:`EmbeddedModel.layout`) unless the engine names one. Anything else is rendered with
    the model's chat template when it has one, or as a plain ``Role: text`` transcript.

    A request with a ``"\n"`` stop sequence asks for one line of text, so its first token may
    not be blank, a newline or end-of-text: without that rule small base models often answer a
    one-line field with an empty line and go on to invent the next example.

    Invariants: ``max_tokens`` and the stop sequences of the request are always passed to
    llama.cpp; a prompt that leaves no room for ``max_tokens`` raises
    :class:`~stageopt.ContextWindowError` instead of being truncated; the engine is thread-safe.

    ``parallel``: with 1 (the default) calls on one loaded model are serialised by its lock and
    run one at a time through ``Llama.create_completion``. With ``parallel=N > 1`` completion
    prompts from up to N threads at once (``evaluate(num_threads=N)``, ``--num-threads N``) are
    decoded together by a batcher (``stageopt.lm._batching``): one forward pass per step for
    all of them, each slot keeping its prompt prefix for the next request. Greedy outputs and the
    token counts are those of the serial path; :attr:`batch_stats` reports the passes and the
    prefix cache's hit rate.
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
        layout: Layout | None = None,
        parallel: int = 1,
    ) -> None:
        self.spec = embedded_model(model)
        if parallel < 1:
            raise ConfigurationError(f"`parallel` must be >= 1, got {parallel=}")
        self.parallel = parallel
        self.layout: Layout = _check_layout(layout or self.spec.layout)
        self.n_ctx = n_ctx or self.spec.n_ctx
        self.n_threads = n_threads or available_cores()
        if self.n_ctx < 256:
            raise ConfigurationError(f"`n_ctx` must be at least 256, got {self.n_ctx=}")
        if default_max_tokens <= 0:
            raise ConfigurationError(f"`default_max_tokens` must be positive, got {default_max_tokens=}")
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

    @property
    def batch_stats(self) -> BatchStats | None:
        """The batched decoder's counters (None while ``parallel`` is 1 or nothing ran batched)."""
        if self.parallel == 1 or self._loaded is None:
            return None
        batcher = self._loaded._batchers.get((self.parallel, self.n_ctx))
        return batcher.stats if batcher is not None else None

    def render(self, request: Request) -> str | list[dict[str, str]]:
        """Return the raw prompt, or chat messages when the model should apply its template."""
        system = _text(request.system) if request.system is not None else None
        messages = [(m.role, m.text or "") for m in request.messages]
        if system is None and len(messages) == 1 and messages[0][0] == "user":
            if self.layout == "chat":
                return self._chat_prompt(messages[0][1])
            return messages[0][1]
        if self.spec.chat:
            chat = [{"role": "system", "content": system}] if system else []
            chat += [{"role": role, "content": text} for role, text in messages]
            return chat
        blocks = [system] if system else []
        blocks += [f"{role.capitalize()}: {text}" for role, text in messages]
        return "\n\n".join(blocks) + "\n\nAssistant:"

    def _chat_prompt(self, prompt: str) -> str:
        formatter = self.loaded.chat_formatter()
        if formatter is None:
            raise ConfigurationError(
                f"layout 'chat' needs a chat template, and the GGUF of {self.spec.name} has none; "
                "use layout='completion'"
            )
        head, _, last = prompt.rstrip().rpartition("\n")
        if not head:
            head, last = prompt, ""
        rendered = formatter(messages=[{"role": "user", "content": head.rstrip()}]).prompt
        return f"{rendered}{last}"

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
        line_stop = "\n" in options["stop"]
        if isinstance(rendered, str) and self.parallel > 1:
            batcher = loaded.batcher(self.parallel, self.n_ctx)
            tokens = batcher.prompt_tokens(rendered)
            self._check_length(len(tokens), max_tokens)
            start = time.perf_counter()
            done = batcher.complete(
                tokens,
                max_tokens=max_tokens,
                stop=options["stop"],
                temperature=options["temperature"],
                top_p=options.get("top_p", 0.95),
                seed=options["seed"],
                first_mask=loaded.blank_token_ids() if line_stop else None,
            )
            elapsed = time.perf_counter() - start
            text, finish = done.text, done.finish_reason
            raw: dict[str, Any] = {
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}
            }
        else:
            with loaded.lock:
                start = time.perf_counter()
                if isinstance(rendered, str):
                    self._check_fits(loaded.llama, rendered, max_tokens)
                    if line_stop:
                        options["logits_processor"] = _no_blank_start(loaded)
                    raw = loaded.llama.create_completion(rendered, **options)
                    text = raw["choices"][0]["text"]
                else:
                    raw = loaded.llama.create_chat_completion(messages=rendered, **options)
                    text = raw["choices"][0]["message"]["content"] or ""
                elapsed = time.perf_counter() - start
            finish = raw["choices"][0].get("finish_reason") or "stop"
        usage = raw.get("usage", {})
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion_tokens = int(usage.get("completion_tokens", 0))
        with _STATS_LOCK:  # batched calls finish on several threads at once
            self.stats.calls += 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self.stats.seconds += elapsed
        return Response(
            id=None,
            model=self.spec.name,
            message=Message.assistant([TextPart(text)]),
            finish_reason="length" if finish == "length" else "stop",
            usage=Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens),
            provider_data={"latency_s": round(elapsed, 6), "backend": "llama.cpp"},
        )

    def _check_fits(self, llama: Any, prompt: str, max_tokens: int) -> None:
        self._check_length(len(llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)), max_tokens)

    def _check_length(self, n_prompt: int, max_tokens: int) -> None:
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
            "layout": self.layout,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LlamaCppEngine:
        """Inverse of :meth:`dump_state`."""
        return cls(**state)


def _check_layout(layout: str) -> Layout:
    if layout not in LAYOUTS:
        raise ConfigurationError(f"`layout` must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout  # type: ignore[return-value]


def _no_blank_start(loaded: _Loaded) -> Any:
    """A llama.cpp logits processor forbidding a blank first token (see LlamaCppEngine).

    llama.cpp calls it once per sampled token, so its first call is the first token.
    """
    import llama_cpp

    blank = loaded.blank_token_ids()
    calls = 0

    def processor(input_ids: Any, scores: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            scores[blank] = -float("inf")
        return scores

    return llama_cpp.LogitsProcessorList([processor])


def _text(system: Any) -> str:
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") for part in system)


class LocalLM(dspy.LM):
    """A DSPy LM running an embedded model in-process (``LocalLM("gemma3-270m")``).

    It is a regular ``dspy.LM`` with a :class:`LlamaCppEngine`, so DSPy's cache, history and
    usage tracking work as for any other model. ``max_tokens`` and stop sequences are always
    sent; sampling is seeded. A layout other than the model's default is part of the model
    string (``local/qwen2.5-coder-0.5b@completion``; ``--lm qwen2.5-coder-0.5b@completion``), so
    DSPy's cache keys the two layouts apart.
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
        layout: Layout | None = None,
        parallel: int = 1,
        **kwargs: Any,
    ) -> None:
        model = model.removeprefix("local/")
        if "@" in model:
            model, _, named = model.partition("@")
            layout = layout or _check_layout(named)
        engine = kwargs.pop("engine", None) or LlamaCppEngine(
            model,
            n_ctx=n_ctx,
            n_threads=n_threads,
            seed=seed,
            default_max_tokens=max_tokens,
            prefix_cache_bytes=prefix_cache_bytes,
            layout=layout,
            parallel=parallel,
        )
        suffix = "" if engine.layout == engine.spec.layout else f"@{engine.layout}"
        super().__init__(
            f"local/{engine.spec.name}{suffix}",
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

"""Counting LM calls per stage: a metering proxy around any DSPy LM and a per-example recorder."""

from __future__ import annotations

import contextvars
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from dspy.dsp.utils.settings import settings

from stageopt.evaluation._budget import BudgetLedger


@dataclass
class StageCall:
    """One LM call made while running one example."""

    stage: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    parse_ok: bool = True
    error: str | None = None
    #: Characters of the completion text (all choices together); 0 when the call failed.
    output_chars: int = 0
    #: The model that answered (the wrapped LM's ``model`` name), for per-model prices.
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


@dataclass
class ExampleRecorder:
    """Collects the :class:`StageCall` records of one example as it runs.

    ``stage_names`` maps ``id(predictor)`` to the stage name, for the program being run.
    """

    stage_names: dict[int, str]
    calls: list[StageCall] = field(default_factory=list)

    def stage_of_current_call(self) -> str | None:
        """The innermost running module that is a stage of the program."""
        for module in reversed(settings.caller_modules or []):
            name = self.stage_names.get(id(module))
            if name is not None:
                return name
        return None

    def mark_parse(self, ok: bool) -> None:
        """Record the parse outcome of the latest call (called by the adapter)."""
        if self.calls and not ok:
            self.calls[-1].parse_ok = False


_RECORDER: contextvars.ContextVar[ExampleRecorder | None] = contextvars.ContextVar("stageopt_recorder", default=None)


def active_recorder() -> ExampleRecorder | None:
    """The recorder of the example running in this context, if any."""
    return _RECORDER.get()


def set_recorder(recorder: ExampleRecorder | None) -> contextvars.Token[ExampleRecorder | None]:
    """Install ``recorder`` in the current context; returns the token for :func:`reset_recorder`."""
    return _RECORDER.set(recorder)


def reset_recorder(token: contextvars.Token[ExampleRecorder | None]) -> None:
    """Undo :func:`set_recorder`."""
    _RECORDER.reset(token)


class _HistorySink:
    """Receives DSPy's history entry of exactly one LM call (it joins ``caller_modules``)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []


def _usage_of(entry: dict[str, Any] | None) -> tuple[int, int, bool]:
    """(prompt tokens, completion tokens, cache hit) of one DSPy history entry."""
    if entry is None:
        return 0, 0, False
    usage = entry.get("usage") or {}
    if usage:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), False
    # A cache hit carries no billed usage; the cached response still knows its token counts.
    response = entry.get("response")
    response_usage = getattr(response, "usage", None)
    if response_usage is not None and hasattr(response_usage, "input_tokens"):
        return int(response_usage.input_tokens or 0), int(response_usage.output_tokens or 0), True
    return 0, 0, True


def _output_chars(outputs: Any) -> int:
    """Characters of the text in an LM's outputs (a list of strings or of ``{"text": ...}`` dicts)."""
    if isinstance(outputs, str):
        return len(outputs)
    if isinstance(outputs, dict):
        return len(str(outputs.get("text") or ""))
    if isinstance(outputs, list | tuple):
        return sum(_output_chars(item) for item in outputs)
    text = getattr(outputs, "text", None)  # a response object
    return len(text) if isinstance(text, str) else 0


class MeteredLM(dspy.BaseLM):
    """A proxy that meters every call of the wrapped LM against a :class:`BudgetLedger`.

    Each call is reserved in the ledger before it is sent (raising
    :class:`~stageopt.BudgetExhaustedError` when the budget is spent), then its tokens, latency
    and cache status are added to the ledger and to the active :class:`ExampleRecorder`.
    Everything else (kwargs, model name, capabilities) is the wrapped LM's.
    """

    def __init__(self, inner: dspy.BaseLM, ledger: BudgetLedger) -> None:
        # BaseLM.__init__ is not called on purpose: attributes resolve to the wrapped LM.
        self.inner = inner
        self.ledger = ledger
        self.callbacks: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    @property
    def supports_function_calling(self) -> bool:
        return bool(self.inner.supports_function_calling)

    @property
    def supports_reasoning(self) -> bool:
        return bool(self.inner.supports_reasoning)

    @property
    def supports_response_schema(self) -> bool:
        return bool(self.inner.supports_response_schema)

    @property
    def supported_params(self) -> set[str]:
        return set(self.inner.supported_params)

    def copy(self, **kwargs: Any) -> MeteredLM:
        """A metered copy of the wrapped LM's copy, on the same ledger."""
        return MeteredLM(self.inner.copy(**kwargs), self.ledger)

    def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        self.ledger.reserve()
        recorder = _RECORDER.get()
        record = StageCall(
            stage=recorder.stage_of_current_call() if recorder else None,
            model=getattr(self.inner, "model", None),
        )
        if recorder is not None:
            recorder.calls.append(record)
        sink = _HistorySink()
        start = time.perf_counter()
        try:
            with dspy.context(caller_modules=[*(settings.caller_modules or []), sink]):
                outputs = self.inner(prompt, messages=messages, **kwargs)
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            record.latency_s = time.perf_counter() - start
            prompt_tokens, completion_tokens, cached = _usage_of(sink.history[-1] if sink.history else None)
            record.prompt_tokens, record.completion_tokens, record.cached = (
                prompt_tokens,
                completion_tokens,
                cached,
            )
            self.ledger.record(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached=cached)
        record.output_chars = _output_chars(outputs)
        return outputs

    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        """Async calls run the synchronous path: the meter's accounting is the same."""
        return self(prompt, messages=messages, **kwargs)

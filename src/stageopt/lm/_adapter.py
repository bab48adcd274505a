"""A DSPy adapter that small and base models can follow: a plain completion layout.

Layout (one user message, sent as a raw completion prompt by the embedded engine)::

    <instruction>

    ---

    Question: <demo input>
    Answer: <demo output>

    ---

    Question: <input>
    Answer:

The prompt ends with the first output field's label, so the model only has to continue with
the value. Stop sequences end the completion at the next block; parsing tolerates near-miss
field markers (``**Answer**:``, ``[[ ## answer ## ]]``, different case) and trailing text.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import dspy
from dspy.signatures.signature import Signature

from stageopt._errors import ConfigurationError

logger = logging.getLogger(__name__)

SEPARATOR = "---"

#: Output fields whose values may span lines; every other output field is cut at its first line.
MULTILINE_FIELDS = frozenset({"reasoning", "rationale", "code", "solution", "plan", "steps"})

#: Called with (signature, ok) after every parse; the evaluation engine installs one per example.
ParseListener = Callable[[type[Signature], bool], None]
_PARSE_LISTENER: contextvars.ContextVar[ParseListener | None] = contextvars.ContextVar(
    "stageopt_parse_listener", default=None
)


def set_parse_listener(listener: ParseListener | None) -> contextvars.Token[ParseListener | None]:
    """Install ``listener`` for the current context; returns the token to reset it."""
    return _PARSE_LISTENER.set(listener)


def reset_parse_listener(token: contextvars.Token[ParseListener | None]) -> None:
    """Undo :func:`set_parse_listener`."""
    _PARSE_LISTENER.reset(token)


def label(name: str) -> str:
    """The label shown to the model: ``passages`` -> ``Passages``, ``gold_titles`` -> ``Gold titles``."""
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _marker(name: str) -> re.Pattern[str]:
    # Matches a line that starts a field, leniently: "Answer:", "**Answer**:", "[[ ## answer ## ]]",
    # "answer -", with any case and surrounding markup.
    words = r"[\s_]+".join(re.escape(w) for w in name.replace("_", " ").split())
    return re.compile(
        rf"(?im)^[ \t>*#\[\]`_-]*{words}[ \t*#\]`_]*(?::|-\s|\]\]|$)[ \t]*",
    )


class SmallLMAdapter(dspy.Adapter):
    """Plain completion layout, stop sequences and lenient parsing for small/base models.

    Args:
        max_demo_chars: Truncate each demo field value to this many characters (None: no limit).
            Shorter demos mean shorter prompts, which is most of a small model's latency.
        callbacks: DSPy adapter callbacks.

    Parse policy: a completion always yields every output field. When a field cannot be found
    (e.g. an empty completion, or a chain-of-thought that never reached ``Answer:``) the value is
    salvaged (empty string, or the last line of the text) and the parse counts as a failure:
    :attr:`parse_failures` and the active parse listener (the evaluation's per-stage trace) see it.
    """

    def __init__(self, *, max_demo_chars: int | None = None, callbacks: list[Any] | None = None) -> None:
        super().__init__(callbacks=callbacks)
        if max_demo_chars is not None and max_demo_chars <= 0:
            raise ConfigurationError(f"`max_demo_chars` must be positive or None, got {max_demo_chars=}")
        self.max_demo_chars = max_demo_chars
        self._lock = threading.Lock()
        self.parses = 0
        self.parse_failures = 0

    # ---- formatting -------------------------------------------------------------------------

    def format(
        self, signature: type[Signature], demos: list[dict[str, Any]], inputs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Render one raw-completion prompt as a single user message."""
        blocks = []
        instruction = (signature.instructions or "").strip()
        if instruction:
            blocks.append(instruction)
        for demo in demos:
            rendered = self._format_demo(signature, demo)
            if rendered:
                blocks.append(rendered)
        current = [self._field_line(name, inputs.get(name)) for name in signature.input_fields]
        first_output = next(iter(signature.output_fields))
        current.append(f"{label(first_output)}:")
        blocks.append("\n".join(current))
        return [{"role": "user", "content": f"\n\n{SEPARATOR}\n\n".join(blocks)}]

    def _format_demo(self, signature: type[Signature], demo: dict[str, Any]) -> str | None:
        names = [*signature.input_fields, *signature.output_fields]
        # A demo is shown only when it is complete: partial demos confuse small models.
        if any(demo.get(name) in (None, "") for name in names):
            return None
        return "\n".join(self._field_line(name, demo[name], demo=True) for name in names)

    def _field_line(self, name: str, value: Any, *, demo: bool = False) -> str:
        text = _stringify(value)
        if demo and self.max_demo_chars is not None and len(text) > self.max_demo_chars:
            text = text[: self.max_demo_chars].rstrip() + " ..."
        separator = "\n" if "\n" in text else " "
        return f"{label(name)}:{separator}{text}"

    def stop_sequences(self, signature: type[Signature]) -> list[str]:
        """Where a completion must end: the next block, an echoed input field, or end of line."""
        stops = [f"\n{SEPARATOR}", "\n\n\n"]
        stops += [f"\n{label(name)}:" for name in signature.input_fields]
        outputs = list(signature.output_fields)
        if len(outputs) == 1 and outputs[0] not in MULTILINE_FIELDS:
            stops.append("\n")
        return _cap(stops)

    # ---- calling ----------------------------------------------------------------------------

    def __call__(
        self,
        lm: dspy.BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """Format, call the LM with stop sequences, and parse every completion."""
        kwargs = {**lm_kwargs, "stop": self.stop_sequences(signature)}
        messages = self.format(signature, demos, inputs)
        outputs = lm(messages=messages, **kwargs)
        return [self.parse(signature, _output_text(output)) for output in outputs]

    async def acall(
        self,
        lm: dspy.BaseLM,
        lm_kwargs: dict[str, Any],
        signature: type[Signature],
        demos: list[dict[str, Any]],
        inputs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """Async twin of :meth:`__call__`."""
        kwargs = {**lm_kwargs, "stop": self.stop_sequences(signature)}
        messages = self.format(signature, demos, inputs)
        outputs = await lm.acall(messages=messages, **kwargs)
        return [self.parse(signature, _output_text(output)) for output in outputs]

    # ---- parsing ----------------------------------------------------------------------------

    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        """Split ``completion`` into the output fields; see the class docstring for the policy."""
        values, ok = parse_completion(signature, completion or "")
        with self._lock:
            self.parses += 1
            self.parse_failures += 0 if ok else 1
        listener = _PARSE_LISTENER.get()
        if listener is not None:
            listener(signature, ok)
        if not ok:
            logger.debug("salvaged unparsable completion %r for %s", completion[:200], list(values))
        return values


def _cap(stops: list[str]) -> list[str]:
    # OpenAI-compatible servers accept at most four stop sequences: keep the most useful ones.
    ordered = list(dict.fromkeys(stops))
    if "\n" in ordered:
        return ["\n", *[s for s in ordered if s != "\n"]][:4]
    return ordered[:4]


def parse_completion(signature: type[Signature], completion: str) -> tuple[dict[str, Any], bool]:
    """Parse a completion that continues after the first output field's label.

    Returns the field values and whether every field was found with a non-empty value.
    """
    outputs = list(signature.output_fields)
    text = completion.replace("\r\n", "\n")
    # The model may echo the first label ("Answer: Paris"): drop it.
    echoed = _marker(outputs[0]).match(text.lstrip())
    if echoed:
        text = text.lstrip()[echoed.end() :]
    # Cut at any echoed input field: what follows is the model inventing a new example.
    for name in signature.input_fields:
        found = _marker(name).search(text)
        if found and found.start() > 0:
            text = text[: found.start()]
    spans: list[tuple[str, int, int]] = [(outputs[0], 0, 0)]  # (field, value start, marker start)
    cursor = 0
    for name in outputs[1:]:
        found = _marker(name).search(text, cursor)
        if found is None:
            continue
        spans.append((name, found.end(), found.start()))
        cursor = found.end()
    values: dict[str, Any] = {}
    for i, (name, start, _) in enumerate(spans):
        end = spans[i + 1][2] if i + 1 < len(spans) else len(text)
        values[name] = _clean(name, text[start:end])
    ok = all(values.get(name) for name in outputs)
    if not ok:
        fallback = _last_line(text)
        for name in outputs:
            if not values.get(name):
                values[name] = fallback if name == outputs[-1] else values.get(name, "")
    return values, ok


def _clean(name: str, value: str) -> str:
    value = value.strip()
    if name not in MULTILINE_FIELDS:
        value = next((line.strip() for line in value.split("\n") if line.strip()), "")
    return value.strip().strip("*").strip()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
    return lines[-1] if lines else ""


def _output_text(output: Any) -> str:
    if isinstance(output, dict):
        return str(output.get("text") or "")
    return str(output or "")


def _stringify(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\n".join(_stringify(v) for v in value)
    return str(value).strip()

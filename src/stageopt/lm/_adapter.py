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

Typed output fields (``list[str]``, ``int``, ``Literal[...]``, a pydantic model, ...) get a layout a
small model can follow and come back as their annotated type, converted by DSPy's own
``parse_value``; see :class:`SmallLMAdapter`. A signature with more than one output field is told,
under its instruction, which labels follow the first.
"""

from __future__ import annotations

import contextvars
import enum
import json
import logging
import re
import threading
import types
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal, Union, get_args, get_origin

import dspy
import pydantic
from dspy.adapters.utils import parse_value, serialize_for_json
from dspy.signatures.signature import Signature

from stageopt._errors import ConfigurationError

logger = logging.getLogger(__name__)

SEPARATOR = "---"

#: Output fields whose values may span lines whatever their type; list, dict and pydantic-model
#: fields span lines too (see :func:`_is_multiline`). Every other output field is cut at its first line.
MULTILINE_FIELDS = frozenset({"reasoning", "rationale", "code", "solution", "plan", "steps"})

#: The marker a list item may start with: ``- a``, ``* a``, ``• a``, ``1. a``, ``2) a``.
_BULLET = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)])(?:\s+|$)")
#: DSPy's end-of-output marker, which chat-tuned models and DSPy's DummyLM may write.
_COMPLETED = re.compile(r"^[ \t]*\[\[ *## *completed *## *\]\]", re.IGNORECASE | re.MULTILINE)

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
        continue_missing: Ask once more for output fields after the first that a completion did not
            reach (see below).
        callbacks: DSPy adapter callbacks.

    Missing fields: with several output fields a small model often writes the first (its reasoning)
    and ends there. With ``continue_missing`` (the default) the adapter then makes one more LM call:
    the same prompt followed by what the model wrote and the next missing label (``Answer:``), and
    parses the two texts as one completion. The extra call is an ordinary LM call, so budgets, usage
    and caches count it; it happens only when a label after the first was not reached.

    Parse policy: a completion always yields every output field. When a field cannot be found
    (e.g. an empty completion, or a chain-of-thought that never reached ``Answer:``) the value is
    salvaged (empty string, or the last line of the text) and the parse counts as a failure:
    :attr:`parse_failures` and the active parse listener (the evaluation's per-stage trace) see it.

    Typed fields: an output field annotated with anything but ``str`` comes back as that type,
    converted by DSPy's own ``dspy.adapters.utils.parse_value`` (JSON and Python literals, pydantic's
    lax coercion: ``"5"`` -> ``5``, ``"yes"`` -> ``True``). The layouts a small model is shown, in
    demos, inputs and a one-line hint per typed output field under the instruction:

    - lists (``list[str]``, ``list[int]``, sets, tuples): one item per line, ``- item``; ``- a``,
      ``1. a``, unmarked lines and a JSON list all parse, and prose around a marked list is dropped;
    - ``int`` / ``float``: a bare number (otherwise the last number of the value's first line:
      ``The answer is 40 kg.``, ``6 + 10 = 16``); ``bool``: ``yes`` or ``no``;
    - ``Literal[...]`` / ``Enum``: one of the options, matched without regard to case, ``_`` or the
      words around it, when the text names exactly one option;
    - pydantic models and dicts: a JSON object.

    Lists, dicts and models may span lines (:func:`_is_multiline`). A value that does not convert
    (an ``int`` field reading ``about five``) does not raise, unlike DSPy's own adapters: the parse
    counts as a failure, so the evaluation records it, and the field keeps a salvaged value so the
    program can go on: a list field is always a list (its items as strings when they do not convert,
    ``[]`` when the field is missing), any other field keeps the text the model wrote. Fields
    annotated ``str`` (``str | None``, ``Any``) are returned as text, and a signature with a single
    text output renders as it did before typed fields were supported. With several output fields the
    instruction is followed by one line naming the labels after the first (``After Reasoning, write
    Answer: on a new line.``).
    """

    def __init__(
        self,
        *,
        max_demo_chars: int | None = None,
        continue_missing: bool = True,
        callbacks: list[Any] | None = None,
    ) -> None:
        super().__init__(callbacks=callbacks)
        self.continue_missing = continue_missing
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
        instruction = "\n\n".join(part for part in (signature.instructions or "", _format_hints(signature)) if part)
        instruction = instruction.strip()
        if instruction:
            blocks.append(instruction)
        for demo in demos:
            rendered = self._format_demo(signature, demo)
            if rendered:
                blocks.append(rendered)
        current = [
            self._field_line(name, inputs.get(name), field.annotation) for name, field in signature.input_fields.items()
        ]
        first_output = next(iter(signature.output_fields))
        current.append(f"{label(first_output)}:")
        blocks.append("\n".join(current))
        return [{"role": "user", "content": f"\n\n{SEPARATOR}\n\n".join(blocks)}]

    def _format_demo(self, signature: type[Signature], demo: dict[str, Any]) -> str | None:
        fields = {**signature.input_fields, **signature.output_fields}
        # A demo is shown only when it is complete: partial demos confuse small models.
        if any(demo.get(name) in (None, "") for name in fields):
            return None
        return "\n".join(
            self._field_line(name, demo[name], field.annotation, demo=True) for name, field in fields.items()
        )

    def _field_line(self, name: str, value: Any, annotation: Any = str, *, demo: bool = False) -> str:
        text = _render_value(value, annotation)
        if demo and self.max_demo_chars is not None and len(text) > self.max_demo_chars:
            text = text[: self.max_demo_chars].rstrip() + " ..."
        # A non-empty list starts on the line below its label, even with a single item.
        multiline = "\n" in text or (_list_args(annotation) is not None and bool(value) and not isinstance(value, str))
        separator = "\n" if multiline else " "
        return f"{label(name)}:{separator}{text}"

    def stop_sequences(self, signature: type[Signature]) -> list[str]:
        """Where a completion must end: the next block, an echoed input field, or end of line."""
        stops = [f"\n{SEPARATOR}", "\n\n\n"]
        stops += [f"\n{label(name)}:" for name in signature.input_fields]
        outputs = list(signature.output_fields.items())
        if len(outputs) == 1 and not _is_multiline(*outputs[0]):
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
        """Format, call the LM with stop sequences, and parse every completion.

        A completion that wrote the first output field but stopped before a later one's label gets
        one more call when ``continue_missing`` is set (see the class docstring).
        """
        kwargs = {**lm_kwargs, "stop": self.stop_sequences(signature)}
        messages = self.format(signature, demos, inputs)
        texts = [_output_text(output) for output in lm(messages=messages, **kwargs)]
        for i, text in enumerate(texts):
            follow_up = self._follow_up(signature, messages, text, lm_kwargs)
            if follow_up is not None:
                texts[i] = follow_up[0] + _output_text(lm(messages=follow_up[1], **follow_up[2])[0])
        return [self.parse(signature, text) for text in texts]

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
        texts = [_output_text(output) for output in await lm.acall(messages=messages, **kwargs)]
        for i, text in enumerate(texts):
            follow_up = self._follow_up(signature, messages, text, lm_kwargs)
            if follow_up is not None:
                texts[i] = follow_up[0] + _output_text((await lm.acall(messages=follow_up[1], **follow_up[2]))[0])
        return [self.parse(signature, text) for text in texts]

    def _follow_up(
        self, signature: type[Signature], messages: list[dict[str, Any]], text: str, lm_kwargs: dict[str, Any]
    ) -> tuple[str, list[dict[str, Any]], dict[str, Any]] | None:
        """The text so far, the prompt continuing it and the call options, when a later field is missing."""
        if not self.continue_missing:
            return None
        missing = missing_fields(signature, text)
        if not missing or not text.strip():
            return None
        head = f"{text.rstrip()}\n{label(missing[0])}:"
        prompt = f"{messages[-1]['content']}{head}"
        rest = {name: signature.output_fields[name] for name in missing}
        stops = [f"\n{SEPARATOR}", "\n\n\n", *(f"\n{label(name)}:" for name in signature.input_fields)]
        if len(missing) == 1 and not _is_multiline(missing[0], rest[missing[0]]):
            stops.append("\n")
        kwargs = {**lm_kwargs, "stop": _cap(stops), "n": 1}
        kwargs.pop("num_generations", None)
        return head, [*messages[:-1], {"role": "user", "content": prompt}], kwargs

    # ---- parsing ----------------------------------------------------------------------------

    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        """Split ``completion`` into the output fields and convert typed ones; see the class docstring."""
        texts, found = parse_completion(signature, completion or "")
        values, converted = convert_fields(signature, texts)
        ok = found and converted
        with self._lock:
            self.parses += 1
            self.parse_failures += 0 if ok else 1
        listener = _PARSE_LISTENER.get()
        if listener is not None:
            listener(signature, ok)
        if not ok:
            logger.debug("salvaged unparsable completion %r for %s", (completion or "")[:200], list(values))
        return values


def _cap(stops: list[str]) -> list[str]:
    # OpenAI-compatible servers accept at most four stop sequences: keep the most useful ones.
    ordered = list(dict.fromkeys(stops))
    if "\n" in ordered:
        return ["\n", *[s for s in ordered if s != "\n"]][:4]
    return ordered[:4]


def parse_completion(signature: type[Signature], completion: str) -> tuple[dict[str, Any], bool]:
    """Split a completion that continues after the first output field's label into field texts.

    Values are strings, not yet converted to the fields' types (:func:`convert_fields` does that).
    Returns the field values and whether every field was found with a non-empty value.
    """
    fields = signature.output_fields
    outputs = list(fields)
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
        values[name] = _clean(name, text[start:end], fields[name].annotation)
    ok = all(values.get(name) for name in outputs)
    if not ok:
        fallback = _last_line(text)
        for name in outputs:
            if not values.get(name):
                # A list, dict or model is not salvaged from a stray line: it stays empty.
                salvage = name == outputs[-1] and not _is_structured(fields[name].annotation)
                values[name] = fallback if salvage else values.get(name, "")
    return values, ok


def missing_fields(signature: type[Signature], completion: str) -> list[str]:
    """The output fields after the first whose label the completion never reached, in order."""
    text = completion.replace("\r\n", "\n")
    outputs = list(signature.output_fields)
    cursor = 0
    for i, name in enumerate(outputs[1:], start=1):
        found = _marker(name).search(text, cursor)
        if found is None:
            return outputs[i:]
        cursor = found.end()
    return []


def convert_fields(signature: type[Signature], texts: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Convert the field texts of :func:`parse_completion` to the output fields' annotated types.

    Returns the values and whether every typed value converted; see :class:`SmallLMAdapter` for the
    layouts accepted and the salvaged value of a field that does not convert.
    """
    values: dict[str, Any] = {}
    ok = True
    for name, field in signature.output_fields.items():
        text = texts.get(name, "")
        try:
            values[name] = _convert_value(text, field.annotation)
        except (ValueError, TypeError) as exc:  # pydantic.ValidationError is a ValueError
            ok = False
            values[name] = _salvage(text, field.annotation)
            logger.debug("field %r: %r is not a %s: %s", name, text[:80], field.annotation, exc)
    return values, ok


def _convert_value(text: str, annotation: Any) -> Any:
    """One field's text as ``annotation``, through DSPy's ``parse_value`` after the layout is undone.

    Raises:
        ValueError: The text does not convert (pydantic's ``ValidationError`` is one).
    """
    if _is_text(annotation):
        return text
    inner = _strip_optional(annotation)
    item_type = _list_args(inner)
    if item_type is not None:
        if not text.strip():
            raise ValueError("a list field with no items")
        if text.lstrip().startswith("["):
            return parse_value(text, annotation)
        items = _list_items(text)
        if item_type is not Any and not _is_text(item_type):
            items = [_convert_value(item, item_type) for item in items]
        return parse_value(items, annotation)
    if get_origin(inner) is Literal or isinstance(inner, enum.EnumMeta):
        text = _option(text, inner)
    if inner in (int, float):
        text = _number(text, inner)
    return parse_value(text, annotation)


def _format_hints(signature: type[Signature]) -> str:
    """How to write the outputs: the labels that follow the first one, and one line per typed field.

    Empty for a signature with a single text output. Without the first line a small model asked for
    ``Reasoning:`` then ``Answer:`` writes its reasoning and stops (measured: parse rate 0 of 10 on
    GSM8K for both embedded models, ``benchmarks/adapter_parse.py``).
    """
    outputs = list(signature.output_fields)
    lines = []
    if len(outputs) > 1:
        rest = ", then ".join(f"{label(name)}:" for name in outputs[1:])
        lines.append(f"After {label(outputs[0])}, write {rest} on a new line.")
    for name, field in signature.output_fields.items():
        hint = _type_hint(field.annotation)
        if hint:
            lines.append(f"Write {label(name)} as {hint}.")
    return "\n".join(lines)


def _type_hint(annotation: Any) -> str | None:
    """How a value of ``annotation`` is written in this layout (None for text)."""
    if _is_text(annotation):
        return None
    inner = _strip_optional(annotation)
    if _list_args(inner) is not None:
        return "one item per line, each starting with '- '"
    if inner is bool:
        return "yes or no"
    if inner is int:
        return "an integer"
    if inner is float:
        return "a number"
    options = _options(inner)
    if options is not None:
        return "one of: " + ", ".join(options)
    if _is_model(inner):
        keys = ", ".join(f'"{key}"' for key in inner.model_fields)
        return f"a JSON object with the keys {keys}" if keys else "a JSON object"
    if inner is dict or get_origin(inner) is dict:
        return "a JSON object"
    return None


def _render_value(value: Any, annotation: Any = str) -> str:
    """A field value as the prompt shows it: text fields as before, typed fields in their layout."""
    if _is_text(annotation) or value is None:
        return _stringify(value)
    inner = _strip_optional(annotation)
    if _list_args(inner) is not None and isinstance(value, list | tuple | set | frozenset):
        items = [_render_item(item) for item in value]
        return "\n".join(f"- {item}" for item in items) if items else "[]"
    return _render_item(value)


def _is_multiline(name: str, field: Any) -> bool:
    """Whether output field ``name`` (a DSPy ``FieldInfo``) may span lines: by name, or as a list/dict/model."""
    return name in MULTILINE_FIELDS or _is_structured(getattr(field, "annotation", str))


def _render_item(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, pydantic.BaseModel | dict | list | tuple):
        return json.dumps(serialize_for_json(value), ensure_ascii=False)
    return str(value).strip()


def _clean(name: str, value: str, annotation: Any = str) -> str:
    if not _is_text(annotation):
        # DSPy's own end marker is not part of a typed value ("[[" would read as a JSON list).
        cut = _COMPLETED.search(value)
        value = value[: cut.start()] if cut else value
    value = value.strip()
    if _is_structured(annotation):
        return value  # "* a" is a list item, not markup
    if name not in MULTILINE_FIELDS:
        value = next((line.strip() for line in value.split("\n") if line.strip()), "")
    return value.strip().strip("*").strip()


def _list_items(text: str) -> list[str]:
    # Marked items ("- a", "1. a") win and the prose around them is dropped; otherwise every line
    # of the first paragraph is an item.
    lines = [line.strip() for line in text.strip().split("\n")]
    marked = [_BULLET.sub("", line, count=1).strip() for line in lines if _BULLET.match(line)]
    if marked:
        return [item for item in marked if item]
    paragraph = lines[: lines.index("")] if "" in lines else lines
    return [line for line in paragraph if line]


def _option(text: str, annotation: Any) -> str:
    # The option the text names (an Enum's member by value or name), ignoring case, quotes, markup,
    # "_" against " " and words around it ("The label is SUPPORTED."), when exactly one option is
    # named; an option found only inside a longer one ("supported" in "not supported") does not
    # count. parse_value then checks the result, and rejects the text when no single option matches.
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        names = {m.name: [str(m.value), m.name] for m in annotation}
    else:
        names = {str(option): [str(option)] for option in get_args(annotation)}
    if text.strip() in names:
        return text.strip()
    found = {name: _spans(text, forms) for name, forms in names.items()}
    found = {name: spans for name, spans in found.items() if spans}
    named = [
        name
        for name, spans in found.items()
        if any(
            not any(o[0] <= a and b <= o[1] and (o[1] - o[0]) > (b - a) for other in found.values() for o in other)
            for a, b in spans
        )
    ]
    return named[0] if len(named) == 1 else text


def _spans(text: str, forms: list[str]) -> list[tuple[int, int]]:
    # Where any of ``forms`` occurs in ``text`` as whole words, "_"/"-" read as spaces.
    def norm(value: str) -> str:
        return re.sub(r"[_\-]", " ", value).casefold()

    haystack = norm(text)
    spans = []
    for form in {norm(f).strip() for f in forms if f.strip()}:
        pattern = r"(?<![0-9a-z])" + re.escape(form) + r"(?![0-9a-z])"
        spans += [(m.start(), m.end()) for m in re.finditer(pattern, haystack)]
    return spans


def _number(text: str, annotation: Any) -> str:
    # A number field whose text is not a bare number ("The answer is 40 kg.", "26 + 6 - 10 = 16",
    # "\\boxed{40}"): the last number of its first line, thousands separators dropped. parse_value
    # still rejects a non-integral value for an int.
    line = next((line for line in text.strip().split("\n") if line.strip()), "")
    if re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", line):
        return line.strip()
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", line)
    if not numbers:
        return text
    value = numbers[-1].replace(",", "")
    if annotation is int and re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    return value


def _options(annotation: Any) -> list[str] | None:
    if get_origin(annotation) is Literal:
        return [str(option) for option in get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return None


def _salvage(text: str, annotation: Any) -> Any:
    if _list_args(_strip_optional(annotation)) is not None:
        return [] if not text.strip() or text.lstrip().startswith("[") else _list_items(text)
    return text


def _is_text(annotation: Any) -> bool:
    # str (and str | None, Any, and a DSPy field without annotation) are text: never converted or hinted.
    if annotation is str or annotation is None or annotation is Any:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return str in get_args(annotation)
    return False


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return annotation


def _list_args(annotation: Any) -> Any | None:
    """The item type when ``annotation`` is a list-like type (``Any`` for a bare ``list``), else None."""
    if annotation in (list, set, frozenset, tuple):
        return Any
    origin = get_origin(annotation)
    if origin in (list, set, frozenset, Sequence, AbstractSet) or origin is tuple:
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        if origin is tuple and len(args) != 1:
            return Any  # a fixed-length tuple: items are validated as a whole
        return args[0] if args else Any
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)


def _is_structured(annotation: Any) -> bool:
    inner = _strip_optional(annotation)
    return (
        _list_args(inner) is not None or _is_model(inner) or inner is dict or get_origin(inner) is dict
    ) and not _is_text(annotation)


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

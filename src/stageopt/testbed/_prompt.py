"""Reading the prompts the testbed LM receives and writing answers in the layout they ask for.

Three layouts are understood:

* ``small``: stageopt's :class:`~stageopt.lm.SmallLMAdapter` (one user message: instruction,
  ``---``-separated demo blocks of ``Label: value`` lines, then the inputs and the first output
  label), and plain completion prompts (stageopt's instruction proposers).
* ``chat``: DSPy's ``ChatAdapter`` (a system message listing the fields and the objective,
  demos as user/assistant pairs with ``[[ ## field ## ]]`` markers, then the inputs).
* ``json``: DSPy's ``JSONAdapter`` (as ``chat``, but the answer is a JSON object).

A prompt is a *stage prompt* when its input and output fields are one stage's (plus an optional
``reasoning`` output); anything else is a *proposer prompt*.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from stageopt.lm._adapter import SEPARATOR, label

_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_ITEM = re.compile(r"(?m)^\d+\. `(\w+)`")
_OBJECTIVE = "your objective is:"
_INPUTS_HEADER = "Your input fields are:"
_OUTPUTS_HEADER = "Your output fields are:"
_STRUCTURE_HEADER = "All interactions will be structured"
_JSON_MARKER = "Outputs will be a JSON object"
_REQUIREMENTS = "\n\nRespond with "  # the output requirements after the inputs

#: The extra output field of chain of thought.
REASONING = "reasoning"


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt.

    Attributes:
        layout: ``small``, ``chat`` or ``json``.
        text: The whole prompt as one string (system first).
        inputs: Input field names, in order (chat/json: from the system message; small: the
            labels of the last block, when it is a stage prompt).
        outputs: Output field names the answer must contain, in order.
        instruction: The instruction text (stage prompts).
        demos: Demo field values (stage prompts), in order.
        values: The current input values by field name.
        stage: The stage index, or None for a proposer prompt.
    """

    layout: str
    text: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    instruction: str = ""
    demos: tuple[dict[str, str], ...] = ()
    values: dict[str, str] = field(default_factory=dict)
    stage: int | None = None


def parse_prompt(system: str, messages: Sequence[tuple[str, str]], fields: Sequence[str]) -> Prompt:
    """Parse a request given as its system text and ``(role, text)`` messages.

    Args:
        system: The system text ("" when none).
        messages: The conversation, in order.
        fields: The chain's field names (stage ``i`` maps ``fields[i]`` to ``fields[i + 1]``).
    """
    text = "\n\n".join([system, *(t for _, t in messages)]) if system else "\n\n".join(t for _, t in messages)
    if _INPUTS_HEADER in system and _OUTPUTS_HEADER in system:
        return _parse_chat(system, messages, fields, text)
    return _parse_small(messages, fields, text)


def _stage_of(inputs: Sequence[str], outputs: Sequence[str], fields: Sequence[str]) -> int | None:
    main_outputs = [o for o in outputs if o != REASONING]
    for stage in range(len(fields) - 1):
        if list(inputs) == [fields[stage]] and main_outputs == [fields[stage + 1]]:
            return stage
    return None


def _sections(content: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` sections of one message, by name (the ``completed`` marker dropped)."""
    parts = _SECTION.split(content)
    out: dict[str, str] = {}
    for i in range(1, len(parts) - 1, 2):
        name, value = parts[i], parts[i + 1]
        if name != "completed":
            out[name] = value.strip()
    return out


def _parse_chat(system: str, messages: Sequence[tuple[str, str]], fields: Sequence[str], text: str) -> Prompt:
    layout = "json" if _JSON_MARKER in system else "chat"
    head, _, rest = system.partition(_OUTPUTS_HEADER)
    inputs = tuple(_FIELD_ITEM.findall(head.partition(_INPUTS_HEADER)[2]))
    outputs = tuple(_FIELD_ITEM.findall(rest.partition(_STRUCTURE_HEADER)[0]))
    objective = system.rpartition(_OBJECTIVE)[2] if _OBJECTIVE in system else ""
    instruction = " ".join(objective.split())
    stage = _stage_of(inputs, outputs, fields)
    turns = [(role, content) for role, content in messages if role in ("user", "assistant")]
    last = turns[-1][1] if turns else ""
    values = _sections(last.rsplit(_REQUIREMENTS, 1)[0] if _REQUIREMENTS in last else last)
    demos: list[dict[str, str]] = []
    pending: dict[str, str] | None = None
    for role, content in turns[:-1]:
        if role == "user":
            pending = _sections(content)
        elif pending is not None:
            answer = _sections(content) or _json_fields(content)
            demos.append({**pending, **answer})
            pending = None
    return Prompt(layout, text, inputs, outputs, instruction, tuple(demos), values, stage)


def _json_fields(content: str) -> dict[str, str]:
    try:
        data = json.loads(content)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _parse_small(messages: Sequence[tuple[str, str]], fields: Sequence[str], text: str) -> Prompt:
    content = messages[-1][1] if messages else ""
    blocks = content.split(f"\n\n{SEPARATOR}\n\n")
    last = blocks[-1].split("\n")
    for stage in range(len(fields) - 1):
        source, target = fields[stage], fields[stage + 1]
        asked = last[-1].strip()
        if asked not in (f"{label(target)}:", f"{label(REASONING)}:"):
            continue
        if not last[0].startswith(f"{label(source)}:"):
            continue
        outputs = (REASONING, target) if asked == f"{label(REASONING)}:" else (target,)
        names = {label(name): name for name in (source, target, REASONING)}
        values = _lines(last[:-1], names)
        first = blocks[0]
        instruction = "" if len(blocks) == 1 or first.startswith(f"{label(source)}:") else first
        demo_blocks = blocks[1:-1] if instruction or len(blocks) == 1 else blocks[:-1]
        demos = tuple(_lines(block.split("\n"), names) for block in demo_blocks)
        return Prompt("small", text, (source,), outputs, " ".join(instruction.split()), demos, values, stage)
    return Prompt("small", text)


def _lines(lines: Sequence[str], names: dict[str, str]) -> dict[str, str]:
    """``Label: value`` lines (a value may continue on the next lines) by field name."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        head, colon, tail = line.partition(":")
        if colon and head in names:
            current = names[head]
            out[current] = tail.strip()
        elif current is not None:
            out[current] = f"{out[current]}\n{line}".strip()
    return out


def render_answer(prompt: Prompt, values: dict[str, str]) -> str:
    """The completion text for ``values`` of ``prompt``'s output fields, in its layout.

    The small layout continues after the first output label, so the first value comes first and
    any further field gets its own ``Label:`` line.
    """
    if prompt.layout == "json":
        return json.dumps({name: values.get(name, "") for name in prompt.outputs})
    if prompt.layout == "chat":
        body = "\n\n".join(f"[[ ## {name} ## ]]\n{values.get(name, '')}" for name in prompt.outputs)
        return f"{body}\n\n[[ ## completed ## ]]"
    if not prompt.outputs:
        return next(iter(values.values()), "")
    first, *rest = prompt.outputs
    lines = [f" {values.get(first, '')}", *(f"{label(name)}: {values.get(name, '')}" for name in rest)]
    return "\n".join(lines)

"""Instructions written by an LM, grounded in the stage's fields and a real example, then validated.

Small models mostly write junk when asked for instructions (``P1``, an echo of the request, a
loop of one word), so every candidate passes :func:`validate_instruction` first; rejected ones
are counted, never used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import dspy

from stageopt._errors import BudgetExhaustedError, ConfigurationError
from stageopt.lm._adapter import label
from stageopt.proposers._base import BaseInstructionProposer, ProposalContext

logger = logging.getLogger(__name__)

_HEADER = "Write one clear instruction for a step of a language-model program."

# Completion-style exemplars: a base model continues the pattern rather than follow a request.
_EXEMPLARS = (
    "Step: reads Question and writes Answer.\n"
    "Example: Question: Who painted the Mona Lisa? -> Answer: Leonardo da Vinci\n"
    "Instruction: Answer the question with a short name or phrase.",
    "Step: reads Text and writes Summary.\n"
    "Example: Text: The meeting moved from Monday to Friday because the room was booked. "
    "-> Summary: The meeting is now on Friday.\n"
    "Instruction: Summarize the text in one sentence that keeps its main point.",
)

_MARKERS = re.compile(r"(^|\n)\s*(step|example|instruction)\s*:|---|\[\[|##|->", re.IGNORECASE)

# A text that opens with a field label ("Passages: ...", "Answer: ...") continues the prompt's
# layout instead of instructing: a small model writes a made-up passage or answer after it.
_LEADING_LABEL = re.compile(r"^\W*[A-Z][A-Za-z]*(?: [A-Za-z]+)?\s*:(?!//)")


def validate_instruction(text: str, *, existing: list[str]) -> tuple[str | None, str]:
    """Clean ``text`` and decide whether it is a usable instruction.

    Returns:
        ``(instruction, "ok")`` or ``(None, reason)``.
    """
    cleaned = " ".join(text.strip().strip("\"'`").split())
    words = cleaned.split()
    if not cleaned:
        return None, "empty"
    if _HEADER.lower() in cleaned.lower() or _MARKERS.search(text):
        return None, "echoes the request or its markers"
    if _LEADING_LABEL.match(text.strip()):
        return None, "starts with a field label"
    if len(words) < 4:
        return None, "too short"
    if len(words) > 60:
        return None, "too long"
    letters = sum(ch.isalpha() for ch in cleaned)
    if letters < 0.6 * len(cleaned):
        return None, "not prose"
    if len({w.lower() for w in words}) < 0.5 * len(words):
        return None, "repetitive"
    if not cleaned[0].isupper():
        return None, "not a sentence"
    copied = [_HEADER, *(exemplar.rsplit("Instruction: ", 1)[1] for exemplar in _EXEMPLARS)]
    if any(_overlap(cleaned, text) > 0.5 for text in copied):
        return None, "copies the request or a worked exemplar"
    normal = cleaned.lower().rstrip(".")
    if any(normal == e.lower().rstrip(".") for e in existing):
        return None, "duplicate"
    if not cleaned.endswith((".", "!", "?")):
        cleaned += "."
    return cleaned, "ok"


def _overlap(a: str, b: str) -> float:
    """Share of ``b``'s content words that ``a`` repeats."""
    words_a = {w.strip(".,").lower() for w in a.split() if len(w) > 3}
    words_b = {w.strip(".,").lower() for w in b.split() if len(w) > 3}
    return len(words_a & words_b) / len(words_b) if words_b else 0.0


def program_summary(program: dspy.Module, stage: str) -> str:
    """One line on where ``stage`` sits in ``program``: its stages in order and its position."""
    names = [name for name, _ in program.named_predictors()]
    position = names.index(stage) + 1 if stage in names else 0
    return f"Program: {' then '.join(names)} (this is part {position} of {len(names)})."


def data_summary(examples: Sequence[dspy.Example]) -> str:
    """One line on the training data: its size and the mean length of each input field in words."""
    if not examples:
        return "Data: no examples."
    fields = list(examples[0].inputs().keys())
    lengths = []
    for field in fields:
        words = [len(str(ex.get(field, "")).split()) for ex in examples]
        lengths.append(f"{label(field)} about {round(sum(words) / len(words))} words")
    return f"Data: {len(examples)} examples; " + ", ".join(lengths) + "."


class LMInstructionProposer(BaseInstructionProposer):
    """Asks ``context.prompt_lm`` for instruction variants of each stage.

    The request is a plain completion prompt (works with base models): two worked exemplars,
    then the program's structure (its stages in order and which one this is), a summary of the
    training data (size, fields, typical lengths), the stage's input and output fields, its
    current instruction and one real example of its inputs and outputs from the traces. Each
    attempt uses a different seed at a non-zero temperature; at most ``num_candidates`` valid
    instructions per stage are kept, trying up to ``max_attempts`` times.
    """

    def __init__(self, *, num_candidates: int = 3, max_attempts: int | None = None, temperature: float = 0.8):
        if num_candidates < 0:
            raise ConfigurationError(f"`num_candidates` must be >= 0, got {num_candidates=}")
        self.num_candidates = num_candidates
        self.max_attempts = max_attempts if max_attempts is not None else 2 * num_candidates
        self.temperature = temperature

    def request(
        self, name: str, predictor: dspy.Predict, context: ProposalContext, program: dspy.Module | None = None
    ) -> str:
        """The completion prompt for one stage (grounded in ``program``'s structure when given)."""
        signature = predictor.signature
        inputs = " and ".join(label(k) for k in signature.input_fields)
        outputs = " and ".join(label(k) for k in signature.output_fields)
        example = ""
        for result in context.traces:
            step = next((s for s in result.trace if s["stage"] == name), None)
            if step is not None:
                first_in = next(iter(signature.input_fields))
                first_out = next(iter(signature.output_fields))
                shown_in = str(step["inputs"].get(first_in, ""))[:160]
                shown_out = str(step["outputs"].get(first_out, ""))[:80]
                example = f"\nExample: {label(first_in)}: {shown_in} -> {label(first_out)}: {shown_out}"
                break
        current = (signature.instructions or "").strip().replace("\n", " ")
        grounding = f"{program_summary(program, name)} {data_summary(context.trainset)}\n" if program else ""
        stage = (
            f"{grounding}Step: reads {inputs} and writes {outputs}. Current instruction: {current}{example}\n"
            "Instruction:"
        )
        return "\n\n---\n\n".join([_HEADER, *_EXEMPLARS, stage])

    def propose(self, program: dspy.Module, context: ProposalContext) -> Mapping[str, list[str]]:
        """Validated new instructions per stage (see the class docstring)."""
        proposals: dict[str, list[str]] = {}
        rejected: dict[str, dict[str, int]] = {}
        for name, predictor in program.named_predictors():
            existing = [predictor.signature.instructions]
            kept: list[str] = []
            reasons: dict[str, int] = {}
            prompt = self.request(name, predictor, context, program)
            for attempt in range(self.max_attempts):
                if len(kept) >= self.num_candidates:
                    break
                try:
                    outputs = context.prompt_lm(
                        messages=[{"role": "user", "content": prompt}],
                        temperature=self.temperature,
                        max_tokens=60,
                        stop=["\n", "---"],
                        seed=context.seed * 1000 + attempt,
                    )
                except BudgetExhaustedError:
                    raise
                except Exception as exc:
                    reasons["lm error"] = reasons.get("lm error", 0) + 1
                    logger.warning("instruction proposal for %s failed: %s", name, exc)
                    continue
                text = outputs[0] if outputs else ""
                text = text.get("text", "") if isinstance(text, dict) else str(text)
                instruction, reason = validate_instruction(text, existing=existing + kept)
                if instruction is None:
                    reasons[reason] = reasons.get(reason, 0) + 1
                    continue
                kept.append(instruction)
            proposals[name] = kept
            rejected[name] = reasons
        context.notes["instruction_rejections"] = rejected
        return proposals

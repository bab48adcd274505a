"""Instruction mutation during a search: an LM rewrites a stage's current best instruction.

Unlike the proposers called once before a search, :class:`MutationInstructionProposer` is a
helper a strategy calls whenever it wants a new variant (e.g. an evolutionary step). Every
variant passes :func:`~stageopt.proposers.validate_instruction` first, so a small model's junk
never reaches the candidate pool; the strategy then adds the survivor with
:meth:`~stageopt.strategies.SearchSpace.add_instruction`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import dspy

from stageopt._errors import BudgetExhaustedError, ConfigurationError
from stageopt.lm._adapter import label
from stageopt.proposers._instruction import _overlap, validate_instruction

logger = logging.getLogger(__name__)

_HEADER = "Rewrite the instruction of a step of a language-model program: same task, clearer and more specific."

# Completion-style exemplars: a base model continues the pattern rather than follow a request.
_EXEMPLARS = (
    (
        "Question",
        "Answer",
        "Answer the question.",
        "Answer the question with a short name or phrase, and nothing else.",
    ),
    (
        "Text",
        "Summary",
        "Summarize the text.",
        "Summarize the text in one sentence that keeps who did what and when.",
    ),
)

# Labels of the request that an echoing model would repeat; validate_instruction checks its own.
_MARKERS = re.compile(r"(^|\n)\s*(rewrite|rewritten|current)\s*:", re.IGNORECASE)


def _block(inputs: str, outputs: str, current: str, rewrite: str = "") -> str:
    tail = f" {rewrite}" if rewrite else ""
    return f"Step: reads {inputs} and writes {outputs}.\nCurrent: {current}\nRewrite:{tail}"


class MutationInstructionProposer:
    """Asks an LM to rewrite one instruction and keeps the variant only if it is valid.

    The request is a plain completion prompt (works with base models): a header, two worked
    rewrites, then the stage's input and output fields and its current instruction. Each
    attempt is one LM call through the LM the caller passes (a strategy passes its metered
    ``state.lm``, so mutations count against the budget) at a non-zero temperature with its
    own seed; the first valid variant is returned.

    Args:
        temperature: Sampling temperature of the rewrite.
        max_attempts: LM calls per :meth:`mutate` before giving up.
        max_tokens: Longest rewrite, in tokens.

    Attributes:
        rejections: How many rewrites were rejected, by reason (for run notes).
    """

    def __init__(self, *, temperature: float = 0.9, max_attempts: int = 1, max_tokens: int = 60) -> None:
        if temperature < 0:
            raise ConfigurationError(f"`temperature` must be >= 0, got {temperature=}")
        if max_attempts < 1:
            raise ConfigurationError(f"`max_attempts` must be >= 1, got {max_attempts=}")
        if max_tokens < 1:
            raise ConfigurationError(f"`max_tokens` must be >= 1, got {max_tokens=}")
        self.temperature = temperature
        self.max_attempts = max_attempts
        self.max_tokens = max_tokens
        self.rejections: dict[str, int] = {}

    def request(self, instruction: str, signature: type[dspy.Signature] | None = None) -> str:
        """The completion prompt that asks for a rewrite of ``instruction``."""
        if signature is not None:
            inputs = " and ".join(label(k) for k in signature.input_fields)
            outputs = " and ".join(label(k) for k in signature.output_fields)
        else:
            inputs, outputs = "its inputs", "its outputs"
        current = " ".join(instruction.split())
        exemplars = [_block(*exemplar) for exemplar in _EXEMPLARS]
        return "\n\n---\n\n".join([_HEADER, *exemplars, _block(inputs, outputs, current)])

    def mutate(
        self,
        instruction: str,
        lm: dspy.BaseLM,
        *,
        signature: type[dspy.Signature] | None = None,
        existing: Sequence[str] = (),
        seed: int = 0,
    ) -> str | None:
        """A validated rewrite of ``instruction``, or None when every attempt was rejected.

        Args:
            instruction: The stage's current (best) instruction.
            lm: The LM that writes the rewrite; pass the run's metered LM.
            signature: The stage's signature, to name its fields in the request.
            existing: Instructions the rewrite must differ from (e.g. the stage's pool).
            seed: Seed of the first attempt (attempt ``k`` uses ``seed * 1000 + k``); vary it
                between calls, or a caching LM answers the same again.

        Raises:
            BudgetExhaustedError: when the budget cannot pay for the call (strategies end the
                search, e.g. ``raise StopSearch("budget_exhausted", str(exc))``).
        """
        prompt = self.request(instruction, signature)
        seen = [instruction, *existing]
        copied = [_HEADER, *(exemplar[3] for exemplar in _EXEMPLARS)]
        for attempt in range(self.max_attempts):
            try:
                outputs = lm(
                    messages=[{"role": "user", "content": prompt}],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    stop=["\n", "---"],
                    seed=seed * 1000 + attempt,
                )
            except BudgetExhaustedError:
                raise
            except Exception as exc:
                self._reject("lm error")
                logger.warning("instruction mutation failed: %s", exc)
                continue
            text = outputs[0] if outputs else ""
            text = text.get("text", "") if isinstance(text, dict) else str(text)
            if _MARKERS.search(text):
                self._reject("echoes the request or its markers")
                continue
            if any(_overlap(text, other) > 0.5 for other in copied):
                self._reject("copies the request or a worked exemplar")
                continue
            variant, reason = validate_instruction(text, existing=seen)
            if variant is None:
                self._reject(reason)
                continue
            return variant
        return None

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        logger.debug("rejected an instruction rewrite: %s", reason)

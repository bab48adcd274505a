"""Oracle substitution: downstream stages scored with a perfect (gold) upstream.

A task that has gold intermediates supplies variants of the program through
:meth:`stageopt.tasks.BaseTask.oracle_programs`; each is scored end to end on the same examples
as the program, so ``score - program_score`` is what a perfect upstream would add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from stageopt._errors import ConfigurationError


@dataclass(frozen=True)
class OracleResult:
    """The score of one downstream stage given gold intermediates, beside the program's.

    Attributes:
        description: What was substituted (e.g. ``"answer stage given the gold supporting paragraphs"``).
        score: Mean end-to-end score of the oracle variant.
        ci95: Its 95 % interval.
        program_score: The program's own score on the same examples.
    """

    description: str
    score: float
    ci95: tuple[float, float]
    program_score: float

    @property
    def headroom(self) -> float:
        """What a perfect upstream adds: ``score - program_score``."""
        return self.score - self.program_score

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result."""
        return {
            "description": self.description,
            "score": self.score,
            "ci95": list(self.ci95),
            "program_score": self.program_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OracleResult:
        """Inverse of :meth:`to_dict`."""
        lo, hi = data["ci95"]
        return cls(
            description=str(data["description"]),
            score=float(data["score"]),
            ci95=(float(lo), float(hi)),
            program_score=float(data["program_score"]),
        )


def with_gold_inputs(examples: Sequence[dspy.Example], gold_inputs: Sequence[str], *, stage: str) -> list[dspy.Example]:
    """Copies of ``examples`` whose inputs also include the gold fields ``gold_inputs``.

    Raises:
        ConfigurationError: naming the example and field when a gold field is missing.
    """
    out = []
    for i, example in enumerate(examples):
        missing = [name for name in gold_inputs if name not in example]
        if missing:
            which = example.get("id") or f"#{i}"
            raise ConfigurationError(
                f"the oracle for stage {stage!r} reads the gold field(s) {', '.join(missing)}, which example "
                f"{which} lacks; load the examples with the task's load() or pass oracles={{}}"
            )
        out.append(example.with_inputs(*example.inputs().keys(), *gold_inputs))
    return out

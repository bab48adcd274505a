"""A toy K-stage program whose stage contributions are known exactly.

Every stage answers ``good`` when it has a demo and ``bad`` otherwise (a scripted LM), so a
hybrid's outputs are known from which stages it takes from the program; the metric is a game
over those outputs chosen per test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dspy

from tests.conftest import scripted_lm


class Word(dspy.Signature):
    """Say a word."""

    x: str = dspy.InputField()
    y: str = dspy.OutputField()


class Chain(dspy.Module):
    """Stages ``s0`` ... ``s{k-1}``, each called once per example."""

    def __init__(self, k: int, *, demos: bool = False) -> None:
        super().__init__()
        self.k = k
        for i in range(k):
            stage = dspy.Predict(Word)
            if demos:
                stage.demos = [dspy.Example(x="demo", y="good")]
            setattr(self, f"s{i}", stage)

    def forward(self, x: str) -> dspy.Prediction:
        outs = [(getattr(self, f"s{i}")(x=x).y or "").strip() for i in range(self.k)]
        return dspy.Prediction(good=[o == "good" for o in outs])


def demo_lm() -> dspy.LM:
    """``good`` with a demo in the prompt, ``bad`` without."""
    return scripted_lm(lambda prompt: " good" if len(prompt.split("\n\n---\n\n")) >= 3 else " bad")


def examples(weights: Sequence[Sequence[float]]) -> list[dspy.Example]:
    """One example per row of per-stage weights (the metric reads them as ``example.w``)."""
    return [dspy.Example(x=f"item {i}", w=list(w)).with_inputs("x") for i, w in enumerate(weights)]


Game = Callable[[Sequence[float], Sequence[bool]], float]


def metric_of(game: Game) -> Callable[..., float]:
    """A DSPy metric scoring ``game(example.w, prediction.good)``."""

    def metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        return game(example.w, prediction.good)

    return metric


def additive(w: Sequence[float], good: Sequence[bool]) -> float:
    """Each stage adds its weight when good: Shapley value = weight."""
    return sum(wi for wi, g in zip(w, good, strict=True) if g)

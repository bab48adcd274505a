"""The testbed's K-stage DSPy program, its synthetic examples and its exact-match metric.

Stage ``i`` reads field ``fields[i]`` and writes ``fields[i + 1]`` (``query -> clue -> lead ->
verdict`` for three stages), so each stage has its own signature and stage ``i``'s input is
stage ``i - 1``'s output. Example ``e`` holds the gold value of every field
(``query-017``, ``clue-017``, ..., ``verdict-017``); only ``query`` is an input.
"""

from __future__ import annotations

from typing import Any

import dspy

from stageopt.testbed._world import World, format_value


def stage_name(field: str) -> str:
    """The predictor attribute (stage name) of the stage that writes ``field``."""
    return f"find_{field}"


class TestbedProgram(dspy.Module):
    """A chain of ``dspy.Predict`` stages over the world's fields (SIMULATION testbed program).

    Args:
        world: The hidden world; gives the fields and each stage's original instruction.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, world: World) -> None:
        super().__init__()
        self.fields = list(world.fields)
        self.stage_names = []
        for stage in range(world.n_stages):
            source, target = self.fields[stage], self.fields[stage + 1]
            signature = dspy.Signature(f"{source} -> {target}", world.original_instruction(stage))
            name = stage_name(target)
            setattr(self, name, dspy.Predict(signature))
            self.stage_names.append(name)

    def forward(self, query: str) -> dspy.Prediction:
        """Run the stages in order, each on the previous stage's output."""
        value = query
        outputs: dict[str, Any] = {}
        for stage, name in enumerate(self.stage_names):
            source, target = self.fields[stage], self.fields[stage + 1]
            prediction = getattr(self, name)(**{source: value})
            value = getattr(prediction, target)
            outputs[target] = value
        return dspy.Prediction(**outputs)


def make_examples(world: World, ids: range | list[int]) -> list[dspy.Example]:
    """Synthetic examples with the gold value of every field; ``query`` is the input."""
    return [dspy.Example(**{field: format_value(field, e) for field in world.fields}).with_inputs("query") for e in ids]


def exact_match(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    """1.0 when the predicted ``verdict`` equals the gold one exactly (surrounding spaces aside)."""
    predicted = getattr(prediction, "verdict", None)
    return float(str(predicted or "").strip() == str(example.get("verdict", "")).strip())

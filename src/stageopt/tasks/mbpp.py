"""MBPP (Mostly Basic Python Problems) as code generation with refinement.

The model sees the one-sentence task and the first of its three asserts (the visible test);
the final code must pass all three (pass@1). Stages: ``generate`` and ``refine`` (see
:mod:`stageopt.tasks._code`); stage metrics are the visible-test pass rate after each.
"""

from __future__ import annotations

from typing import Any

import dspy

from stageopt.tasks._code import (
    CodeTask,
    final_code,
    join_code,
)
from stageopt.tasks._data import read_jsonl, resolve_split


def _check_row(row: dict[str, Any]) -> str | None:
    tests = row["test_list"]
    if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        return "field 'test_list' must hold at least one non-empty assert string"
    return None


class MBPPTask(CodeTask):
    """MBPP from ``../shared/data/mbpp``.

    Args:
        timeout_s: Wall-clock limit of each sandbox run (visible test, hidden tests).
        memory_mb: Memory limit of each sandbox run.
        data_dir: Folder holding ``mbpp/{train,dev}.jsonl`` (default: see ``data_dir()``).
    """

    name = "mbpp"
    metric_name = "pass@1"

    def load(self, split: str, *, n: int | None = None) -> list[dspy.Example]:
        """Examples with inputs ``task``, ``test`` (the first assert) and ``setup``."""
        path = resolve_split(self.name, split, self.data_dir)
        fields = {"id": str, "prompt": str, "code": str, "test_list": list, "test_setup_code": str}
        rows = read_jsonl(path, fields, n=n, check=_check_row)
        return [
            dspy.Example(
                id=row["id"],
                task=row["prompt"],
                test=row["test_list"][0],
                setup=row["test_setup_code"],
                tests=list(row["test_list"]),
                reference=row["code"],
            ).with_inputs("task", "test", "setup")
            for row in rows
        ]

    def metric(self, example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        """pass@1: 1.0 when the final code passes every test of the example, else 0.0."""
        code = final_code(prediction)
        if not code.strip():
            return 0.0
        sandbox = self.sandbox()
        return float(sandbox.run(join_code("", code), list(example.tests), example.get("setup") or "").ok)

"""HumanEval task: loading and validation, the visible test, body completions, pass@1."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from stageopt import DataError
from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.tasks.humaneval import HumanEvalTask, split_test
from tests.conftest import scripted_lm

PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TEST = "import math\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"
ROW = {
    "id": "HumanEval/0",
    "task_id": "HumanEval/0",
    "prompt": PROMPT,
    "canonical_solution": "    return sum(xs)\n",
    "test": TEST,
    "entry_point": "total",
}


def _write(tmp_path: Path, rows: list[object]) -> Path:
    (tmp_path / "humaneval").mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "humaneval" / "dev.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_visible_test_is_the_first_assert_on_the_entry_point() -> None:
    visible, setup = split_test(TEST, "total")
    assert visible == "assert total([1, 2]) == 3"
    assert setup == "import math"
    fallback, _ = split_test("def check(candidate):\n    for x in [1]:\n        assert candidate([x]) == x\n", "f")
    assert fallback.endswith("check(f)")


def test_loads_real_rows_and_references_pass(data_root: Path) -> None:
    task = HumanEvalTask(data_dir=data_root)
    examples = task.load("dev", n=3)
    assert [e.id for e in examples][:1] == ["HumanEval/1"]
    for example in examples:
        assert set(example.inputs().keys()) == {"task", "test", "setup", "preamble", "entry_point"}
        assert task.metric(example, dspy.Prediction(code=example.reference)) == 1.0
        wrong = f"def {example.entry_point}(*args):\n    return None"
        assert task.metric(example, dspy.Prediction(code=wrong)) == 0.0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({k: v for k, v in ROW.items() if k != "entry_point"}, r"dev\.jsonl:2: missing field 'entry_point'"),
        ({**ROW, "entry_point": "other"}, r"dev\.jsonl:2: field 'prompt' does not define"),
        ({**ROW, "test": "def check(:"}, r"dev\.jsonl:2: field 'test' is not valid Python"),
        ({**ROW, "test": "x = 1"}, r"dev\.jsonl:2: field 'test' must define check"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        HumanEvalTask(data_dir=_write(tmp_path, [ROW, row])).load("dev")


def _evaluate(tmp_path: Path, generate: str, refine: str) -> tuple[list[str], dspy.Prediction, float, dict]:
    task = HumanEvalTask(data_dir=_write(tmp_path, [ROW]))
    seen: list[str] = []

    def answer(prompt: str) -> str:
        seen.append(prompt.split("\n\n---\n\n")[-1])
        return refine if "Previous code:" in seen[-1] else generate

    report = evaluate(
        task.program(),
        task.load("dev"),
        task.metric,
        lm=scripted_lm(answer),
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
    )
    return seen, report.examples[0].prediction, report.score, report.stage_metrics


def test_a_body_completion_is_joined_to_the_signature(tmp_path: Path) -> None:
    seen, prediction, score, stages = _evaluate(tmp_path, "    return sum(xs)\n", "unused")
    assert len(seen) == 1
    assert prediction["code"].startswith("def total(xs: List[int]) -> int:")
    assert score == 1.0
    assert stages == {"generate": 1.0, "refine": 1.0}


def test_refine_gets_the_error_and_a_full_function_works(tmp_path: Path) -> None:
    wrong = "```python\ndef total(xs):\n    return len(xs)\n```"
    seen, prediction, score, stages = _evaluate(tmp_path, wrong, "def total(xs):\n    return sum(xs)\n")
    assert "assert total([1, 2]) == 3 failed; got 2" in seen[1]
    assert prediction["refined"] is True
    assert stages == {"generate": 0.0, "refine": 1.0}
    assert score == 1.0

"""MBPP task: loading and validation, code extraction, the generate -> test -> refine program, pass@1."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import dspy
import pytest

from stageopt import DataError
from stageopt.evaluation import EvaluationReport, evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.tasks._code import extract_code
from stageopt.tasks.mbpp import MBPPTask
from tests.conftest import scripted_lm

ROW = {
    "id": "mbpp-1",
    "task_id": 1,
    "prompt": "Write a function to add two numbers.",
    "code": "def add(a, b):\n    return a + b",
    "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
    "test_setup_code": "",
    "challenge_test_list": [],
}
WRONG = "def add(a, b):\n    return a - b"
REFERENCE = "def add(a, b):\n    return a + b"


def _write(tmp_path: Path, rows: Sequence[object]) -> Path:
    (tmp_path / "mbpp").mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "mbpp" / "dev.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_loads_real_rows(data_root: Path) -> None:
    examples = MBPPTask(data_dir=data_root).load("dev", n=3)
    assert [e.id for e in examples] == ["mbpp-511", "mbpp-512", "mbpp-513"]
    first = examples[0]
    assert set(first.inputs().keys()) == {"task", "test", "setup"}
    assert first.test == first.tests[0]
    assert len(first.tests) == 3


def test_a_jsonl_path_is_a_split(tmp_path: Path) -> None:
    path = _write(tmp_path, [ROW]) / "mbpp" / "dev.jsonl"
    assert MBPPTask().load(str(path))[0].id == "mbpp-1"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{oops", r"dev\.jsonl:2: invalid JSON"),
        ({k: v for k, v in ROW.items() if k != "code"}, r"dev\.jsonl:2: missing field 'code'"),
        ({**ROW, "test_list": "assert True"}, r"dev\.jsonl:2: field 'test_list' should be list"),
        ({**ROW, "test_list": []}, r"dev\.jsonl:2: field 'test_list' must hold"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        MBPPTask(data_dir=_write(tmp_path, [ROW, row])).load("dev")


def test_reference_solutions_pass_and_a_wrong_one_fails(data_root: Path) -> None:
    task = MBPPTask(data_dir=data_root)
    for example in task.load("dev", n=3):
        assert task.metric(example, dspy.Prediction(code=example.reference)) == 1.0
    example = task.load("dev", n=1)[0]
    assert task.metric(example, dspy.Prediction(code="def find_Min_Sum(num):\n    return 0")) == 0.0
    assert task.metric(example, dspy.Prediction(code="")) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\ndef f(x):\n    return x\n```\nThis returns x.", "def f(x):\n    return x"),
        ("Here is the code:\ndef f(x):\n    return x\n\nprint(f(2))\nassert f(1) == 1", "def f(x):\n    return x"),
        ("import math\ndef f(x):\n    return math.sqrt(x)\nThe end", "import math\ndef f(x):\n    return math.sqrt(x)"),
        ("```\ndef f(x):\n    return x", "def f(x):\n    return x"),
        ("no code at all", "no code at all"),
    ],
)
def test_code_extraction(text: str, expected: str) -> None:
    assert extract_code(text) == expected


def _scripted(generate: str, refine: str, seen: list[str]) -> dspy.LM:
    def answer(prompt: str) -> str:
        last = prompt.split("\n\n---\n\n")[-1]
        seen.append(last)
        return refine if "Previous code:" in last else generate

    return scripted_lm(answer)


def _run(tmp_path: Path, generate: str, refine: str) -> tuple[list[str], EvaluationReport]:
    task = MBPPTask(data_dir=_write(tmp_path, [ROW]))
    seen: list[str] = []
    report = evaluate(
        task.program(),
        task.load("dev"),
        task.metric,
        lm=_scripted(generate, refine, seen),
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
    )
    return seen, report


def test_refine_sees_the_sandbox_error_and_fixes_the_code(tmp_path: Path) -> None:
    seen, report = _run(tmp_path, f"```python\n{WRONG}\n```", REFERENCE)
    assert len(seen) == 2
    assert "assert add(1, 2) == 3 failed; got -1" in seen[1]
    assert "return a - b" in seen[1]
    prediction = report.examples[0].prediction
    assert prediction["visible_after_generate"] is False
    assert prediction["visible_after_refine"] is True
    assert report.stage_metrics == {"generate": 0.0, "refine": 1.0}
    assert report.score == 1.0


def test_refine_is_skipped_when_the_visible_test_passes(tmp_path: Path) -> None:
    seen, report = _run(tmp_path, REFERENCE, "unused")
    assert len(seen) == 1
    prediction = report.examples[0].prediction
    assert prediction["refined"] is False
    assert report.stage_metrics == {"generate": 1.0, "refine": 1.0}


def test_hidden_tests_decide_the_score(tmp_path: Path) -> None:
    # passes the visible test only
    cheat = "def add(a, b):\n    return 3"
    _, report = _run(tmp_path, cheat, "unused")
    assert report.stage_metrics == {"generate": 1.0, "refine": 1.0}
    assert report.score == 0.0


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        MBPPTask(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        MBPPTask(memory_mb=8)

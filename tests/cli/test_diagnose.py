"""``stageopt diagnose`` end to end on the scripted HotpotQA LM: tables on stdout, diagnosis.json on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageopt.cli import _commands
from stageopt.cli._main import main
from stageopt.tasks import HotpotQATask
from tests.conftest import scripted_lm
from tests.tasks.test_hotpotqa import ROW, _write


def answer_needs_a_demo(prompt: str) -> str:
    """The answer stage answers only with a demo in its prompt (and the France paragraph retrieved)."""
    blocks = prompt.split("\n\n---\n\n")
    last = blocks[-1]
    if last.rstrip().endswith("Answer:"):
        return " Paris" if len(blocks) >= 3 and "[France]" in last else " unknown"
    if "Passages:" in last:
        return " capital of France"
    return " Lyon city"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _write(tmp_path / "data", [{**ROW, "id": f"x{i}"} for i in range(4)], "dev")


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_resolve(spec: str, **kwargs: Any) -> dspy.LM:
        return scripted_lm(answer_needs_a_demo)

    monkeypatch.setattr(_commands, "resolve_lm", fake_resolve)


@pytest.fixture
def tuned(tmp_path: Path) -> Path:
    """The unoptimized program plus one labeled demo on the answer stage, saved as `optimize` saves it."""
    program = HotpotQATask().program()
    program.answer.demos = [
        dspy.Example(question="Capital of Italy?", passages="[Italy] Rome is its capital.", answer="Rome")
    ]
    path = tmp_path / "program.json"
    program.save(str(path))
    return path


def test_diagnose_prints_tables_and_writes_the_json(
    data: Path, scripted: None, tuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["diagnose", "--data-dir", str(data), "--n", "3", "--program", str(tuned), "--out", str(out)]
    assert main([*argv, "--threshold", "query1=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "baseline: the task's unoptimized program (no --baseline given)" in printed
    for heading in ("Stages", "Error origins", "Attribution (Shapley, exact over 8 programs)", "Oracle", "usage:"):
        assert heading in printed
    saved = json.loads((out / "diagnosis.json").read_text())
    assert (saved["task"], saved["metric"], saved["n"], saved["score"]) == ("hotpotqa", "F1", 3, 1.0)
    assert list(saved["stages"]) == ["query1", "query2", "answer"]
    assert saved["error_origins"]["thresholds"] == {"query1": 0.5, "query2": 1.0}
    attribution = saved["attribution"]
    assert attribution["baseline_score"] == 0.0
    shapley = {name: s["shapley"] for name, s in attribution["stages"].items()}
    assert shapley == pytest.approx({"query1": 0.0, "query2": 0.0, "answer": 1.0})
    assert sum(shapley.values()) == pytest.approx(attribution["program_score"] - attribution["baseline_score"])
    assert saved["oracle"]["answer"]["score"] == 1.0
    assert saved["usage"]["lm_calls"] == 8 * 3 * 3 + 3


def test_diagnose_without_a_program_has_no_attribution(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "d.json"
    assert main(["diagnose", "--data-dir", str(data), "--n", "2", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "no attribution" in printed
    saved = json.loads(report.read_text())
    assert saved["attribution"] is None
    assert saved["score"] == 0.0
    assert saved["error_origins"]["failed"] == 2
    assert sum(saved["error_origins"]["counts"].values()) == 2
    assert saved["oracle"]["answer"]["score"] == 0.0  # no demo: the answer stage fails even given gold


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--threshold", "query1"], "write STAGE=VALUE"),
        (["--threshold", "answer=0.5"], "thresholds given for answer, which have no stage metric"),
        (["--program", "missing.json"], "--program missing.json does not exist"),
        (["--baseline", "missing.json"], "--baseline missing.json does not exist"),
        (["--max-hybrids", "0"], "`max_hybrids` must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, data: Path, scripted: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", "--data-dir", str(data), "--n", "2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stageopt: error: ")
    assert message in err[-1]

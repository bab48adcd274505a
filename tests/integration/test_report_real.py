"""`stageopt optimize` on the real embedded model (HotpotQA, tiny budget), then `stageopt report` on its run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageopt.cli import _commands
from stageopt.cli._main import main
from stageopt.lm import LocalLM
from tests.report.test_report import _parse, _row

pytestmark = pytest.mark.integration

BUDGET = 40


def test_report_on_a_real_optimization_run(
    gemma: LocalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def session_model(spec: str, **kwargs: Any) -> dspy.BaseLM:
        return gemma  # the session's model, loaded once, instead of a second copy

    monkeypatch.setattr(_commands, "resolve_lm", session_model)
    run = tmp_path / "run"
    argv = ["optimize", "--task", "hotpotqa", "--budget-calls", str(BUDGET), "--out", str(run), "--n-train", "8"]
    assert main([*argv, "--val-size", "2", "--bootstrap-size", "2", "--no-cache", "--confirm-size", "0"]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["usage"]["lm_calls"] <= BUDGET

    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [f"wrote {run / 'report.html'}", f"wrote {run / 'report.md'}"]
    page = _parse((run / "report.html").read_text())
    stages = page.tables["stages-1"]
    assert [r[0] for r in stages[1:4]] == ["query1", "query2", "answer"]
    assert _row(stages, "end to end (F1)")[1] == f"{result['baseline']['score']:.3f}"
    assert _row(page.tables["summary"], "strategy")[1] == "coordinate"
    assert _row(page.tables["summary"], "Optuna trials (complete)")[1] == str(len(result["history"]))
    assert page.images["convergence-plot"].startswith("data:image/png;base64,")
    assert "| query1 |" in (run / "report.md").read_text()

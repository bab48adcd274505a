"""`stageopt compare` on the real embedded model: a stageopt strategy and DSPy's MIPROv2, one seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stageopt.cli._main import main

pytestmark = pytest.mark.integration

BUDGET = 30


def test_compare_on_the_real_model(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "hotpotqa", "--methods", "joint,mipro", "--budget-calls", str(BUDGET), "--seeds", "1"]
    extra = ["--n-eval", "2", "--val-size", "2", "--bootstrap-size", "2", "--confirm-size", "0"]
    assert main([*argv, *extra, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"results.json", "table.md", "convergence.png"}
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {"unoptimized/all", "single_stage/all", "joint/seed0", "mipro/seed0"}
    for name in ("joint/seed0", "mipro/seed0"):
        cell = cells[name]
        assert cell["status"] in {"completed", "budget_exhausted", "early_stopped"}, cell.get("note")
        assert 0 < cell["usage"]["lm_calls"] <= BUDGET
        dev = cell["eval"]["dev"]
        assert dev["n"] == 2
        assert set(dev["stage_metrics"]) == {"query1", "query2"}
    table = (out / "table.md").read_text()
    assert "| joint |" in table
    assert "| mipro |" in table
    assert "| single_stage |" in table

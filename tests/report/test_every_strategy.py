"""`stageopt report` on real run directories: every strategy and `demo`, run by the CLI on the scripted LM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageopt.cli import _commands
from stageopt.cli._main import STRATEGY_NAMES, main
from stageopt.diagnostics import diagnose
from stageopt.lm import SmallLMAdapter
from stageopt.report import load_runs
from stageopt.tasks import get_task
from tests.conftest import scripted_lm
from tests.report.test_report import _parse, _row
from tests.tasks.test_hotpotqa import ROW, _script, _write

BUDGET = 60


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = _write(tmp_path / "data", [{**ROW, "id": f"x{i}"} for i in range(4)], "dev")
    return _write(root, [{**ROW, "id": f"t{i}"} for i in range(8)], "train")


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_resolve(spec: str, **kwargs: Any) -> dspy.LM:
        return scripted_lm(_script)

    monkeypatch.setattr(_commands, "resolve_lm", fake_resolve)


def test_report_compares_runs_of_every_strategy_and_demo(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data-dir", str(data), "--budget-calls", str(BUDGET), "--val-size", "3", "--bootstrap-size", "3"]
    runs = []
    for strategy in STRATEGY_NAMES:
        out = tmp_path / "runs" / strategy
        patience = ["--option", "patience=2"] if strategy in {"joint", "random"} else []
        assert main(["optimize", *common, "--out", str(out), "--strategy", strategy, *patience]) == 0
        runs.append(out)
    demo = ["demo", "--data-dir", str(data), "--n", "2", "--budget-calls", str(BUDGET), "--val-size", "2"]
    assert main([*demo, "--bootstrap-size", "2", "--out", str(tmp_path / "demo")]) == 0
    (demo_run,) = (tmp_path / "demo").iterdir()
    runs.append(demo_run)
    capsys.readouterr()

    # diagnose the coordinate run's program against the unoptimized one, into its run directory
    diagnosed = STRATEGY_NAMES.index("coordinate") + 1  # its section number in the report
    task = get_task("hotpotqa", data_dir=data)
    program = task.program()
    program.load(str(runs[diagnosed - 1] / "program.json"))
    diagnosis = diagnose(
        program, task.load("dev", n=3), task=task, baseline=task.program(), lm=scripted_lm(_script),
        adapter=SmallLMAdapter(),
    )  # fmt: skip
    (runs[diagnosed - 1] / "diagnosis.json").write_text(json.dumps(diagnosis.to_dict()))

    out = tmp_path / "report" / "all.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(out), "wrote", str(out.with_suffix(".md"))]
    page = _parse(out.read_text())
    labels = [*STRATEGY_NAMES, demo_run.name]
    assert page.tables["summary"][0] == ["", *labels]
    assert _row(page.tables["summary"], "strategy")[1:] == [*STRATEGY_NAMES, "coordinate"]
    loaded = load_runs(runs)
    for i, run in enumerate(loaded, 1):
        stages = page.tables[f"stages-{i}"]
        assert [r[0] for r in stages[1:4]] == ["query1", "query2", "answer"], run.label
        assert f"settings-{i}" in page.tables
        # every trial the run recorded is a completed trial of its Optuna study
        assert sum(s.n_complete for s in run.studies) == len(run.result.history), run.label
    # the demo run's before/after reports fill its table with dev numbers
    assert "parsed before" in page.tables[f"stages-{len(runs)}"][0]
    assert "parsed before" not in page.tables["stages-1"][0]
    assert "convergence-plot" in page.images
    # the real diagnosis of the coordinate run fills its error-origin and attribution sections, and only its
    i = diagnosed
    assert [r[0] for r in page.tables[f"error-origins-{i}"][1:]] == ["query1", "query2", "answer"]
    assert [r[0] for r in page.tables[f"attribution-{i}"][1:]] == ["query1", "query2", "answer"]
    assert {f"origins-plot-{i}", f"attribution-plot-{i}"} <= set(page.images)
    assert sum(t.startswith("error-origins-") for t in page.tables) == 1

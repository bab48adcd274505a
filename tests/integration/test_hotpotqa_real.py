"""The HotpotQA program on the real embedded model: parsing, stage traces, CLI eval and optimize."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.tasks import data_dir, get_task

pytestmark = pytest.mark.integration


def test_three_stages_run_and_parse_on_dev(gemma: LocalLM) -> None:
    task = get_task("hotpotqa")
    examples = task.load("dev", n=3)
    report = evaluate(
        task.program(),
        examples,
        task.metric,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        extra_metrics=task.extra_metrics(),
    )
    assert report.errors == 0
    assert list(report.stages) == ["query1", "query2", "answer"]
    assert all(stage.calls == 3 for stage in report.stages.values())
    # the blank-first-token rule: every one-line field gets text
    assert report.parse_rate == 1.0
    for result in report.examples:
        calls = result.calls
        assert [c.stage for c in calls] == ["query1", "query2", "answer"]
        assert all(c.prompt_tokens > 0 and c.completion_tokens > 0 and c.latency_s > 0 for c in calls)
        assert result.prediction["answer"].strip()
    assert 0.0 <= report.stage_metrics["query1"] <= report.stage_metrics["query2"] <= 1.0


def _stageopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stageopt.cli._main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        check=False,
    )


def test_cli_optimize_then_eval_on_real_model(tmp_path: Path) -> None:
    data = data_dir()
    out = tmp_path / "run"
    budget = 45
    args = ["optimize", "--task", "hotpotqa", "--budget-calls", str(budget), "--out", str(out), "--no-cache"]
    done = _stageopt(
        *args, "--data-dir", str(data), "--val-size", "2", "--bootstrap-size", "3", "--confirm-size", "0", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["usage"]["lm_calls"] <= budget
    assert result["history"][0]["stage"] is None  # the baseline trial comes first
    assert result["best"]["score"] >= result["baseline"]["score"]
    assert (out / "optuna.db").stat().st_size > 0

    report = tmp_path / "eval.json"
    ev = _stageopt(
        "eval", "--n", "2", "--data-dir", str(data), "--program", str(out / "program.json"), "--json", str(report),
        cwd=tmp_path,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "query1" in ev.stdout
    assert "answer" in ev.stdout
    assert json.loads(report.read_text())["usage"]["lm_calls"] == 6

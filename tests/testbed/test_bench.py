"""Strategies on the testbed, error rows, and `stageopt bench testbed` end to end (SIMULATION)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stageopt._errors import ConfigurationError
from stageopt.cli._bench import bench_table
from stageopt.strategies import STRATEGIES, BaseStageOptimizer, RunState
from stageopt.testbed import known_strategies, resolve_strategies, run_one, summarize

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("strategy", ["coordinate", "joint"])
def test_strategy_improves_on_the_baseline(strategy: str) -> None:
    runs = [run_one(strategy, budget_calls=600, seed=seed) for seed in range(3)]
    for run in runs:
        assert run.status != "error", run.error
        assert run.true_score is not None
        assert run.regret is not None
        assert run.true_score > run.baseline, (run.seed, run.true_score, run.baseline)
        assert run.regret >= -1e-12
        assert run.pool_optimum is not None
        assert run.pool_optimum <= run.optimum + 1e-12
        assert run.lm_calls <= 600
    gain = sum((r.true_score or 0.0) - r.baseline for r in runs) / len(runs)
    assert gain > 0.15


def test_history_and_observed_calls_agree_for_stageopt() -> None:
    run = run_one("joint", budget_calls=900, seed=1, threshold=0.6)
    assert run.calls_to_95 is not None
    assert run.calls_to_95_source == "history"
    assert run.calls_to_95 == run.calls_to_95_observed


def test_runs_are_deterministic() -> None:
    first, second = (run_one("joint", budget_calls=400, seed=2).to_dict() for _ in range(2))
    first.pop("wall_s"), second.pop("wall_s")
    assert first == second


class _Unfinished(BaseStageOptimizer):
    strategy_name = "unfinished"

    def _search(self, state: RunState) -> tuple[str, str | None]:
        raise NotImplementedError("unfinished is being written")


def test_a_strategy_being_written_is_an_error_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STRATEGIES, "unfinished", _Unfinished)
    assert "unfinished" in known_strategies()
    runs = [run_one("unfinished", budget_calls=300, seed=0), run_one("random", budget_calls=300, seed=0)]
    assert runs[0].status == "error"
    assert runs[0].error == "NotImplementedError: unfinished is being written"
    summary = summarize(runs)
    assert summary["unfinished"]["ok"] == 0
    assert summary["unfinished"]["regret"] is None
    assert summary["random"]["ok"] == 1
    table = bench_table(summary)
    assert "NotImplementedError: unfinished is being written" in table
    assert "SIMULATION" in table


def test_strategy_names_are_checked() -> None:
    assert resolve_strategies("all") == [*STRATEGIES, "miprov2", "bfsrs"]
    assert resolve_strategies("joint, miprov2,joint") == ["joint", "miprov2"]
    with pytest.raises(ConfigurationError, match="nope"):
        resolve_strategies("joint,nope")


def test_cli_bench_writes_json_with_a_miprov2_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "stageopt.cli._main", "bench", "testbed"]
    command += ["--strategies", "random,miprov2,bfsrs", "--budget-calls", "500", "--seeds", "2", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "SIMULATION" in done.stdout
    assert "miprov2" in done.stdout
    data = json.loads(out.read_text())
    assert data["kind"] == "simulation"
    assert "SIMULATION" in data["note"]
    assert data["command"].startswith("stageopt bench testbed --strategies random,miprov2,bfsrs --budget-calls 500")
    assert set(data["summary"]) == {"random", "miprov2", "bfsrs"}
    mipro = [r for r in data["runs"] if r["strategy"] == "miprov2"]
    assert len(mipro) == 2
    for run in mipro:
        assert run["status"] in ("completed", "budget_exhausted"), run["error"]
        assert run["lm_calls"] <= 500
        assert run["regret"] >= -1e-12
        assert run["calls_to_95_source"] == "observed"
    assert data["summary"]["miprov2"]["ok"] == 2

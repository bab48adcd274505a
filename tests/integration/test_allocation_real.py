"""Budget by stage criticality on the real embedded model: HotpotQA coordinate descent, blame allocation.

A tiny budget on 3 validation examples: checks that the probe phase runs on the real path, is
recorded and paid from the budget, and that the run's convergence can be analysed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stageopt.diagnostics import analyze_convergence
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import CoordinateDescent
from stageopt.strategies._allocation import PROBE_PHASE
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

BUDGET = 90


def test_coordinate_blame_allocation_on_hotpotqa(gemma: LocalLM, tmp_path: Path) -> None:
    task = get_task("hotpotqa")
    optimizer = CoordinateDescent(
        task.metric,
        budget=BUDGET,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        bootstrap_size=2,
        val_size=3,
        confirm_size=0,
        max_rounds=1,
        trials_per_stage=1,
        allocate={"probe_size": 2, "probe_trials_per_stage": 1},
        seed=0,
        run_dir=tmp_path,
    )
    optimizer.compile(task.program(), trainset=task.load("train", n=8))
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET

    probes = [h for h in result.history if h["phase"] == PROBE_PHASE]
    assert probes, f"no probe trial: {result.stop_reason}"
    assert probes[0]["stage"] is None  # the original program on the probe subset first
    assert all(p["fidelity"] == 2 for p in probes)
    assert {p["stage"] for p in probes[1:]} <= {"query1", "query2", "answer"}
    assert result.best["trial"] not in {p["trial"] for p in probes}
    calls = [h["lm_calls"] for h in result.history]
    assert calls == sorted(calls)
    assert probes[-1]["lm_calls"] > result.history[0]["lm_calls"]  # probes spent budget

    allocation = result.notes["allocation"]
    assert allocation["rule"] == "blame"
    if allocation["probe"] is not None:  # the probes finished within the budget
        assert len(probes) == 1 + 3
        assert sum(allocation["probe"]["shares"].values()) == pytest.approx(1.0)
        assert all(t >= 1 for t in allocation["targets"].values())

    report = analyze_convergence(result)
    assert report.stopping["status"] == result.status
    assert report.curve
    assert report.curve[0].score == result.baseline["score"]
    json.dumps(report.to_dict())

"""Score against cost on the real embedded model: HotpotQA, NSGA-II Pareto search with a prompt limit.

A tiny budget on 3 validation examples: checks that real calls are measured (tokens grow with
demos, latency is wall time), that a per-stage prompt limit marks trials infeasible, and that
the front, the picked program and the report hold together on the real path.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import Limits, OptimizationResult, Pareto, ParetoFront, ParetoRule
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

BUDGET = 60
#: Well above the original prompts (a few hundred tokens), below a prompt with several demos.
PROMPT_LIMIT = 1200


def test_pareto_score_against_tokens_on_hotpotqa(gemma: LocalLM, tmp_path: Path) -> None:
    task = get_task("hotpotqa")
    trainset = task.load("train", n=8)
    optimizer = Pareto(
        task.metric,
        budget=BUDGET,
        objectives=("score", "tokens", "latency"),
        rule=ParetoRule(at_most={"tokens": 4 * PROMPT_LIMIT}),
        population_size=4,
        limits=Limits(max_prompt_tokens=PROMPT_LIMIT),
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        bootstrap_size=2,
        val_size=3,
        confirm_size=0,
        seed=0,
        run_dir=tmp_path,
    )
    program = optimizer.compile(task.program(), trainset=trainset)
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET
    assert result.history, f"no trial: {result.stop_reason}"

    for h in result.history:  # every trial measured from the real calls
        measured = h["objectives"]
        assert measured["tokens"] > 0
        assert measured["latency"] > 0
        assert set(measured["prompt_tokens"]) <= {"query1", "query2", "answer"}
        over = max(measured["prompt_tokens"].values()) > PROMPT_LIMIT
        assert h["feasible"] is not over
    baseline = result.history[0]
    assert baseline["phase"] == "baseline"

    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.directions) == 3
    front = ParetoFront.from_result(OptimizationResult.from_dict(json.loads(json.dumps(result.to_dict()))))
    assert front == optimizer.front
    if result.status != "infeasible":
        assert front.points
        assert all(p.feasible for p in front.points)
        (picked,) = [p for p in front.points if p.trial == result.best["trial"]]
        assert result.notes["pareto"]["picked"] == picked.trial
        assert picked.values["tokens"] <= 4 * PROMPT_LIMIT
        # the returned program is the picked point's configuration
        demos = {name: len(p.demos) for name, p in program.named_predictors()}
        assert demos == {stage: params["n_demos"] for stage, params in picked.program.items()}
    else:
        assert "no configuration met the limits" in (result.stop_reason or "")
    # any point of the front rebuilds into a program that runs on the real model
    rebuilt = optimizer.program_for(front.points[0])
    report = evaluate(rebuilt, trainset[:1], task.metric, lm=gemma, adapter=SmallLMAdapter())
    assert report.n == 1
    assert report.usage.lm_calls >= 1

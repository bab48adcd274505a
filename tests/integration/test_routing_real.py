"""Per-stage routing between the two embedded models, and structure search, on real HotpotQA examples.

Gemma 3 270M is the run's LM; SmolLM2 135M is the second model a stage may be routed to. Two
dev examples each; the DSPy cache is off, so every call reaches a model and has a latency.
"""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import STRUCTURE, JointBayesian, SearchSpace
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def smol() -> LocalLM:
    return LocalLM(SMOL, cache=False)


def test_a_stage_routed_to_smollm_runs_on_smollm(gemma: LocalLM, smol: LocalLM) -> None:
    task = get_task("hotpotqa")
    examples = task.load("dev", n=2)
    space = SearchSpace.initial(task.program(), settings={"model": [SMOL]}, models={SMOL: smol})
    config = space.default_config()
    config["answer"]["model"] = 1
    report = evaluate(
        space.apply(task.program(), config),
        examples,
        task.metric,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
    )
    assert report.errors == 0
    for result in report.examples:
        by_stage = {c.stage: c.model for c in result.calls}
        assert by_stage == {"query1": gemma.model, "query2": gemma.model, "answer": smol.model}
        assert all(c.latency_s > 0 and c.completion_tokens > 0 for c in result.calls)
        assert isinstance(result.prediction["answer"], str)


def test_joint_search_over_models_and_structure(gemma: LocalLM, smol: LocalLM, tmp_path: Path) -> None:
    task = get_task("hotpotqa")
    budget = 36
    optimizer = JointBayesian(
        task.metric,
        budget=budget,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        bootstrap_size=2,
        val_size=2,
        confirm_size=0,
        seed=0,
        n_trials=3,
        run_dir=tmp_path,
        settings={"model": [SMOL], "structure": ["hops"]},
        models={SMOL: smol},
    )
    program = optimizer.compile(task.program(), trainset=task.load("train", n=6))
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= budget
    assert len(result.history) >= 2, result.stop_reason
    assert set(result.best["params"][STRUCTURE]) == {"hops"}
    routed = {p["model"] for s, p in result.best["params"].items() if s != STRUCTURE}
    assert routed <= {None, SMOL}
    assert program.hops == result.best["params"][STRUCTURE]["hops"]
    for stage, predictor in program.named_predictors():
        expected = smol if result.best["params"][stage]["model"] == SMOL else None
        assert predictor.lm is expected
    with dspy.context(lm=gemma, adapter=SmallLMAdapter()):
        prediction = program(**task.load("dev", n=1)[0].inputs())
    assert isinstance(prediction.answer, str)

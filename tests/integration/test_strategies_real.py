"""Every registered strategy on the real embedded model: the HotpotQA program, a tiny budget.

The DSPy cache is on here (private to the test session), so the bootstrap and baseline that all
strategies share run once on the model; budgets still count every logical call.
"""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import STRATEGIES
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

BUDGET = 40


@pytest.fixture(scope="module")
def cached_gemma() -> LocalLM:
    return LocalLM("gemma3-270m", cache=True)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_runs_on_the_real_model(name: str, cached_gemma: LocalLM, tmp_path: Path) -> None:
    task = get_task("hotpotqa")
    optimizer = STRATEGIES[name](
        task.metric,
        budget=BUDGET,
        lm=cached_gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        bootstrap_size=2,
        val_size=2,
        confirm_size=0,  # 40 calls: room for trials, not for a held-out check (test_confirm_real)
        seed=0,
        run_dir=tmp_path,
    )
    program = optimizer.compile(task.program(), trainset=task.load("train", n=8))
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET
    phases = [h["phase"] for h in result.history]
    assert phases[0] == "baseline"
    assert len(phases) >= 2, f"{name} scored at least one configuration besides the baseline: {result.stop_reason}"
    assert result.best["score"] >= result.baseline["score"]
    assert (tmp_path / "optuna.db").stat().st_size > 0
    # The returned program is runnable as it stands and is the best configuration's.
    assert [n for n, _ in program.named_predictors()] == ["query1", "query2", "answer"]
    for stage, params in result.best["params"].items():
        assert len(dict(program.named_predictors())[stage].demos) == params["n_demos"]
    with dspy.context(lm=cached_gemma, adapter=SmallLMAdapter()):
        prediction = program(**task.load("dev", n=1)[0].inputs())
    assert isinstance(prediction.answer, str)

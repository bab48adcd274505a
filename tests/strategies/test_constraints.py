"""Limits (constraints): measuring trials, infeasible trials never returned, Optuna told, CLI flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.cli._limits import limit_options, parse_prompt_limits, resolve_strategy
from stageopt.cli._main import build_parser
from stageopt.evaluation import ExampleResult, ModelPrice, StageCall, parse_price
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import (
    STRATEGIES,
    BaseStageOptimizer,
    JointBayesian,
    Limits,
    OptimizationResult,
    TrialMeasures,
    TrialRecord,
    measure,
)
from stageopt.strategies._constraints import CONSTRAINTS_ATTR
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm

#: In the toy task the ``capital`` stage's prompt is 12 tokens without demos and more with any.
CAPITAL_WITHOUT_DEMOS = 12


def _example(index: int, calls: list[StageCall]) -> ExampleResult:
    return ExampleResult(index, None, 1.0, {}, {}, {}, calls)


def _run(strategy: type[BaseStageOptimizer], budget: int, **kwargs: Any) -> tuple[BaseStageOptimizer, dspy.Module]:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "val_size": 6,
        "seed": 0,
    }
    settings.update(kwargs)
    optimizer = strategy(capital_metric, budget=budget, **settings)
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    return optimizer, program


def _full(result: OptimizationResult) -> list[dict[str, Any]]:
    n = result.baseline["n"]
    return [h for h in result.history if h["fidelity"] == n and h["variant"] is None]


# ---- measuring -----------------------------------------------------------------------------


def test_measure_means_percentile_prices_and_largest_prompts() -> None:
    prices = {"gpt-4o-mini": ModelPrice(1.0, 2.0)}  # dollars per million prompt / completion tokens
    examples = [
        _example(0, [StageCall("a", 100, 10, 0.5, model="openai/gpt-4o-mini"), StageCall("b", 40, 5, 0.25)]),
        _example(1, [StageCall("a", 300, 20, 1.5, model="openai/gpt-4o-mini"), StageCall("b", 20, 5, 0.5)]),
    ]
    m = measure(examples, prices)
    assert m.tokens == pytest.approx(((100 + 10 + 40 + 5) + (300 + 20 + 20 + 5)) / 2)
    # stage b's model has no price (an embedded model): it costs nothing
    assert m.cost == pytest.approx(((100 * 1 + 10 * 2) + (300 * 1 + 20 * 2)) / 1e6 / 2)
    assert m.latency == pytest.approx(2.0)  # nearest-rank p95 of the example totals 0.75 and 2.0
    assert m.prompt_tokens == {"a": 300, "b": 40}
    assert m.n == 2
    assert TrialMeasures.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert measure([]) == TrialMeasures(0.0, 0.0, 0.0, {}, 0)


def test_limits_constraints_and_violations() -> None:
    limits = Limits(max_tokens_per_example=100, max_p95_latency_s=1.0, max_prompt_tokens={"a": 200, "*": 50})
    m = TrialMeasures(tokens=150.0, cost=0.0, latency=0.5, prompt_tokens={"a": 150, "b": 60})
    values = limits.constraints(m, ["a", "b"])
    assert list(values) == ["tokens", "latency", "prompt_tokens:a", "prompt_tokens:b"]
    assert values["tokens"] == pytest.approx(0.5)
    assert values["latency"] == pytest.approx(-0.5)
    assert values["prompt_tokens:a"] == pytest.approx(-0.25)
    assert values["prompt_tokens:b"] == pytest.approx(0.2)
    broken = limits.violations(m, ["a", "b"])
    assert broken == ["tokens per example 150 > 100", "prompt tokens of stage 'b' 60 > 50"]
    assert limits.violations(TrialMeasures(10.0, 0.0, 0.1, {"a": 10, "b": 10}), ["a", "b"]) == []
    assert Limits.from_dict(json.loads(json.dumps(limits.to_dict()))) == limits


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens_per_example": 0}, "max_tokens_per_example"),
        ({"max_p95_latency_s": -1.0}, "max_p95_latency_s"),
        ({"max_cost_per_example": 0.01}, "needs prices"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"max_prompt_tokens": {"a": "many"}}, "max_prompt_tokens"),
        ({"prices": {"m": (1.0, 2.0)}}, "ModelPrice"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Limits(**kwargs)


def test_unknown_stage_in_a_prompt_limit_is_refused_before_any_call() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    optimizer = JointBayesian(capital_metric, budget=100, lm=lm, limits=Limits(max_prompt_tokens={"nope": 10}))
    with pytest.raises(ConfigurationError, match=r"unknown stage.*\['nope'\]"):
        optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert lm.engine.calls == 0
    with pytest.raises(TypeError, match="limits"):
        JointBayesian(capital_metric, budget=100, limits={"max_tokens_per_example": 10})


# ---- strategies --------------------------------------------------------------------------


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request: pytest.FixtureRequest) -> type[BaseStageOptimizer]:
    return STRATEGIES[request.param]


def test_every_strategy_returns_a_feasible_program(strategy: type[BaseStageOptimizer]) -> None:
    """Demos on ``capital`` break its prompt limit: the best trial never has them, though they score as well."""
    limits = Limits(max_prompt_tokens={"capital": CAPITAL_WITHOUT_DEMOS})
    optimizer, program = _run(strategy, 250, limits=limits)
    result = optimizer.result
    assert result is not None
    assert all(h["objectives"] is not None for h in result.history), "every trial is measured"
    infeasible = [h for h in result.history if not h["feasible"]]
    assert all(h["objectives"]["prompt_tokens"]["capital"] > CAPITAL_WITHOUT_DEMOS for h in infeasible)
    assert all(h["violations"] for h in infeasible)
    assert result.best["feasible"] is True
    (best,) = [h for h in result.history if h["trial"] == result.best["trial"]]
    assert best["feasible"]
    assert best["objectives"]["prompt_tokens"]["capital"] <= CAPITAL_WITHOUT_DEMOS
    assert result.best["score"] == max(h["score"] for h in _full(result) if h["feasible"])
    assert not program.capital.demos, "the returned program keeps the capital stage's prompt small"
    assert result.notes["limits"]["max_prompt_tokens"] == {"capital": CAPITAL_WITHOUT_DEMOS}
    assert result.notes["limits"]["feasible_trials"] == sum(h["feasible"] for h in _full(result))


def test_a_limit_changes_what_is_returned() -> None:
    free, _ = _run(JointBayesian, 300)
    assert free.result is not None
    limit = 30.0  # between the cheapest perfect program (locate demos only) and the rest
    limited, program = _run(JointBayesian, 300, limits=Limits(max_tokens_per_example=limit))
    assert limited.result is not None
    assert limited.result.best["score"] == 1.0
    assert limited.result.best["objectives"]["tokens"] <= limit
    assert free.result.best["objectives"]["tokens"] > limit, "without the limit a dearer program wins"
    assert program.locate.demos
    assert not program.capital.demos


def test_nothing_feasible_says_so_and_returns_the_original_program() -> None:
    optimizer, program = _run(JointBayesian, 120, limits=Limits(max_tokens_per_example=5))
    result = optimizer.result
    assert result is not None
    assert result.status == "infeasible"
    assert result.stop_reason is not None
    assert result.stop_reason.startswith("no configuration met the limits")
    assert "tokens per example" in result.stop_reason
    assert result.best["score"] is None
    assert result.best["trial"] is None
    assert result.best["feasible"] is False
    assert result.history
    assert not any(h["feasible"] for h in result.history)
    assert not program.locate.demos
    assert not program.capital.demos
    assert OptimizationResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_constraints_reach_optuna() -> None:
    storage = optuna.storages.InMemoryStorage()
    limits = Limits(max_prompt_tokens={"capital": CAPITAL_WITHOUT_DEMOS})
    optimizer, _ = _run(JointBayesian, 250, limits=limits, storage=storage)
    assert optimizer.result is not None
    study = optuna.load_study(study_name="joint", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for trial in trials:
        values = trial.user_attrs[CONSTRAINTS_ATTR]
        assert (max(values) <= 0) == trial.user_attrs["feasible"]
    if hasattr(optuna.trial.FrozenTrial, "constraints"):  # Optuna >= 5 reads them itself
        assert all(set(t.constraints) == {"prompt_tokens:capital"} for t in trials)
        assert study.best_trial.user_attrs["feasible"]
        assert study.best_trial.value == optimizer.result.best["score"]


def test_resume_keeps_measures_and_feasibility() -> None:
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    limits = Limits(max_prompt_tokens={"capital": CAPITAL_WITHOUT_DEMOS})
    first, _ = _run(JointBayesian, 70, limits=limits, storage=storage)
    assert first.result is not None
    assert first.result.status == "budget_exhausted"
    second, _ = _run(JointBayesian, 200, limits=limits, storage=storage)
    assert second.result is not None
    done = len(first.result.history)
    assert second.result.history[:done] == first.result.history
    repeated = [h for h in second.result.history[done:] if h["repeated"]]
    for h in repeated:  # a configuration told again keeps its measures and verdict
        (old,) = [o for o in second.result.history if not o["repeated"] and o["params"] == h["params"]]
        assert (h["objectives"], h["feasible"]) == (old["objectives"], old["feasible"])
    assert second.result.best["feasible"]


def test_older_results_and_trials_still_load() -> None:
    old: dict[str, Any] = {
        "trial": 3,
        "phase": "joint",
        "stage": None,
        "round": None,
        "params": {"a": {"instruction": 0, "demos": 1}},
        "fidelity": 6,
        "score": 0.5,
        "stage_metrics": {},
        "lm_calls": 10,
        "tokens": 100,
        "wall_s": 1.0,
    }
    record = TrialRecord(**old)
    assert record.objectives is None
    assert record.feasible
    assert record.violations == []
    data = {
        "schema_version": 1,
        "strategy": "joint",
        "seed": 0,
        "budget": {},
        "usage": {},
        "baseline": {"score": 0.1},
        "best": {"score": 0.5},
        "history": [old],
        "status": "completed",
    }
    assert OptimizationResult.from_dict(data).improvement == pytest.approx(0.4)


# ---- CLI -----------------------------------------------------------------------------------


def _args(*flags: str) -> Any:
    return build_parser().parse_args(["optimize", "--budget-calls", "10", "--out", "x", *flags])


def test_cli_limit_flags_become_limits() -> None:
    args = _args(
        "--max-tokens-per-example",
        "400",
        "--max-p95-latency",
        "2.5",
        "--max-prompt-tokens",
        "900",
        "--max-prompt-tokens",
        "answer=1500",
        "--max-cost-per-example",
        "0.001",
    )
    strategy = resolve_strategy(args)
    assert strategy == "coordinate"
    extra = limit_options(args, strategy, dict([parse_price("gpt-4o-mini=0.15/0.60")]))
    limits = extra["limits"]
    assert limits.max_tokens_per_example == 400
    assert limits.max_p95_latency_s == 2.5
    assert limits.max_cost_per_example == 0.001
    assert limits.prompt_limit("answer") == 1500
    assert limits.prompt_limit("query1") == 900
    assert limits.prices["gpt-4o-mini"] == ModelPrice(0.15, 0.60)
    assert limit_options(_args(), "coordinate") == {}
    assert parse_prompt_limits(["700"]) == 700
    with pytest.raises(ConfigurationError, match="STAGE=N"):
        parse_prompt_limits(["answer=lots"])
    with pytest.raises(ConfigurationError, match="needs prices"):
        limit_options(_args("--max-cost-per-example", "0.01"), "coordinate")


def test_cli_optimize_with_a_limit_writes_feasibility(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stageopt.cli import _commands
    from stageopt.cli._main import main
    from tests.tasks.test_hotpotqa import ROW, _script, _write

    root = _write(tmp_path / "data", [{**ROW, "id": f"x{i}"} for i in range(2)], "dev")
    root = _write(root, [{**ROW, "id": f"t{i}"} for i in range(8)], "train")
    monkeypatch.setattr(_commands, "resolve_lm", lambda spec, **kwargs: scripted_lm(_script))
    out = tmp_path / "run"
    common = ["--data-dir", str(root), "--budget-calls", "60", "--val-size", "3", "--bootstrap-size", "3"]
    assert main(["optimize", *common, "--out", str(out), "--strategy", "joint", "--max-tokens-per-example", "1"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "infeasible"
    assert result["notes"]["limits"]["max_tokens_per_example"] == 1
    assert all(not h["feasible"] for h in result["history"])

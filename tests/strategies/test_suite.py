"""The contract every registered strategy must meet, run once per name in ``STRATEGIES``.

Optuna-style: the strategy class is a fixture, so a strategy registered in
``stageopt.strategies.STRATEGIES`` is tested here without touching this file. Every run uses the
toy two-stage program of ``tests/conftest.py``, whose scripted LM answers stage 1 only when the
prompt holds a demo, the strategy's own default settings, and DSPy's cache off, so the scripted
engine sees every logical LM call.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.evaluation import Budget
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import STRATEGIES, BaseStageOptimizer, OptimizationResult, config_key, get_strategy
from stageopt.strategies._result import STATUSES
from tests.conftest import (
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)

#: Validation examples; a trial on all of them costs 2 * VAL_SIZE LM calls (two stages, one call each).
VAL_SIZE = 6


class Crash(BaseException):
    """Stands in for a killed process (not an ``Exception``, so nothing on the way catches it)."""


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request: pytest.FixtureRequest) -> type[BaseStageOptimizer]:
    return STRATEGIES[request.param]


def build(strategy: type[BaseStageOptimizer], budget: Any, **kwargs: Any) -> BaseStageOptimizer:
    """The strategy with its own defaults, on the toy task's settings."""
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "val_size": VAL_SIZE,
        "seed": 0,
    }
    settings.update(kwargs)
    return strategy(capital_metric, budget=budget, **settings)


def run(strategy: type[BaseStageOptimizer], budget: int, **kwargs: Any) -> tuple[OptimizationResult, dspy.Module]:
    optimizer = build(strategy, budget, **kwargs)
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    return optimizer.result, program


def sqlite_in_memory() -> optuna.storages.RDBStorage:
    """A real SQL storage (attributes go through JSON) without the disk's fsync latency.

    Both runs of a resume test share the storage object, as two processes share a file.
    """
    return optuna.storages.RDBStorage("sqlite:///:memory:")


def evaluated(history: list[dict[str, Any]]) -> Counter[str]:
    """How often each (configuration, fidelity) was really evaluated (spending LM calls)."""
    return Counter(f"{config_key(h['params'])}@{h['fidelity']}" for h in history if not h["repeated"])


class TestStrategyContract:
    def test_is_registered_under_its_name_and_keeps_dspys_compile(self, strategy: type[BaseStageOptimizer]) -> None:
        assert get_strategy(strategy.strategy_name) is strategy
        assert issubclass(strategy, dspy.teleprompt.Teleprompter)
        parameters = inspect.signature(strategy.compile).parameters
        assert list(parameters)[:2] == ["self", "student"]
        for name in ("trainset", "teacher", "valset"):
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY

    @pytest.mark.parametrize("budget", [50, 90])
    def test_budget_is_respected_exactly(self, strategy: type[BaseStageOptimizer], budget: int) -> None:
        lm = scripted_lm(demo_sensitive_answer)
        result, _ = run(strategy, budget, lm=lm)
        assert result.usage["lm_calls"] <= budget
        assert lm.engine.calls == result.usage["lm_calls"], "every engine call is metered, and only those"
        assert result.status in STATUSES
        calls = [h["lm_calls"] for h in result.history]
        assert calls == sorted(calls)
        assert all(c <= budget for c in calls)

    def test_improves_on_the_baseline(self, strategy: type[BaseStageOptimizer]) -> None:
        lm = scripted_lm(demo_sensitive_answer)
        student = CapitalOfCity()
        result, program = run(strategy, 300, lm=lm)
        assert result.strategy == strategy.strategy_name
        assert result.baseline["score"] == 0.0
        assert result.best["score"] > result.baseline["score"]
        assert result.best["score"] == max(h["score"] for h in result.history)
        assert result.history[0]["phase"] == "baseline"
        assert [h["phase"] for h in result.history].count("baseline") == 1
        assert lm.engine.calls == result.usage["lm_calls"] <= 300
        assert max(evaluated(result.history).values()) == 1, "a configuration is never evaluated twice"
        # Every strategy confirms its choice on held-out examples (trained stages cannot be rebuilt yet).
        assert (result.confirmation is None) == (strategy.strategy_name == "softprompt")
        if result.confirmation is not None:
            assert result.confirmation["confirmed"], result.confirmation["reason"]
            assert result.confirmation["candidate"]["trial"] == result.best["trial"]
            assert result.confirmation["gain"]["lower"] > 0
        # The returned program is the best configuration, and the student is untouched.
        assert [n for n, _ in program.named_predictors()] == [n for n, _ in student.named_predictors()]
        assert program.locate.demos
        assert not student.locate.demos
        with dspy.context(lm=scripted_lm(demo_sensitive_answer), adapter=SmallLMAdapter()):
            assert program(city="Lyon").capital == "Paris"
        data = json.loads(json.dumps(result.to_dict()))
        assert OptimizationResult.from_dict(data) == result

    @pytest.mark.parametrize("seed", [0, 1])
    def test_improves_on_the_baseline_on_the_testbed(self, strategy: type[BaseStageOptimizer], seed: int) -> None:
        """On the simulated testbed the returned program's *true* (exact expected) score rises."""
        from stageopt.testbed import run_one

        run = run_one(strategy.strategy_name, budget_calls=800, seed=seed)
        assert run.status != "error", run.error
        assert run.lm_calls <= 800
        assert run.true_score is not None
        assert run.true_score > run.baseline + 0.05

    def test_same_seed_same_run(self, strategy: type[BaseStageOptimizer]) -> None:
        runs = []
        for _ in range(2):
            result, _ = run(strategy, 150)
            runs.append([(h["phase"], h["stage"], h["params"], h["fidelity"], h["score"]) for h in result.history])
        assert runs[0] == runs[1]

    def test_resume_after_the_budget_ran_out(self, strategy: type[BaseStageOptimizer]) -> None:
        storage = sqlite_in_memory()
        first_lm = scripted_lm(demo_sensitive_answer)
        first, _ = run(strategy, 70, lm=first_lm, storage=storage)
        assert first.status == "budget_exhausted"
        done = len(first.history)

        second_lm = scripted_lm(demo_sensitive_answer)
        result, _ = run(strategy, 200, lm=second_lm, storage=storage)
        assert result.history[:done] == first.history, "finished trials are kept as they were"
        new = result.history[done:]
        assert new, "the resumed run went on searching"
        assert "baseline" not in {h["phase"] for h in new}
        assert max(evaluated(result.history).values()) == 1, "no finished configuration is evaluated again"
        # No bootstrap or proposals again: the resumed run pays only for what it does now.
        assert second_lm.engine.calls >= sum(2 * h["fidelity"] for h in new if not h["repeated"])
        assert result.usage["lm_calls"] == first.usage["lm_calls"] + second_lm.engine.calls <= 200
        trials = optuna.load_study(study_name=strategy.strategy_name, storage=storage).get_trials()
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == len(result.history)

    def test_resume_after_a_crash(self, strategy: type[BaseStageOptimizer]) -> None:
        calls = 0

        def crashing(prompt: str) -> str:
            nonlocal calls
            calls += 1
            if calls > 75:  # after proposals (<= 36 calls) and the baseline, inside a later step
                raise Crash
            return demo_sensitive_answer(prompt)

        storage = sqlite_in_memory()
        optimizer = build(strategy, 300, lm=scripted_lm(crashing), storage=storage)
        with pytest.raises(Crash):
            optimizer.compile(CapitalOfCity(), trainset=city_examples())
        finished = [
            t.user_attrs
            for t in optuna.load_study(study_name=strategy.strategy_name, storage=storage).get_trials()
            if t.state == optuna.trial.TrialState.COMPLETE
        ]
        assert finished, "the crash came after some trials finished"

        result, _ = run(strategy, 300, storage=storage)
        assert [h["trial"] for h in result.history[: len(finished)]] == [a["trial"] for a in finished]
        assert [h["phase"] for h in result.history].count("baseline") == 1
        assert max(evaluated(result.history).values()) == 1, "no finished configuration is evaluated again"
        assert result.best["score"] > result.baseline["score"]

    def test_searches_enabled_setting_knobs(self, strategy: type[BaseStageOptimizer]) -> None:
        lm = scripted_lm(demo_sensitive_answer)
        result, _ = run(strategy, 300, lm=lm, settings={"temperature": [0.5]})
        assert lm.engine.calls == result.usage["lm_calls"] <= 300
        tried = {h["params"][stage].get("temperature", 0) for h in result.history for stage in h["params"]}
        assert tried == {0, 1}, "the strategy searches setting knobs like the others"
        assert result.best["score"] > result.baseline["score"]

    def test_bad_settings_are_rejected_when_built(self, strategy: type[BaseStageOptimizer]) -> None:
        with pytest.raises(ValueError, match="must be positive"):
            build(strategy, -1)
        with pytest.raises(ValueError, match="must be positive"):
            build(strategy, Budget(lm_calls=0))
        with pytest.raises(TypeError, match="budget"):
            build(strategy, "many")
        with pytest.raises(ConfigurationError, match="unknown setting knob"):
            build(strategy, 100, settings={"top_k": [1]})

        def three_args(a: object, b: object, c: object) -> float:
            return 0.0

        with pytest.raises(TypeError, match="metric"):
            strategy(three_args, budget=100)
        with pytest.raises(TypeError, match="metric"):
            strategy("exact_match", budget=100)  # type: ignore[arg-type]

    def test_bad_compile_inputs_are_rejected(self, strategy: type[BaseStageOptimizer]) -> None:
        lm = scripted_lm(demo_sensitive_answer)
        with pytest.raises(ConfigurationError, match="trainset"):
            build(strategy, 100, lm=lm).compile(CapitalOfCity(), trainset=[])
        with pytest.raises(ConfigurationError, match=r"unknown stage.*\['nope'\]"):
            build(strategy, 100, lm=lm, stage_metrics={"nope": country_metric}).compile(
                CapitalOfCity(), trainset=city_examples()
            )
        assert lm.engine.calls == 0, "bad inputs are refused before any LM call"

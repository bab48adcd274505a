from __future__ import annotations

from pathlib import Path

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.evaluation import Budget
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import CoordinateDescent, OptimizationResult
from tests.conftest import (
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)


def _optimizer(budget: int = 200, **kwargs: object) -> CoordinateDescent:
    settings: dict[str, object] = {
        "budget": budget,
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "confirm_size": 0,
        "val_size": 6,
        "max_rounds": 2,
        "trials_per_stage": 3,
        "seed": 0,
    }
    settings.update(kwargs)
    return CoordinateDescent(capital_metric, **settings)  # type: ignore[arg-type]


def test_improves_on_demo_sensitive_lm_and_returns_best_program() -> None:
    optimizer = _optimizer()
    student = CapitalOfCity()
    program = optimizer.compile(student, trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.baseline["score"] == 0.0
    assert result.best["score"] == 1.0
    assert result.best["params"]["locate"]["n_demos"] > 0
    assert result.best["stage_metrics"] == {"locate": 1.0}
    assert program.locate.demos
    assert not student.locate.demos, "the student must not be mutated"
    assert result.history[0]["phase"] == "baseline"
    assert {h["stage"] for h in result.history[1:]} <= {"locate", "capital"}
    calls = [h["lm_calls"] for h in result.history]
    assert calls == sorted(calls)


def test_budget_is_never_exceeded() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    optimizer = _optimizer(budget=70, lm=lm)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.status == "budget_exhausted"
    assert result.usage["lm_calls"] <= 70
    assert lm.engine.calls <= 70


def test_same_seed_same_result() -> None:
    runs = []
    for _ in range(2):
        optimizer = _optimizer(budget=120)
        optimizer.compile(CapitalOfCity(), trainset=city_examples())
        assert optimizer.result is not None
        runs.append([(h["params"], h["score"]) for h in optimizer.result.history])
    assert runs[0] == runs[1]


def test_resume_does_not_redo_finished_trials(tmp_path: Path) -> None:
    first_lm = scripted_lm(demo_sensitive_answer)
    first = _optimizer(budget=70, lm=first_lm, run_dir=tmp_path)
    first.compile(CapitalOfCity(), trainset=city_examples())
    assert first.result is not None
    done = len(first.result.history)
    assert first.result.status == "budget_exhausted"

    second_lm = scripted_lm(demo_sensitive_answer)
    second = _optimizer(budget=200, lm=second_lm, run_dir=tmp_path)
    second.compile(CapitalOfCity(), trainset=city_examples())
    result = second.result
    assert result is not None
    assert [h["trial"] for h in result.history[:done]] == [h["trial"] for h in first.result.history]
    # No bootstrap and no baseline again: the new run spent only on new trials.
    new_trials = [h for h in result.history[done:] if not h["repeated"]]
    assert second_lm.engine.calls == 12 * len(new_trials)
    assert result.usage["lm_calls"] == first.result.usage["lm_calls"] + second_lm.engine.calls
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = optuna.load_study(study_name="coordinate", storage=storage).get_trials()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == len(result.history)


def test_result_round_trips_and_refuses_other_schema() -> None:
    optimizer = _optimizer(budget=90)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    data = optimizer.result.to_dict()
    assert next(iter(data)) == "schema_version"
    assert OptimizationResult.from_dict(data) == optimizer.result
    with pytest.raises(ConfigurationError, match="schema_version"):
        OptimizationResult.from_dict({**data, "schema_version": 99})


def test_bad_settings_are_rejected_when_built() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        _optimizer(budget=-1)
    with pytest.raises(TypeError, match="budget"):
        _optimizer(budget="many")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rounds"):
        _optimizer(max_rounds=0)

    def two_args_required(a: object, b: object, c: object) -> float:
        return 0.0

    with pytest.raises(TypeError, match="metric"):
        CoordinateDescent(two_args_required, budget=10)
    with pytest.raises(ValueError, match="budget"):
        CoordinateDescent(capital_metric, budget=Budget(lm_calls=0))


def test_bad_compile_inputs_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="trainset"):
        _optimizer().compile(CapitalOfCity(), trainset=[])
    with pytest.raises(ConfigurationError, match="unknown stage"):
        _optimizer(stage_metrics={"nope": country_metric}).compile(CapitalOfCity(), trainset=city_examples())


def test_returned_program_saves_and_loads(tmp_path: Path) -> None:
    optimizer = _optimizer()
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    program.save(str(tmp_path / "program.json"))
    loaded = CapitalOfCity()
    loaded.load(str(tmp_path / "program.json"))
    assert [d.toDict() for d in loaded.capital.demos] == [d.toDict() for d in program.capital.demos]
    with dspy.context(lm=scripted_lm(demo_sensitive_answer), adapter=SmallLMAdapter()):
        assert loaded(city="Lyon").capital == "Paris"

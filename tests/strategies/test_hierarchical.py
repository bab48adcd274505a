from __future__ import annotations

from typing import Any

import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.evaluation import Budget
from stageopt.strategies import HierarchicalBayesian, OptimizationResult
from stageopt.strategies._hierarchical import warm_start_params
from tests.conftest import CapitalOfCity, city_examples
from tests.strategies.test_suite import build

#: Cost of a full-fidelity trial: two stages, one call each, on six validation examples.
TRIAL_CALLS = 12


def _optimizer(budget: Any = 400, **kwargs: Any) -> HierarchicalBayesian:
    # 5 demo sets x 3 temperatures per stage: enough choices that the budget sets phase 1's size.
    optimizer = build(
        HierarchicalBayesian, budget, **{"settings": {"temperature": [0.3, 0.7]}, "confirm_size": 0, **kwargs}
    )
    assert isinstance(optimizer, HierarchicalBayesian)
    return optimizer


def _run(**kwargs: Any) -> OptimizationResult:
    optimizer = _optimizer(**kwargs)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    return optimizer.result


def _fixed_trials(storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    """Trials that came from ``enqueue_trial``."""
    trials = optuna.load_study(study_name="hierarchical", storage=storage).trials
    return [t for t in trials if "fixed_params" in t.system_attrs]


def test_phase_one_spends_about_half_then_joint_starts_from_the_stage_optima() -> None:
    storage = optuna.storages.InMemoryStorage()
    budget = 400
    result = _run(budget=budget, storage=storage, stage_patience=None, patience=None)
    history = result.history
    phases = [h["phase"] for h in history]
    first_joint = phases.index("joint")
    assert phases == ["baseline"] + ["independent"] * (first_joint - 1) + ["joint"] * (len(phases) - first_joint)
    stages = [h["stage"] for h in history[1:first_joint]]
    assert stages == sorted(stages, key=["locate", "capital"].index), "phase 1 visits stages in program order"

    search = budget - history[0]["lm_calls"]
    phase_one = history[first_joint - 1]["lm_calls"] - history[0]["lm_calls"]
    assert search / 2 - 2 * TRIAL_CALLS <= phase_one <= search / 2, "phase 1 gets budget/(2K) per stage"
    assert result.status == "budget_exhausted", "phase 2 spends the rest"
    assert result.usage["lm_calls"] > budget - TRIAL_CALLS

    # The first joint trial is the enqueued combination of the stage-wise optima.
    records = [h for h in history if h["phase"] == "independent"]
    locate = max(
        [h for h in records if h["stage"] == "locate"], key=lambda h: (h["stage_metrics"]["locate"], -h["trial"])
    )
    assert history[first_joint]["params"]["locate"] == locate["params"]["locate"]
    capital_base = [h for h in records if h["stage"] == "capital"]
    assert all(h["params"]["locate"] == locate["params"]["locate"] for h in capital_base)
    fixed = _fixed_trials(storage)
    assert [t.number for t in fixed] == [history[first_joint]["trial"]]
    assert fixed[0].params == warm_start_params(history[first_joint]["params"])
    assert result.best["score"] == 1.0


def test_stage_optimum_prefers_the_incumbent_on_ties() -> None:
    optimizer = _optimizer(budget=200, trials_per_stage=2, n_trials=1)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    history = optimizer.result.history
    capital = [h for h in history if h["stage"] == "capital"]
    # Every capital trial scores 1.0 end to end, as does the incumbent (capital at its original).
    assert all(h["score"] == 1.0 for h in capital)
    joint = next(h for h in history if h["phase"] == "joint")
    assert joint["params"]["capital"] == {"instruction": 0, "demos": 0, "temperature": 0}


def test_resume_in_phase_two_does_not_enqueue_again() -> None:
    storage = optuna.storages.InMemoryStorage()
    first = _run(budget=260, storage=storage)
    assert first.status == "budget_exhausted"
    assert "joint" in {h["phase"] for h in first.history}
    second = _run(budget=400, storage=storage)
    assert second.history[: len(first.history)] == first.history
    assert len([h for h in second.history if h["phase"] == "joint"]) > len(
        [h for h in first.history if h["phase"] == "joint"]
    )
    assert len(_fixed_trials(storage)) == 1


def test_without_an_lm_calls_limit_trials_per_stage_and_n_trials_set_the_run() -> None:
    result = _run(budget=Budget(tokens=10**9), trials_per_stage=2, stage_patience=None, n_trials=3, patience=None)
    for stage in ("locate", "capital"):
        fresh = [h for h in result.history if h["stage"] == stage and not h["repeated"]]
        assert len(fresh) == 2
    joint = [h for h in result.history if h["phase"] == "joint" and not h["repeated"]]
    assert len(joint) == 3
    assert result.status == "completed"


def test_same_seed_same_run_in_parallel_mode() -> None:
    runs = []
    for _ in range(2):
        result = _run(budget=260, parallel=True)
        runs.append([(h["phase"], h["stage"], h["round"], h["params"], h["score"]) for h in result.history])
    assert runs[0] == runs[1]
    assert {r[0] for r in runs[0]} == {"baseline", "independent", "joint"}
    assert any(r[2] == 2 for r in runs[0]), "phase 1 ran in waves"


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="stage_patience=0"):
        _optimizer(stage_patience=0)
    with pytest.raises(ConfigurationError, match="trials_per_stage=0"):
        _optimizer(trials_per_stage=0)
    with pytest.raises(ConfigurationError, match="n_trials=0"):
        _optimizer(n_trials=0)
    with pytest.raises(ConfigurationError, match="patience=0"):
        _optimizer(patience=0)
    with pytest.raises(ConfigurationError, match="min_delta=-1"):
        _optimizer(min_delta=-1)
    with pytest.raises(ConfigurationError, match="parallel=1"):
        _optimizer(parallel=1)

"""Joint TPE and the random and grid baselines: what sets each apart from the shared contract."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import GridSearch, JointBayesian, RandomSearch, config_key
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm


def _settings(**kwargs: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "val_size": 4,
        "seed": 0,
    }
    settings.update(kwargs)
    return settings


def _never_right(prompt: str) -> str:
    return " nowhere"


def test_joint_samples_every_stage_in_one_trial() -> None:
    optimizer = JointBayesian(capital_metric, budget=300, n_trials=12, **_settings())
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    joint = [h for h in result.history if h["phase"] == "joint"]
    assert len([h for h in joint if not h["repeated"]]) == 12
    assert result.status == "completed"
    assert all(h["stage"] is None for h in joint)
    changed = [sum(1 for choice in h["params"].values() if any(choice.values())) for h in joint]
    assert max(changed) == 2, "some trial changes both stages at once"
    assert result.best["score"] == 1.0


def test_joint_stops_early_when_nothing_improves() -> None:
    optimizer = JointBayesian(
        capital_metric, budget=10_000, patience=3, min_delta=0.01, **_settings(lm=scripted_lm(_never_right))
    )
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.status == "early_stopped"
    assert "min_delta=0.01" in (result.stop_reason or "")
    assert len([h for h in result.history if h["phase"] == "joint" and not h["repeated"]]) == 3


@pytest.mark.parametrize("kwargs", [{"n_trials": 0}, {"patience": 0}, {"min_delta": -0.1}])
def test_joint_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        JointBayesian(capital_metric, budget=100, **kwargs)


def test_random_uses_optunas_random_sampler(tmp_path: Any) -> None:
    optimizer = RandomSearch(capital_metric, budget=120, run_dir=tmp_path, **_settings())
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    study = optuna.load_study(study_name="random", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert isinstance(optimizer.default_sampler(), optuna.samplers.RandomSampler)
    assert optimizer.result is not None
    assert [h["phase"] for h in optimizer.result.history][1:] == ["random"] * (len(optimizer.result.history) - 1)
    assert len(study.trials) >= len(optimizer.result.history)


def test_grid_scores_every_configuration_once_and_finds_the_best() -> None:
    optimizer = GridSearch(capital_metric, budget=10_000, **_settings())
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    size = math.prod(c["instructions"] * c["demo_sets"] for c in result.candidates.values())
    fresh = {config_key(h["params"]) for h in result.history if not h["repeated"]}
    assert len(fresh) == size, "every grid point scored"
    assert len([h for h in result.history if not h["repeated"]]) == size, "and none twice"
    assert result.status == "completed"
    assert result.stop_reason == f"all {size} grid configurations scored"
    assert result.best["score"] == max(h["score"] for h in result.history) == 1.0


def test_grid_refuses_a_space_too_large() -> None:
    optimizer = GridSearch(capital_metric, budget=1000, max_grid=3, **_settings())
    with pytest.raises(ConfigurationError, match=r"more than max_grid=3.*random"):
        optimizer.compile(CapitalOfCity(), trainset=city_examples())

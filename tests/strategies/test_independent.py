from __future__ import annotations

import threading
import time
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.strategies import IndependentStages, OptimizationResult
from stageopt.strategies._independent import split_trials
from tests.conftest import CapitalOfCity, city_examples, country_metric, demo_sensitive_answer, scripted_lm
from tests.strategies.test_suite import build


def _optimizer(budget: int = 300, **kwargs: Any) -> IndependentStages:
    optimizer = build(IndependentStages, budget, **kwargs)
    assert isinstance(optimizer, IndependentStages)
    return optimizer


def _run(**kwargs: Any) -> OptimizationResult:
    optimizer = _optimizer(**kwargs)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    return optimizer.result


def wrong_country_metric(example: dspy.Example, prediction: dspy.Prediction) -> float:
    """A stage metric that disagrees with the end-to-end metric: it rewards a wrong country."""
    return 1.0 - country_metric(example, prediction)


def test_sequential_phases_stage_order_and_upstream_at_its_optimum() -> None:
    result = _run(trials_per_stage=2, patience=None)
    phases = [(h["phase"], h["stage"]) for h in result.history]
    assert phases == [
        ("baseline", None),
        *[("independent", "locate")] * phases.count(("independent", "locate")),
        *[("independent", "capital")] * phases.count(("independent", "capital")),
        ("combine", None),
    ]
    for stage in ("locate", "capital"):
        fresh = [h for h in result.history if h["stage"] == stage and not h["repeated"]]
        assert len(fresh) == 2, "trials_per_stage counts only configurations not scored before"
    locate = [h for h in result.history if h["stage"] == "locate"]
    assert all(h["params"]["capital"]["demos"] == 0 for h in locate), "downstream stages at their original setting"
    optimum = max(locate, key=lambda h: h["stage_metrics"]["locate"])["params"]["locate"]
    capital = [h for h in result.history if h["stage"] == "capital"]
    assert all(h["params"]["locate"] == optimum for h in capital), "upstream stages at their stage-wise optimum"
    combine = result.history[-1]
    assert combine["params"]["locate"] == optimum
    assert combine["repeated"], "in sequential mode the combination is the last stage's optimum, already scored"
    assert result.best["score"] == 1.0
    assert result.status == "completed"


@pytest.mark.parametrize(
    ("stage_metrics", "locate_demos_chosen"),
    [({"locate": wrong_country_metric}, False), ({}, True)],
)
def test_a_stage_is_optimized_for_its_stage_metric_when_it_has_one(
    stage_metrics: dict[str, Any], locate_demos_chosen: bool
) -> None:
    storage = optuna.storages.InMemoryStorage()
    result = _run(stage_metrics=stage_metrics, storage=storage, trials_per_stage=3, patience=None)
    combine = result.history[-1]
    assert combine["phase"] == "combine"
    # With demos, locate finds the right country: the end-to-end score is 1 and the (disagreeing)
    # stage metric 0. Optimized for the stage metric, locate keeps its original, demo-less setting.
    assert (combine["params"]["locate"]["demos"] != 0) is locate_demos_chosen
    locate = [h for h in result.history if h["stage"] == "locate"]
    assert any(h["score"] == 1.0 for h in locate)
    # Optuna is told the stage objective; the returned program is still the best end to end.
    values = {t.number: t.value for t in optuna.load_study(study_name="independent", storage=storage).trials}
    for h in locate:
        expected = h["stage_metrics"]["locate"] if stage_metrics else h["score"]
        assert values[h["trial"]] == expected
    assert result.best["score"] == 1.0
    assert result.best["params"]["locate"]["n_demos"] > 0


def test_per_stage_early_stopping() -> None:
    result = _run(patience=1, min_delta=0.5, trials_per_stage=4)
    capital = [h for h in result.history if h["stage"] == "capital" and not h["repeated"]]
    # Capital's end-to-end score cannot improve on 1.0 (locate already has demos): one trial.
    assert len(capital) == 1
    # Locate's first trial improves its stage metric from 0 to 1; the second cannot: it stops there.
    locate = [h for h in result.history if h["stage"] == "locate" and not h["repeated"]]
    assert locate[0]["stage_metrics"]["locate"] == 1.0
    assert len(locate) == 2


def test_parallel_waves_are_deterministic_and_evaluated_concurrently() -> None:
    histories = []
    for _ in range(2):
        lock = threading.Lock()
        running = [0, 0]  # now, most at once

        def answer(prompt: str, running: list[int] = running, lock: threading.Lock = lock) -> str:
            with lock:
                running[0] += 1
                running[1] = max(running)
            time.sleep(0.005)  # long enough for a wave's other stage to start meanwhile
            with lock:
                running[0] -= 1
            return demo_sensitive_answer(prompt)

        result = _run(lm=scripted_lm(answer), parallel=True, trials_per_stage=3, patience=None)
        histories.append([(h["phase"], h["stage"], h["round"], h["params"], h["score"]) for h in result.history])
        assert running[1] >= 2, "the stages of a wave were evaluated concurrently"
    assert histories[0] == histories[1]
    history = histories[0]
    waves = [(round_no, stage) for phase, stage, round_no, _, _ in history if phase == "independent"]
    assert waves == sorted(waves, key=lambda w: (w[0], ["locate", "capital"].index(w[1])))
    for phase, stage, _, params, _ in history:
        if phase == "independent":
            others = [s for s in params if s != stage]
            assert all(params[s]["demos"] == 0 for s in others), "parallel mode: other stages at the original"
    assert history[-1][0] == "combine"
    assert history[-1][3]["locate"]["demos"] != 0


def test_parallel_wave_stops_cleanly_at_the_budget() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    storage = optuna.storages.InMemoryStorage()
    result = _run(budget=80, lm=lm, parallel=True, trials_per_stage=5, patience=None, storage=storage)
    assert result.status == "budget_exhausted"
    assert lm.engine.calls == result.usage["lm_calls"] <= 80
    states = {t.state for t in optuna.load_study(study_name="independent", storage=storage).trials}
    assert optuna.trial.TrialState.RUNNING not in states, "asked trials the budget could not pay for are failed"


def test_resume_continues_the_stage_it_was_in() -> None:
    storage = optuna.storages.InMemoryStorage()
    first = _run(budget=70, storage=storage, trials_per_stage=3, patience=None)
    assert first.status == "budget_exhausted"
    second = _run(budget=400, storage=storage, trials_per_stage=3, patience=None)
    assert second.history[: len(first.history)] == first.history
    for stage in ("locate", "capital"):
        fresh = [h for h in second.history if h["stage"] == stage and not h["repeated"]]
        assert len(fresh) == 3, "each stage's finished trials count after a resume"
    assert [h["phase"] for h in second.history].count("combine") == 1


def test_split_trials_uses_the_whole_budget() -> None:
    assert split_trials(34, 2, 12) == [12, 24]
    assert split_trials(48, 2, 12) == [24, 24]
    assert split_trials(0, 3, 12) == [0, 0, 0]


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="trials_per_stage=0"):
        _optimizer(trials_per_stage=0)
    with pytest.raises(ConfigurationError, match="patience=0"):
        _optimizer(patience=0)
    with pytest.raises(ConfigurationError, match=r"min_delta=-0\.1"):
        _optimizer(min_delta=-0.1)
    with pytest.raises(ConfigurationError, match="parallel='yes'"):
        _optimizer(parallel="yes")

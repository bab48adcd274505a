"""Confirmation on the real embedded model: the held-out check runs, is paid from the budget,
decides what is returned, and is not paid twice on resume."""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import CoordinateDescent
from tests.conftest import CapitalOfCity, capital_metric, city_examples, country_metric

pytestmark = pytest.mark.integration

BUDGET = 120


def _optimizer(lm: dspy.BaseLM, run_dir: Path) -> CoordinateDescent:
    return CoordinateDescent(
        capital_metric,
        budget=BUDGET,
        lm=lm,
        adapter=SmallLMAdapter(),
        stage_metrics={"locate": country_metric},
        bootstrap_size=4,
        val_size=4,
        confirm_size=4,
        max_rounds=1,
        trials_per_stage=3,
        run_dir=run_dir,
    )


def test_the_choice_is_confirmed_on_held_out_examples_with_the_real_model(gemma: LocalLM, tmp_path: Path) -> None:
    optimizer = _optimizer(gemma, tmp_path)
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET
    conf = result.confirmation
    assert conf is not None
    assert conf["n"] == 4
    returned_demos = {name: len(p.demos) for name, p in program.named_predictors()}
    if conf["gain"] is None:  # the original won on validation: nothing to confirm, it is returned
        assert not conf["confirmed"]
        assert result.best["trial"] == result.history[0]["trial"]
    else:
        gain = conf["gain"]
        assert gain["n"] == 4
        assert gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
        if conf["confirmed"]:
            assert gain["lower"] > 0
            assert result.best["trial"] == conf["candidate"]["trial"]
        else:
            assert result.status == "no_significant_gain"
            assert returned_demos == {"locate": 0, "capital": 0}, "the original program comes back"
    # Resuming the finished run confirms from the stored scores: no call reaches the model again.
    before = gemma.engine.stats.calls
    again = _optimizer(gemma, tmp_path)
    again.compile(CapitalOfCity(), trainset=city_examples())
    assert again.result is not None
    assert again.result.confirmation == conf
    assert gemma.engine.stats.calls == before

"""Successive halving: paired rungs, promotion of the best only, caps on lower rungs, resume."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import OptimizationResult, SearchSpace, SuccessiveHalving, config_key
from stageopt.strategies._multifidelity import Rung
from tests.conftest import (
    CITIES,
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)

VAL_SIZE = 10


class Crash(BaseException):
    """Stands in for a killed process."""


def _optimizer(budget: int = 400, **kwargs: Any) -> SuccessiveHalving:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "confirm_size": 0,
        "val_size": VAL_SIZE,
        "seed": 0,
        # 15 choices per stage: enough distinct configurations for a bracket of 27.
        "settings": {"temperature": [0.5, 1.0]},
    }
    settings.update(kwargs)
    return SuccessiveHalving(capital_metric, budget=budget, **settings)


def _run(budget: int = 400, **kwargs: Any) -> tuple[OptimizationResult, optuna.Study]:
    storage = kwargs.pop("storage", None) or optuna.storages.InMemoryStorage()
    optimizer = _optimizer(budget, storage=storage, **kwargs)
    optimizer.compile(CapitalOfCity(), trainset=city_examples() * 2)
    assert optimizer.result is not None
    return optimizer.result, optuna.load_study(study_name="multifidelity", storage=storage)


def _rungs_of(history: list[dict[str, Any]], bracket: int) -> dict[int, list[dict[str, Any]]]:
    """Trials of one bracket by fidelity, first trial of each configuration only, in order."""
    rungs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for h in history:
        if h["phase"] != "multifidelity" or h["round"] != bracket:
            continue
        if all(config_key(o["params"]) != config_key(h["params"]) for o in rungs[h["fidelity"]]):
            rungs[h["fidelity"]].append(h)
    return dict(sorted(rungs.items()))


def test_rungs_are_increasing_prefix_sizes_with_the_full_set_last() -> None:
    optimizer = _optimizer()
    assert [r.size for r in optimizer.rungs(10)] == [1, 3, 6, 10]
    assert [r.size for r in optimizer.rungs(6)] == [1, 2, 4, 6]
    assert [r.size for r in optimizer.rungs(3)] == [1, 2, 3]  # 0.1 and 0.3 of 3 both give 1 example
    assert [r.size for r in optimizer.rungs(1)] == [1]
    capped = _optimizer(max_demos=(1, 3, 5), max_tokens=(None, 64, 128))
    rungs = capped.rungs(3)
    assert rungs == [Rung(1, 3, 64), Rung(2, 5, 128), Rung(3)], "merged rungs keep the larger fraction's caps"
    assert rungs[-1].variant is None, "the full rung runs the configuration as it is"
    assert [r.variant for r in rungs[:-1]] == ["d3t64", "d5t128"]
    assert [r.size for r in _optimizer(fidelities=(0.5,)).rungs(10)] == [5, 10], "1.0 is appended"


def test_rung_transform_caps_demos_and_output_length() -> None:
    program = CapitalOfCity()
    program.locate.demos = [dspy.Example(city=c, country=k) for c, k, _ in CITIES[:4]]
    program.capital.config = {"max_tokens": 20}
    capped = Rung(2, max_demos=1, max_tokens=64).transform(program)
    assert len(capped.locate.demos) == 1
    assert capped.locate.config["max_tokens"] == 64
    assert capped.capital.config["max_tokens"] == 20, "a stage's own smaller limit is kept"


def test_promotes_only_the_best_third_on_shared_examples_until_the_full_set() -> None:
    result, _ = _run(budget=400, n_brackets=1)
    assert result.status == "completed"
    rungs = _rungs_of(result.history, bracket=0)
    assert list(rungs) == [1, 3, 6, VAL_SIZE], "every configuration of a rung is scored on the same prefix"
    assert [len(r) for r in rungs.values()] == [27, 9, 3, 1], "each rung keeps the best 1/eta"
    sizes = list(rungs)
    for lower, upper in itertools.pairwise(sizes):
        ranked = sorted(range(len(rungs[lower])), key=lambda i: (-rungs[lower][i]["score"], i))
        expected = [config_key(rungs[lower][i]["params"]) for i in ranked[: len(rungs[upper])]]
        assert [config_key(h["params"]) for h in rungs[upper]] == expected, "the best are promoted, best first"
    full = [h for h in result.history if h["trial"] == result.best["trial"]]
    assert full[0]["fidelity"] == VAL_SIZE, "the best was scored on the whole set"
    assert full[0]["variant"] is None, "and run as it is"
    assert result.best["score"] == 1.0 > result.baseline["score"]


def test_caps_apply_on_lower_rungs_only() -> None:
    def needs_two_demos(prompt: str) -> str:
        blocks = prompt.split("\n\n---\n\n")
        if blocks[-1].startswith("City:") and len(blocks) < 4:
            return " somewhere"  # stage 1 is right only with at least two demos
        return demo_sensitive_answer(prompt)

    def demo_counts(result: OptimizationResult, study: optuna.Study) -> dict[tuple[int, str | None], set[float]]:
        space = SearchSpace.from_dict(study.user_attrs["space"])
        scores: dict[tuple[int, str | None], set[float]] = defaultdict(set)
        for h in result.history:
            if h["phase"] == "multifidelity" and space.describe(h["params"])["locate"]["n_demos"] >= 2:
                scores[(h["fidelity"], h["variant"])].add(h["score"])
        return scores

    capped, study = _run(400, n_brackets=1, lm=scripted_lm(needs_two_demos), max_demos=(1, 1, 1))
    variants = {h["fidelity"]: h["variant"] for h in capped.history if h["phase"] == "multifidelity"}
    assert variants == {1: "d1", 3: "d1", 6: "d1", VAL_SIZE: None}
    scores = demo_counts(capped, study)
    assert scores[(1, "d1")] == {0.0}, "two-demo configurations fail while capped to one demo"
    assert all(v == {0.0} for (size, _), v in scores.items() if size < VAL_SIZE)

    uncapped, study = _run(400, n_brackets=1, lm=scripted_lm(needs_two_demos))
    assert demo_counts(uncapped, study)[(1, None)] == {1.0}, "the same configurations pass without the cap"


def test_bracket_is_sized_to_fit_the_budget_and_reaches_the_full_set() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    result, study = _run(budget=110, lm=lm)
    plan = study.user_attrs["multifidelity.bracket.0"]
    assert 1 < plan["n"] < 27
    rungs = _rungs_of(result.history, bracket=0)
    assert len(rungs[1]) == plan["n"]
    assert VAL_SIZE in rungs, "the shrunk bracket still scores its survivor on the whole set"
    assert lm.engine.calls == result.usage["lm_calls"] <= 110
    assert result.status == "budget_exhausted"


def test_resume_after_a_crash_finishes_the_bracket_with_its_plan() -> None:
    calls = 0

    def crashing(prompt: str) -> str:
        nonlocal calls
        calls += 1
        if calls > 80:  # after proposals and the baseline, inside rung 0 of bracket 0
            raise Crash
        return demo_sensitive_answer(prompt)

    storage = optuna.storages.InMemoryStorage()
    with pytest.raises(Crash):
        _run(400, storage=storage, lm=scripted_lm(crashing), n_brackets=1)
    study = optuna.load_study(study_name="multifidelity", storage=storage)
    plan = study.user_attrs["multifidelity.bracket.0"]
    before = [t.user_attrs for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]

    result, _ = _run(230, storage=storage, n_brackets=1)  # too little to plan 27 configs afresh
    assert [h["trial"] for h in result.history[: len(before)]] == [a["trial"] for a in before]
    rungs = _rungs_of(result.history, bracket=0)
    assert len(rungs[1]) == plan["n"] == 27
    assert [len(r) for r in rungs.values()] == [27, 9, 3, 1]
    evaluated = [f"{config_key(h['params'])}@{h['fidelity']}" for h in result.history if not h["repeated"]]
    assert len(evaluated) == len(set(evaluated)), "no finished trial is run again"


def test_same_seed_same_brackets() -> None:
    runs = [_run(200)[0].history for _ in range(2)]
    strip = [[(h["round"], h["params"], h["fidelity"], h["score"]) for h in history] for history in runs]
    assert strip[0] == strip[1]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("eta", 1),
        ("fidelities", ()),
        ("fidelities", (0.3, 0.1)),
        ("fidelities", (0.0, 1.0)),
        ("fidelities", (0.5, 1.5)),
        ("max_demos", (1, 3)),
        ("max_demos", (1, 3, -1)),
        ("max_tokens", (0, None, None)),
        ("max_configs", 0),
        ("n_brackets", 0),
        ("patience", 0),
        ("min_delta", -0.1),
    ],
)
def test_bad_settings_are_rejected_naming_the_value(setting: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        _optimizer(**{setting: value})

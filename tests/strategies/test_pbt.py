"""Population-based training: growing slices, exploit and explore, best from whole-set scores, resume."""

from __future__ import annotations

import itertools
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import OptimizationResult, PopulationBasedTraining, config_key
from tests.conftest import (
    CITIES,
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)

POPULATION = 6

#: Validation examples of the toy task (12 cities, half bootstrap, half validation): slices 2, 3, 6.
N_VAL = 6


class Crash(BaseException):
    """Stands in for a killed process."""


def _optimizer(**kwargs: Any) -> PopulationBasedTraining:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "confirm_size": 0,
        "val_size": N_VAL,
        "seed": 0,
        "population_size": POPULATION,
        "storage": optuna.storages.InMemoryStorage(),
    }
    settings.update(kwargs)
    budget = settings.pop("budget", 400)
    return PopulationBasedTraining(capital_metric, budget=budget, **settings)


def _run(**kwargs: Any) -> tuple[OptimizationResult, optuna.Study, dspy.Module]:
    optimizer = _optimizer(**kwargs)
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    assert optimizer.storage is not None
    study = optuna.load_study(study_name="pbt", storage=optimizer.storage)
    return optimizer.result, study, program


def _rounds(study: optuna.Study) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while (plan := study.user_attrs.get(f"pbt.round.{len(out)}")) is not None:
        out.append(plan)
    return out


def _scores(result: OptimizationResult) -> dict[tuple[str, int], float]:
    return {(config_key(h["params"]), h["fidelity"]): h["score"] for h in result.history}


def _changed(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    return [(s, k) for s in a for k in a[s] if a[s][k] != b[s].get(k, 0)]


def test_slices_grow_to_the_whole_validation_set() -> None:
    assert _optimizer().slices(20) == [5, 10, 20]
    assert _optimizer().slices(6) == [2, 3, 6]
    assert _optimizer().slices(3) == [1, 2, 3]
    assert _optimizer().slices(1) == [1]
    assert _optimizer(fidelities=(0.5,)).slices(10) == [5, 10]
    assert _optimizer(fidelities=(0.1, 0.2, 1.0)).slices(4) == [1, 4]  # 0.1 and 0.2 of 4 are both 1 example


def test_rounds_score_every_member_on_the_same_growing_prefix() -> None:
    result, study, _ = _run()
    rounds = _rounds(study)
    assert len(rounds) >= 4, result.stop_reason
    assert [r["size"] for r in rounds[:4]] == [2, 3, 6, 6]
    assert all(r["size"] == N_VAL for r in rounds[2:])
    assert result.notes["pbt"]["slices"] == [2, 3, 6]
    for number, plan in enumerate(rounds):
        assert len(plan["members"]) == POPULATION
        keys = [config_key(m["params"]) for m in plan["members"]]
        assert len(set(keys)) == POPULATION, "members of a round are distinct"
        for record in (h for h in result.history if h["phase"] == "pbt" and h["round"] == number):
            assert record["fidelity"] == plan["size"]
            assert config_key(record["params"]) in keys
    first = [h for h in result.history if h["phase"] == "pbt" and h["round"] == 0]
    assert len(first) == POPULATION, "round 0 scores the whole population on the first slice"
    assert rounds[0]["members"][0]["params"] == result.history[0]["params"], "the original program is a member"


def test_the_worst_copy_the_best_and_explore_one_stage() -> None:
    result, study, _ = _run()
    rounds = _rounds(study)
    scores = _scores(result)
    q = _optimizer().n_exploited
    assert q == 2  # ceil(0.25 * 6)
    for previous, plan in itertools.pairwise(rounds):
        ranked_scores = [scores[(config_key(m["params"]), previous["size"])] for m in previous["members"]]
        order = sorted(range(POPULATION), key=lambda i: (-ranked_scores[i], i))
        members = plan["members"]
        # survivors: everyone but the worst q, best first, unchanged
        assert [m["params"] for m in members[: POPULATION - q]] == [
            previous["members"][i]["params"] for i in order[: POPULATION - q]
        ]
        assert all(m["parent"] is None and m["stage"] is None for m in members[: POPULATION - q])
        for child in members[POPULATION - q :]:
            assert child["parent"] in order[:q], "a copy is made of one of the best q members"
            parent = previous["members"][child["parent"]]["params"]
            changed = _changed(child["params"], parent)
            assert len(changed) == 1, "explore changes exactly one knob of one stage"
            assert changed[0][0] == child["stage"]


def test_best_is_chosen_on_the_whole_validation_set_only() -> None:
    """Without demos the LM is right exactly on the first two validation cities, with demos on the others."""
    first_two = {e.city for e in _optimizer().split(city_examples(), None)[1][:2]}
    countries = {a: b for a, b, _ in CITIES}

    def prefix_lover(prompt: str) -> str:
        blocks = prompt.split("\n\n---\n\n")
        query = blocks[-1]
        if query.startswith("City:"):
            city = query.split("\n")[0].removeprefix("City:").strip()
            right = (city in first_two) != (len(blocks) >= 3)
            return f" {countries[city]}" if right else " Atlantis"
        return demo_sensitive_answer(prompt)

    result, _, program = _run(lm=scripted_lm(prefix_lover), budget=500)
    full = [h for h in result.history if h["fidelity"] == N_VAL]
    partial = [h for h in result.history if h["fidelity"] < N_VAL]
    assert max(h["score"] for h in partial) == 1.0, "the first slice flatters the configurations without demos"
    assert result.best["score"] == max(h["score"] for h in full) < 1.0
    best = next(h for h in result.history if h["trial"] == result.best["trial"])
    assert best["fidelity"] == N_VAL
    assert result.best["score"] > result.baseline["score"]
    assert program.locate.demos, "the returned program is the best on the whole validation set: with demos"


def test_n_rounds_and_budget_end_the_run() -> None:
    result, study, _ = _run(n_rounds=3, patience=None)
    assert result.status == "completed"
    assert len(_rounds(study)) == 3
    assert result.notes["stopping"]["settings"]["n_rounds"] == 3
    assert {h["round"] for h in result.history if h["phase"] == "pbt"} <= {0, 1, 2}

    lm = scripted_lm(demo_sensitive_answer)
    result, _, _ = _run(lm=lm, budget=90, patience=None)
    assert result.status == "budget_exhausted"
    assert lm.engine.calls == result.usage["lm_calls"] <= 90


def test_same_seed_same_run_and_another_seed_another_population() -> None:
    a, study_a, _ = _run()
    b, study_b, _ = _run()
    assert _rounds(study_a) == _rounds(study_b)
    assert [(h["params"], h["fidelity"], h["score"]) for h in a.history] == [
        (h["params"], h["fidelity"], h["score"]) for h in b.history
    ]
    _, study_c, _ = _run(seed=1)
    assert _rounds(study_c)[0] != _rounds(study_a)[0]


def test_a_crashed_run_resumes_into_the_same_search() -> None:
    uninterrupted, study, _ = _run()
    assert uninterrupted.status != "budget_exhausted", uninterrupted.stop_reason

    calls = 0

    def crashing(prompt: str) -> str:
        nonlocal calls
        calls += 1
        if calls > 110:  # proposals and baseline (36 calls), rounds 0 and 1 (60), inside round 2
            raise Crash
        return demo_sensitive_answer(prompt)

    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    with pytest.raises(Crash):
        _optimizer(lm=scripted_lm(crashing), storage=storage).compile(CapitalOfCity(), trainset=city_examples())
    crashed = optuna.load_study(study_name="pbt", storage=storage)
    assert 1 <= len(_rounds(crashed)) < len(_rounds(study))
    resumed, again, _ = _run(storage=storage)
    assert _rounds(again) == _rounds(study)

    def trials(result: OptimizationResult) -> list[Any]:
        return [(h["phase"], h["round"], h["params"], h["fidelity"], h["score"]) for h in result.history]

    assert trials(resumed) == trials(uninterrupted)
    assert (resumed.best["score"], resumed.best["params"]) == (
        uninterrupted.best["score"],
        uninterrupted.best["params"],
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population_size": 1}, "population_size"),
        ({"population_size": True}, "population_size"),
        ({"exploit_fraction": 0.0}, "exploit_fraction"),
        ({"exploit_fraction": 0.6}, "exploit_fraction"),
        ({"fidelities": []}, "fidelities"),
        ({"fidelities": (0.5, 0.25)}, "increasing"),
        ({"fidelities": (0.0, 1.0)}, "fractions"),
        ({"n_rounds": 2}, "n_rounds"),
        ({"patience": 0}, "patience"),
        ({"min_delta": -1.0}, "min_delta"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        _optimizer(**kwargs)


@pytest.mark.parametrize(("population", "fraction", "expected"), [(8, 0.25, 2), (2, 0.5, 1), (3, 0.1, 1), (5, 0.5, 2)])
def test_exploited_members_per_round(population: int, fraction: float, expected: int) -> None:
    assert _optimizer(population_size=population, exploit_fraction=fraction).n_exploited == expected

"""Evolutionary search: stage-wise crossover, elitism, LM mutation of instructions, resume, determinism."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import Evolutionary, OptimizationResult, SearchSpace, config_key
from tests.conftest import (
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)

POPULATION = 6

#: Rewrites the scripted LM gives, in turn, when asked to mutate an instruction.
REWRITES = [
    "Identify which country contains the given city.",
    "Look at the city and write its country.",
    "Write only the country where this city lies.",
    "State the nation this city belongs to.",
    "Reply with the country of the named city.",
    "Determine the country in which the city sits.",
]


def mutating_lm() -> dspy.LM:
    """The toy task's LM, which also answers instruction rewrites (one new text per request)."""
    asked = 0

    def answer(prompt: str) -> str:
        nonlocal asked
        if prompt.rstrip().endswith("Rewrite:"):
            asked += 1
            return " " + REWRITES[(asked - 1) % len(REWRITES)]
        return demo_sensitive_answer(prompt)

    return scripted_lm(answer)


def _run(budget: int = 300, **kwargs: Any) -> tuple[OptimizationResult, optuna.Study]:
    storage = kwargs.pop("storage", None) or optuna.storages.InMemoryStorage()
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "val_size": 6,
        "seed": 0,
        "population_size": POPULATION,
        "storage": storage,
    }
    settings.update(kwargs)
    optimizer = Evolutionary(capital_metric, budget=budget, **settings)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    return optimizer.result, optuna.load_study(study_name="evolutionary", storage=storage)


def _generations(study: optuna.Study) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while (plan := study.user_attrs.get(f"evolutionary.generation.{len(out)}")) is not None:
        out.append(plan)
    return out


def _scores(result: OptimizationResult) -> dict[str, float]:
    return {config_key(h["params"]): h["score"] for h in result.history}


def test_children_take_each_stage_from_a_parent_of_the_previous_generation() -> None:
    result, study = _run(400, mutation_rate=0.0, patience=None, n_generations=3, elite=0)
    generations = _generations(study)
    assert len(generations) == 4
    assert generations[0]["members"][0]["params"] == result.history[0]["params"], "the original program is member 0"
    for previous, current in itertools.pairwise(generations):
        parents = [m["params"] for m in previous["members"]]
        assert len(current["members"]) == POPULATION
        for child in current["members"]:
            assert child["stage"] is None, "no mutation"
            for stage, choice in child["params"].items():
                assert choice in [p[stage] for p in parents], f"stage {stage} comes from a parent"


def test_elites_are_the_best_of_the_previous_population_and_survive() -> None:
    result, study = _run(400, elite=2, patience=None, n_generations=3)
    scores = _scores(result)
    generations = _generations(study)
    population = [m["params"] for m in generations[0]["members"]]
    best = max(scores[config_key(c)] for c in population)
    for generation in generations[1:]:
        ranked = sorted(range(len(population)), key=lambda i: (-scores[config_key(population[i])], i))
        assert generation["elites"] == [population[i] for i in ranked[:2]]
        assert len(generation["members"]) == POPULATION - 2
        population = generation["elites"] + [m["params"] for m in generation["members"]]
        top = max(scores[config_key(c)] for c in population)
        assert top >= best, "the best never leaves the population"
        best = top
    assert best == result.best["score"] == 1.0


def test_lm_mutation_grows_the_pool_and_a_resumed_run_rebuilds_it() -> None:
    storage = optuna.storages.InMemoryStorage()
    options = {"mutation_rate": 1.0, "lm_mutation_rate": 1.0, "patience": None, "storage": storage}
    first, study = _run(170, lm=mutating_lm(), **options)
    assert first.status == "budget_exhausted"
    assert first.candidates["locate"]["instructions"] + first.candidates["capital"]["instructions"] > 2
    pool = SearchSpace.from_dict(study.user_attrs["space"])
    grown = [h for h in first.history if any(c["instruction"] > 0 for c in h["params"].values())]
    assert grown, "children with a rewritten instruction were scored"
    assert any(text in REWRITES for text in pool.stages["locate"].instructions + pool.stages["capital"].instructions)

    second_lm = mutating_lm()
    result, study = _run(400, lm=second_lm, **options)
    assert result.history[: len(first.history)] == first.history
    rebuilt = SearchSpace.from_dict(study.user_attrs["space"])
    for stage, candidates in pool.stages.items():
        assert rebuilt.stages[stage].instructions[: len(candidates.instructions)] == candidates.instructions
    evaluated = [config_key(h["params"]) for h in result.history if not h["repeated"]]
    assert len(evaluated) == len(set(evaluated)), "no finished configuration is scored again"
    children = Counter(h["round"] for h in result.history if h["phase"] == "evolutionary" and h["round"] > 0)
    assert max(children.values()) <= POPULATION - 1, "the interrupted generation was finished, not bred again"
    assert second_lm.engine.calls + first.usage["lm_calls"] == result.usage["lm_calls"] <= 400
    best = result.best["params"]
    for stage, described in best.items():
        assert described["instruction_text"] == rebuilt.stages[stage].instructions[described["instruction"]]


def test_same_seed_same_run_and_another_seed_another() -> None:
    options = {"mutation_rate": 1.0, "lm_mutation_rate": 0.5, "patience": None}

    def history(seed: int) -> list[Any]:
        result, study = _run(250, lm=mutating_lm(), seed=seed, **options)
        return [(h["stage"], h["round"], h["params"], h["score"]) for h in result.history] + [study.user_attrs["space"]]

    assert history(0) == history(0)
    assert history(0) != history(1)


def test_stops_early_without_progress_and_after_n_generations() -> None:
    result, _ = _run(2000, patience=2)
    assert result.status == "early_stopped"
    assert "2 generations" in (result.stop_reason or "")
    result, study = _run(2000, patience=None, n_generations=1)
    assert result.status == "completed"
    assert len(_generations(study)) == 2


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("population_size", 1),
        ("n_generations", 0),
        ("tournament_size", 0),
        ("tournament_size", POPULATION + 1),
        ("mutation_rate", 1.5),
        ("lm_mutation_rate", -0.1),
        ("elite", POPULATION),
        ("patience", 0),
        ("min_delta", -1.0),
    ],
)
def test_bad_settings_are_rejected_naming_the_value(setting: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        Evolutionary(capital_metric, budget=100, **{"population_size": POPULATION, setting: value})

"""Racing: candidates are scored slice by slice and dropped once Optuna's WilcoxonPruner finds them worse."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import JointBayesian, OptimizationResult, Racing, RandomSearch
from tests.conftest import scripted_lm
from tests.strategies.test_confirm import OneStage, _coin, _examples, _metric, demo_helps_answer


def demos_hurt() -> Callable[[str], str]:
    """Right 90 % of the time without demos, 20 % with: most candidates are clearly worse.

    Each call makes a new LM with its own proposal counter, so two runs in one test see the
    same instructions in the same order whatever ran before them.
    """
    styles = itertools.count()

    def answer(prompt: str) -> str:
        if prompt.rstrip().endswith("Instruction:"):
            return f"Answer the question in a single word, style number {next(styles)}."
        has_demo = len(prompt.split("\n\n---\n\n")) >= 3
        return " yes" if _coin(prompt, 0.2 if has_demo else 0.9) else " no"

    return answer


def _random(lm_fn: Any, **kwargs: Any) -> RandomSearch:
    settings: dict[str, Any] = {
        "budget": 2000,
        "lm": scripted_lm(lm_fn),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 8,
        "val_size": 40,
        "confirm_size": 0,
        "n_trials": 10,
        "seed": 0,
    }
    settings.update(kwargs)
    return RandomSearch(_metric, **settings)


def _run(optimizer: Any) -> OptimizationResult:
    optimizer.compile(OneStage(), trainset=_examples())
    assert optimizer.result is not None
    return optimizer.result


def test_worse_candidates_are_pruned_and_cost_less_than_scoring_every_example() -> None:
    raced = _run(_random(demos_hurt()))
    full = _run(_random(demos_hurt(), racing=False))
    pruned = [t for t in raced.history if t["pruned"] and not t["repeated"]]
    assert pruned, "candidates right 20 % of the time against a 90 % baseline are dropped"
    assert all(10 <= t["fidelity"] < 40 for t in pruned)
    assert all(t["fidelity"] == 40 for t in raced.history if not t["pruned"])
    note = raced.notes["racing"]
    assert note["pruned_trials"] == len(pruned)
    assert note["example_evaluations_saved"] == sum(40 - t["fidelity"] for t in pruned)
    assert note["example_evaluations_saved"] > 0
    assert not any(t["pruned"] for t in full.history)
    assert full.notes["racing"]["settings"] is None
    # The same trials, fewer calls: what racing saved is what was not spent.
    assert [t["params"] for t in raced.history] == [t["params"] for t in full.history]
    saved_calls = full.usage["lm_calls"] - raced.usage["lm_calls"]
    assert saved_calls == note["example_evaluations_saved"]
    # Nothing pruned is the best; the baseline (the best here) is what both return.
    assert raced.best["trial"] == full.best["trial"]


def test_a_better_candidate_is_scored_on_every_example_and_wins() -> None:
    result = _run(_random(demo_helps_answer))
    best = next(t for t in result.history if t["trial"] == result.best["trial"])
    assert best["fidelity"] == 40
    assert not best["pruned"]
    assert result.best["score"] > result.baseline["score"]


def test_pruned_trials_are_told_pruned_with_per_example_values(tmp_path: Path) -> None:
    result = _run(_random(demos_hurt(), run_dir=tmp_path))
    study = optuna.load_study(study_name="random", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_number = {t.number: t for t in study.trials}
    for record in result.history:
        trial = by_number[record["trial"]]
        expected = optuna.trial.TrialState.PRUNED if record["pruned"] else optuna.trial.TrialState.COMPLETE
        assert trial.state == expected
        assert sorted(trial.intermediate_values) == list(range(record["fidelity"]))
        mean = sum(trial.intermediate_values.values()) / record["fidelity"]
        assert mean == pytest.approx(record["score"])


def test_a_resumed_run_keeps_its_pruned_trials_and_rescores_nothing(tmp_path: Path) -> None:
    first = _run(_random(demos_hurt(), run_dir=tmp_path, n_trials=5))
    assert any(t["pruned"] for t in first.history)
    lm = scripted_lm(demos_hurt())
    again = _random(demos_hurt(), run_dir=tmp_path, n_trials=5, lm=lm)
    second = _run(again)
    assert len(lm.history) == 0, "every trial, pruned or not, was restored from the study"
    assert second.history == first.history
    assert second.notes["racing"] == first.notes["racing"]
    longer = _run(_random(demos_hurt(), run_dir=tmp_path, n_trials=10))
    assert longer.history[: len(first.history)] == first.history
    assert len([t for t in longer.history if t["phase"] == "random" and not t["repeated"]]) == 10


def test_tpe_learns_from_pruned_trials() -> None:
    settings: dict[str, Any] = {
        "budget": 2000,
        "lm": scripted_lm(demos_hurt()),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 8,
        "val_size": 40,
        "confirm_size": 0,
        "n_trials": 10,
    }
    result = _run(JointBayesian(_metric, **settings))
    assert any(t["pruned"] for t in result.history)
    assert not next(t for t in result.history if t["trial"] == result.best["trial"])["pruned"]


def test_small_validation_sets_are_not_raced() -> None:
    result = _run(_random(demos_hurt(), val_size=10))
    assert not any(t["pruned"] for t in result.history)
    assert result.notes["racing"]["example_evaluations_saved"] == 0


def test_racing_slices() -> None:
    assert Racing().slices(40) == [10, 15, 20, 25, 30, 35, 40]
    assert Racing(min_examples=10, step=20).slices(25) == [10, 25]
    assert Racing().slices(8) == [8]


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"p_threshold": 0.0}, ConfigurationError),
        ({"p_threshold": 1.5}, ConfigurationError),
        ({"min_examples": 3}, ConfigurationError),
        ({"step": 0}, ConfigurationError),
    ],
)
def test_bad_racing_settings_are_refused(settings: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Racing(**settings)


def test_racing_must_be_a_racing_or_a_bool() -> None:
    with pytest.raises(TypeError, match="racing"):
        _random(demos_hurt(), racing="yes")


def test_a_raced_choice_is_still_confirmed() -> None:
    result = _run(_random(demo_helps_answer, confirm_size=40, budget=3000))
    assert result.confirmation is not None
    assert result.confirmation["confirmed"], result.confirmation["reason"]
    assert result.status == "completed"


def test_the_cli_summary_says_what_racing_saved() -> None:
    from stageopt.cli._limits import racing_lines

    result = _run(_random(demos_hurt()))
    note = result.notes["racing"]
    (line,) = racing_lines(result)
    assert f"{note['pruned_trials']} of {note['trials']} candidates dropped early" in line
    assert f"{note['example_evaluations_saved']} of " in line
    assert racing_lines(_run(_random(demos_hurt(), racing=False))) == []

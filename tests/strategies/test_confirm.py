"""Confirmation: a validation winner is returned only when it beats the original on held-out examples."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import dspy
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import CoordinateDescent, OptimizationResult, RandomSearch
from tests.conftest import scripted_lm


class Guess(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class OneStage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.guess = dspy.Predict(Guess)

    def forward(self, question: str) -> dspy.Prediction:
        return self.guess(question=question)


def _examples(n: int = 160) -> list[dspy.Example]:
    return [dspy.Example(question=f"item {i}", answer="yes").with_inputs("question") for i in range(n)]


def _metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    return float((prediction.answer or "").strip().lower() == example.answer)


def _coin(prompt: str, p_right: float) -> bool:
    """Right with probability ``p_right``, decided by the prompt's hash: every configuration is its own coin."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < p_right


_STYLES = itertools.count()


def _proposal(prompt: str) -> str | None:
    """A new instruction each time one is asked for, so the space has instructions to search."""
    if prompt.rstrip().endswith("Instruction:"):
        return f"Answer the question in a single word, style number {next(_STYLES)}."
    return None


def noise_answer(prompt: str) -> str:
    """Whatever the configuration, half the answers are right: every gain is luck."""
    proposal = _proposal(prompt)
    if proposal is not None:
        return proposal
    return " yes" if _coin(prompt, 0.5) else " no"


def demo_helps_answer(prompt: str) -> str:
    """Right 30 % of the time without demos, 90 % with one: a real gain to find."""
    proposal = _proposal(prompt)
    if proposal is not None:
        return proposal
    has_demo = len(prompt.split("\n\n---\n\n")) >= 3
    return " yes" if _coin(prompt, 0.9 if has_demo else 0.3) else " no"


def _random(lm_fn: Any, seed: int = 0, **kwargs: Any) -> RandomSearch:
    settings: dict[str, Any] = {
        "budget": 400,
        "lm": scripted_lm(lm_fn),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 8,
        "val_size": 20,
        "confirm_size": 40,
        "n_trials": 8,
        "seed": seed,
    }
    settings.update(kwargs)
    return RandomSearch(_metric, **settings)


def _run(optimizer: RandomSearch) -> tuple[dspy.Module, OptimizationResult]:
    program = optimizer.compile(OneStage(), trainset=_examples())
    assert optimizer.result is not None
    return program, optimizer.result


def test_a_real_gain_is_confirmed_and_returned() -> None:
    program, result = _run(_random(demo_helps_answer))
    conf = result.confirmation
    assert conf is not None
    assert conf["confirmed"], conf["reason"]
    assert result.status == "completed"
    assert conf["n"] == 40
    gain = conf["gain"]
    assert gain["n"] == 40
    assert gain["lower"] > 0
    assert gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    assert gain["candidate"] - gain["baseline"] == pytest.approx(gain["gain"])
    assert result.best["trial"] == conf["candidate"]["trial"]
    assert program.guess.demos, "the confirmed choice (with demos) is what comes back"


def test_a_lucky_validation_winner_is_not_returned() -> None:
    program, result = _run(_random(noise_answer))
    conf = result.confirmation
    assert conf is not None
    assert result.best["score"] == result.baseline["score"], "best is what is returned: the original"
    assert not conf["confirmed"]
    assert result.status == "no_significant_gain"
    assert conf["candidate"]["score"] > result.baseline["score"], "validation alone would have called it a gain"
    assert "held-out" in (result.stop_reason or "")
    assert "could have been detected" in (result.stop_reason or "")
    assert result.notes["stopping"]["status"] in {"completed", "budget_exhausted"}, "how the search itself ended"
    assert not program.guess.demos
    assert program.guess.signature.instructions == OneStage().guess.signature.instructions


def test_confirmation_calls_are_in_the_budget_and_kept_back_from_the_search() -> None:
    lm = scripted_lm(demo_helps_answer)
    optimizer = _random(demo_helps_answer, lm=lm, budget=200, n_trials=50)
    _, result = _run(optimizer)
    assert result.usage["lm_calls"] <= 200
    assert lm.engine.calls <= 200
    stopping = result.notes["stopping"]
    assert stopping["status"] == "budget_exhausted"
    assert "kept for confirmation" in stopping["reason"]
    conf = result.confirmation
    assert conf is not None
    assert conf["gain"] is not None, "the search left room for the confirmation"
    assert conf["gain"]["n"] == 40


def test_resume_reuses_the_confirmation_scores(tmp_path: Any) -> None:
    first = _random(demo_helps_answer, run_dir=tmp_path)
    _, done = _run(first)
    lm = scripted_lm(demo_helps_answer)
    second = _random(demo_helps_answer, run_dir=tmp_path, lm=lm)
    _, again = _run(second)
    assert again.confirmation == done.confirmation
    assert lm.engine.calls == 0


def test_returned_worse_rate_falls_to_about_the_error_rate() -> None:
    """Pure noise over many seeds: validation alone returns a 'gain' almost always, confirmation rarely."""
    seeds = range(16)
    unconfirmed = [_run(_random(noise_answer, seed=s, confirm_size=0))[1] for s in seeds]
    returned_changed = sum(r.best["score"] > r.baseline["score"] for r in unconfirmed)
    assert returned_changed >= 12
    confirmed = [_run(_random(noise_answer, seed=s))[1] for s in seeds]
    accepted = sum(bool(r.confirmation and r.confirmation["confirmed"]) for r in confirmed)
    # The true gain is 0, so an acceptance is an error; at confidence 0.9 about 1 in 10 (P(>= 5 of 16) < 2 %).
    assert accepted <= 4


def test_no_confirmation_with_confirm_size_zero() -> None:
    _, result = _run(_random(noise_answer, confirm_size=0))
    assert result.confirmation is None
    assert result.status == "completed"


def test_the_original_winning_on_validation_spends_nothing_on_confirmation() -> None:
    def never_right(prompt: str) -> str:
        return " no"

    lm = scripted_lm(never_right)
    _, result = _run(_random(never_right, lm=lm))
    conf = result.confirmation
    assert conf is not None
    assert not conf["confirmed"]
    assert conf["gain"] is None
    assert "original program is returned" in conf["reason"]


def test_confirmation_examples_are_disjoint_from_validation_and_bootstrap() -> None:
    optimizer = _random(noise_answer)
    boot, val, confirm = optimizer.split_confirm(_examples(), None)
    ids = [{x.question for x in part} for part in (boot, val, confirm)]
    assert len(ids[2]) == 40
    assert len(ids[1]) == 20
    assert not (ids[0] & ids[1])
    assert not (ids[0] & ids[2])
    assert not (ids[1] & ids[2])
    small = _random(noise_answer, confirm_size=40).split_confirm(_examples(20), None)
    assert len(small[2]) == (20 - 8) // 2, "at most half the validation pool"


@pytest.mark.parametrize("kwargs", [{"confirm_size": -1}, {"confidence": 1.0}, {"confidence": 0.3}])
def test_bad_confirmation_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        _random(noise_answer, **kwargs)


def test_every_strategy_confirms() -> None:
    optimizer = CoordinateDescent(
        _metric,
        budget=400,
        lm=scripted_lm(demo_helps_answer),
        adapter=SmallLMAdapter(),
        bootstrap_size=8,
        val_size=20,
        confirm_size=40,
        max_rounds=1,
        trials_per_stage=3,
    )
    optimizer.compile(OneStage(), trainset=_examples())
    assert optimizer.result is not None
    assert optimizer.result.confirmation is not None
    assert optimizer.result.confirmation["confirmed"]


def test_a_choice_that_changes_nothing_held_out_says_so() -> None:
    _, _, held_out = _random(noise_answer).split_confirm(_examples(), None)
    hidden = {f"Question: {x.question}" for x in held_out}

    def wrong_on_held_out(prompt: str) -> str:
        if any(prompt.rstrip().endswith(h) or f"{h}\n" in prompt.split("---")[-1] for h in hidden):
            return " no"
        return noise_answer(prompt)

    _, result = _run(_random(wrong_on_held_out))
    conf = result.confirmation
    assert conf is not None
    assert conf["gain"] is not None
    assert conf["gain"]["ci95"] == [0.0, 0.0]
    assert not conf["confirmed"]
    assert "both programs scored the same on every held-out example" in conf["reason"]

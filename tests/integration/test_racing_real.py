"""Racing on the real embedded model: candidates are scored slice by slice on Gemma, a dropped
one stops spending calls, and a resumed run rescores nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest

from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import Racing, RandomSearch

pytestmark = pytest.mark.integration

COUNTRIES = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Poland", "Warsaw"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Switzerland", "Bern"),
    ("United Kingdom", "London"),
    ("United States", "Washington"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
    ("Finland", "Helsinki"),
    ("Hungary", "Budapest"),
    ("Denmark", "Copenhagen"),
]


class Capital(dspy.Signature):
    """Name the capital city of the country."""

    country: str = dspy.InputField()
    capital: str = dspy.OutputField()


class AskCapital(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict(Capital)

    def forward(self, country: str) -> dspy.Prediction:
        return self.answer(country=country)


def _metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    return float(example.capital.lower() in (prediction.capital or "").lower())


def _optimizer(lm: dspy.BaseLM, run_dir: Path) -> RandomSearch:
    return RandomSearch(
        _metric,
        budget=400,
        lm=lm,
        adapter=SmallLMAdapter(),
        bootstrap_size=4,
        val_size=20,
        confirm_size=0,
        n_trials=5,
        # Chain of thought is a real candidate that the base model does clearly worse with (it runs
        # out of tokens reasoning): racing's quarry.
        settings={"module": ["predict", "cot"]},
        racing=Racing(min_examples=6, step=4),
        run_dir=run_dir,
    )


def _is_cot(record: dict[str, Any]) -> bool:
    return bool(record["params"]["answer"].get("module"))  # choice 1 of ["predict", "cot"]


def test_candidates_are_raced_on_the_real_model(gemma: LocalLM, tmp_path: Path) -> None:
    examples = [dspy.Example(country=c, capital=k).with_inputs("country") for c, k in COUNTRIES]
    optimizer = _optimizer(gemma, tmp_path)
    optimizer.compile(AskCapital(), trainset=examples)
    result = optimizer.result
    assert result is not None
    study = optuna.load_study(study_name="random", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    proposals = study.user_attrs["usage_after_proposals"]["lm_calls"]
    fresh = [t for t in result.history if not t["repeated"]]
    # At least one call per example scored, at most two (the adapter may ask once more for a
    # missing output label): a dropped candidate stopped spending where its record says.
    spent = result.usage["lm_calls"] - proposals
    scored = sum(t["fidelity"] for t in fresh)
    assert scored <= spent <= 2 * scored
    note = result.notes["racing"]
    assert note["example_evaluations_saved"] == sum(20 - t["fidelity"] for t in fresh if t["pruned"])
    states = {t.number: t.state for t in study.trials}
    for record in result.history:
        assert (states[record["trial"]] == optuna.trial.TrialState.PRUNED) == record["pruned"]
        assert record["fidelity"] in ((6, 10, 14, 18) if record["pruned"] else (20,))
    assert not next(t for t in result.history if t["trial"] == result.best["trial"])["pruned"]
    cot = [t for t in fresh if _is_cot(t)]
    assert cot, "the sampler tried chain of thought"
    assert any(t["pruned"] for t in cot), "the base model's chain of thought loses to plain answers early"
    before = gemma.engine.stats.calls
    again = _optimizer(gemma, tmp_path)
    again.compile(AskCapital(), trainset=examples)
    assert again.result is not None
    assert again.result.history == result.history
    assert gemma.engine.stats.calls == before

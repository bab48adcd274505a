"""Program-structure search: declared knobs, conditional stages, variants that really change shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import (
    STRUCTURE,
    JointBayesian,
    OptimizationResult,
    RandomSearch,
    SearchSpace,
    StructuredProgram,
    StructureKnobs,
    config_key,
)
from stageopt.tasks import GSM8KTask, HotpotQATask
from stageopt.tasks.gsm8k import MathReasoner
from stageopt.tasks.hotpotqa import MultiHopQA
from tests.conftest import (
    CapitalOfCity,
    CityToCountry,
    CountryToCapital,
    capital_metric,
    city_examples,
    demo_sensitive_answer,
    scripted_lm,
)
from tests.tasks import test_gsm8k as gsm8k_tests
from tests.tasks import test_hotpotqa as hotpot_tests


class CityToCapital(dspy.Signature):
    """Give the capital of the country this city is in."""

    city: str = dspy.InputField()
    capital: str = dspy.OutputField()


class Rechecked(StructureKnobs, dspy.Module):
    """A conditional toy: ``locate`` -> ``capital``, then (``rechecking=True``, the default) a
    ``recheck`` stage whose answer replaces the capital. The scripted LM answers a city with a
    country, so the recheck is always wrong: the best program turns it off and gives ``locate``
    a demo. The default shape runs every stage, so every stage gets bootstrapped demos."""

    STRUCTURE: ClassVar[dict[str, tuple[Any, ...]]] = {"rechecking": (True, False)}
    STAGE_CONDITIONS: ClassVar[dict[str, dict[str, tuple[Any, ...]]]] = {"recheck": {"rechecking": (True,)}}

    def __init__(self, rechecking: bool = True) -> None:
        super().__init__()
        self.rechecking = rechecking
        self.locate = dspy.Predict(CityToCountry)
        self.capital = dspy.Predict(CountryToCapital)
        self.recheck = dspy.Predict(CityToCapital)

    def forward(self, city: str) -> dspy.Prediction:
        country = self.locate(city=city).country
        capital = self.capital(country=country).capital
        if self.rechecking:
            capital = self.recheck(city=city).capital
        return dspy.Prediction(country=country, capital=capital)


# ---- the declaration ------------------------------------------------------------------------------


def test_knobs_put_the_current_shape_first_and_variants_are_copies() -> None:
    program = MultiHopQA(k=3)
    assert isinstance(program, StructuredProgram)
    assert program.structure_space() == {"hops": [2, 1], "k": [3, 2, 5]}
    assert program.stage_conditions() == {"query2": {"hops": [2]}}
    variant = program.with_structure(hops=1, k=5)
    assert (variant.hops, variant.k) == (1, 5)
    assert (program.hops, program.k) == (2, 3), "the program a variant comes from is unchanged"
    assert [n for n, _ in variant.named_predictors()] == [n for n, _ in program.named_predictors()]
    assert variant.query1 is not program.query1
    with pytest.raises(ConfigurationError, match=r"no structure knob 'depth'.*\['hops', 'k'\]"):
        program.with_structure(depth=3)
    with pytest.raises(ConfigurationError, match=r"'k'.*takes one of \[3, 2, 5\], got 4"):
        program.with_structure(k=4)
    assert not isinstance(CapitalOfCity(), StructuredProgram)


def test_saved_program_keeps_its_shape(tmp_path: Path) -> None:
    path = tmp_path / "program.json"
    MultiHopQA().with_structure(hops=1, k=5).save(str(path))
    assert json.loads(path.read_text())[STRUCTURE] == {"hops": 1, "k": 5}
    loaded = MultiHopQA()
    loaded.load(str(path))
    assert (loaded.hops, loaded.k) == (1, 5)
    state = json.loads(path.read_text())
    state[STRUCTURE] = {"depth": 2}
    path.write_text(json.dumps(state))
    with pytest.raises(ConfigurationError, match=r"structure knob\(s\) \['depth'\]"):
        MultiHopQA().load(str(path))


# ---- the variants really change shape -------------------------------------------------------------


def test_one_hop_never_calls_query2_and_k_sets_passages_per_hop(tmp_path: Path) -> None:
    task = HotpotQATask(k=1, data_dir=hotpot_tests._write(tmp_path, [hotpot_tests.ROW]))
    examples = task.load("dev")
    reports = {}
    for hops, k in ((2, 1), (1, 1), (1, 5)):
        program = task.program().with_structure(hops=hops, k=k)
        reports[hops, k] = evaluate(
            program,
            examples,
            task.metric,
            lm=scripted_lm(hotpot_tests._script),
            adapter=SmallLMAdapter(),
            stage_metrics=task.stage_metrics(),
        )
    two_hops = reports[2, 1].examples[0]
    assert [c.stage for c in two_hops.calls] == ["query1", "query2", "answer"]
    assert two_hops.prediction["hop1_titles"] == ["Lyon"]
    assert two_hops.prediction["hop2_titles"] == ["France"]
    one_hop = reports[1, 1].examples[0]
    assert [c.stage for c in one_hop.calls] == ["query1", "answer"]
    assert reports[1, 1].stages["query2"].calls == 0
    assert one_hop.prediction["hop2_titles"] == []
    assert one_hop.prediction["query2"] is None
    assert reports[1, 1].score == 0.0, "one hop with one passage misses France"
    assert len(reports[1, 5].examples[0].prediction["hop1_titles"]) == 4, "all four paragraphs (k=5)"
    assert reports[1, 5].score == 1.0, "more passages in one hop reach France"
    assert HotpotQATask(hops=1).program().hops == 1
    with pytest.raises(ConfigurationError, match="hops"):
        HotpotQATask(hops=3)


def test_gsm8k_without_verification_is_three_calls(tmp_path: Path) -> None:
    program = GSM8KTask(verification=False).program()
    assert isinstance(program, MathReasoner)
    assert program.verification is False
    assert [n for n, _ in program.named_predictors()] == ["understand", "plan", "solve", "verify"]
    lm = scripted_lm(gsm8k_tests._script(first=" 3*4=12\nAnswer: 12", verdict=" revise"))
    with dspy.context(lm=lm, adapter=SmallLMAdapter()):
        prediction = program(question=gsm8k_tests.ROW["question"])
    assert lm.engine.calls == 3
    assert (prediction.answer, prediction.verdict, prediction.revised) == ("12", "", False)
    assert GSM8KTask().program().structure_space() == {"verification": [True, False]}
    assert MathReasoner().with_structure(verification=False).verification is False


# ---- the search space -------------------------------------------------------------------------------


def test_space_holds_structure_choices_and_conditions() -> None:
    space = SearchSpace.initial(MultiHopQA(), settings={"structure": ["hops"], "module": ["predict", "cot"]})
    assert space.structure is not None
    assert space.structure.choices == {"hops": [2, 1]}
    assert space.structure.conditions == {"query2": {"hops": [2]}}
    assert STRUCTURE not in space.default_config(), "the default configuration is the program as it is"
    assert space.names() == ["query1", "query2", "answer"]
    assert list(space.all_distributions())[:2] == [f"{STRUCTURE}.hops", "query1.instruction"]
    restored = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert restored == space
    everything = SearchSpace.initial(MultiHopQA(), settings={"structure": True})
    assert everything.structure is not None
    assert list(everything.structure.choices) == ["hops", "k"]


def test_apply_builds_the_variant_and_keys_ignore_the_default_shape() -> None:
    space = SearchSpace.initial(MultiHopQA(), settings={"structure": ["*"]})
    base = space.default_config()
    one_hop = {**base, STRUCTURE: {"hops": 1, "k": 2}}
    program = space.apply(MultiHopQA(), one_hop)
    assert (program.hops, program.k) == (1, 5)
    assert space.apply(MultiHopQA(), base).hops == 2
    assert config_key({**base, STRUCTURE: {"hops": 0, "k": 0}}) == config_key(base)
    assert config_key(one_hop).startswith(f"{STRUCTURE}:hops=1/k=2;")
    described = space.describe(one_hop)
    assert described[STRUCTURE] == {"hops": 1, "k": 5}
    assert described["query2"]["runs"] is False
    assert "runs" not in described["query1"]
    assert space.describe(base)[STRUCTURE] == {"hops": 2, "k": 2}
    assert space.normalize({**one_hop, "query2": {"instruction": 3, "demos": 1}})["query2"] == {
        "instruction": 0,
        "demos": 0,
    }
    with pytest.raises(ConfigurationError, match="out of range"):
        space.apply(MultiHopQA(), {STRUCTURE: {"hops": 2}})
    with pytest.raises(ConfigurationError, match="searches no structure"):
        SearchSpace.initial(MultiHopQA()).apply(MultiHopQA(), one_hop)


class Renaming(Rechecked):
    """Breaks the contract: its variant without the recheck drops that stage."""

    def with_structure(self, **choices: Any) -> Any:
        new = super().with_structure(**choices)
        if not new.rechecking:
            del new.recheck
        return new


def test_a_variant_must_keep_every_stage() -> None:
    space = SearchSpace.initial(Renaming(), settings={"structure": ["rechecking"]})
    with pytest.raises(ConfigurationError, match=r"changed the stage names to \['locate', 'capital'\]"):
        space.apply(Renaming(), {STRUCTURE: {"rechecking": 1}})


def test_suggest_asks_a_stages_knobs_only_when_the_stage_runs() -> None:
    space = SearchSpace.initial(Rechecked(), settings={"structure": ["rechecking"]})
    space.stages["recheck"].instructions.append("Check it.")
    # FixedTrial raises for a parameter it does not hold: this succeeds only if the absent
    # stage's knobs are never asked.
    stages = {f"{s}.{k}": 0 for s in ("locate", "capital") for k in ("instruction", "demos")}
    off = space.suggest(optuna.trial.FixedTrial({f"{STRUCTURE}.rechecking": 1, **stages}))
    assert off[STRUCTURE] == {"rechecking": 1}
    assert off["recheck"] == {"instruction": 0, "demos": 0}
    with pytest.raises(ValueError, match="recheck"):
        space.suggest(optuna.trial.FixedTrial({f"{STRUCTURE}.rechecking": 0, **stages}))
    on = {f"{STRUCTURE}.rechecking": 0, **stages, "recheck.instruction": 1, "recheck.demos": 0}
    assert space.suggest(optuna.trial.FixedTrial(on))["recheck"] == {"instruction": 1, "demos": 0}
    plain = SearchSpace.initial(CapitalOfCity())
    study = optuna.create_study()
    config = plain.suggest(study.ask())
    assert STRUCTURE not in config
    assert set(config) == {"locate", "capital"}


def test_structure_needs_a_structured_program_and_known_knobs() -> None:
    with pytest.raises(ConfigurationError, match="CapitalOfCity declares no structure knobs"):
        SearchSpace.initial(CapitalOfCity(), settings={"structure": ["*"]})
    with pytest.raises(ConfigurationError, match=r"no structure knob\(s\) \['depth'\]"):
        SearchSpace.initial(MultiHopQA(), settings={"structure": ["depth"]})
    with pytest.raises(ConfigurationError, match="list of structure knob names"):
        SearchSpace.initial(MultiHopQA(), settings={"structure": "hops"})
    with pytest.raises(ConfigurationError, match=r"allowed: .*structure"):
        SearchSpace.initial(MultiHopQA(), settings={"shape": ["hops"]})


# ---- structure through an optimizer -----------------------------------------------------------------


def _joint(storage: Any, budget: int = 300, **kwargs: Any) -> JointBayesian:
    settings: dict[str, Any] = {
        "budget": budget,
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "val_size": 6,
        "seed": 0,
        "storage": storage,
        "settings": {"structure": ["rechecking"]},
        "patience": None,
    }
    settings.update(kwargs)
    return JointBayesian(capital_metric, **settings)


def _compile(optimizer: JointBayesian) -> tuple[OptimizationResult, dspy.Module]:
    program = optimizer.compile(Rechecked(), trainset=city_examples())
    assert optimizer.result is not None
    return optimizer.result, program


def test_joint_search_finds_the_better_shape_and_never_asks_absent_stages() -> None:
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    result, program = _compile(_joint(storage, n_trials=14))
    assert result.baseline["score"] == 0.0, "the default shape (with the recheck) is always wrong"
    assert result.best["score"] == 1.0
    assert result.best["params"][STRUCTURE] == {"rechecking": False}
    assert result.best["params"]["recheck"]["runs"] is False
    assert program.rechecking is False, "the returned program has the best shape"
    assert program.locate.demos
    shapes = {h["params"].get(STRUCTURE, {}).get("rechecking", 0) for h in result.history}
    assert shapes == {0, 1}, "both shapes were tried"
    trials = optuna.load_study(study_name="joint", storage=storage).get_trials()
    searched = [t for t in trials if t.user_attrs.get("phase") == "joint"]
    assert searched
    for trial in searched:
        asked = {name.partition(".")[0] for name in trial.params}
        off = trial.params[f"{STRUCTURE}.rechecking"] == 1
        assert asked == {STRUCTURE, "locate", "capital"} | (set() if off else {"recheck"})
    for h in result.history:
        if h["params"].get(STRUCTURE, {}).get("rechecking"):
            assert set(h["params"]["recheck"].values()) == {0}, "an absent stage stays at index 0"


def test_absent_stages_round_trip_through_result_json_and_resume() -> None:
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    first, _ = _compile(_joint(storage, n_trials=6))
    data = json.loads(json.dumps(first.to_dict()))
    assert OptimizationResult.from_dict(data) == first
    done = len(first.history)
    lm = scripted_lm(demo_sensitive_answer)
    second, _ = _compile(_joint(storage, n_trials=12, lm=lm))
    assert second.history[:done] == first.history, "finished trials, absent stages included, are kept"
    assert len(second.history) > done
    fresh = [h for h in second.history if not h["repeated"]]
    assert len({(config_key(h["params"]), h["fidelity"]) for h in fresh}) == len(fresh), "nothing is scored twice"
    assert second.best["score"] >= first.best["score"]
    stored = optuna.load_study(study_name="joint", storage=storage).user_attrs["space"]
    assert stored[STRUCTURE] == {
        "choices": {"rechecking": [True, False]},
        "conditions": {"recheck": {"rechecking": [True]}},
    }


def test_same_seed_same_structure_search() -> None:
    runs = []
    for _ in range(2):
        result, _ = _compile(_joint(optuna.storages.InMemoryStorage(), budget=150, n_trials=8))
        runs.append([(h["params"], h["score"]) for h in result.history])
    assert runs[0] == runs[1]


def test_random_search_varies_structure_too() -> None:
    optimizer = RandomSearch(
        capital_metric,
        budget=200,
        lm=scripted_lm(demo_sensitive_answer),
        adapter=SmallLMAdapter(),
        bootstrap_size=6,
        val_size=6,
        seed=1,
        n_trials=8,
        settings={"structure": ["rechecking"]},
    )
    optimizer.compile(Rechecked(), trainset=city_examples())
    assert optimizer.result is not None
    assert {h["params"].get(STRUCTURE, {}).get("rechecking", 0) for h in optimizer.result.history} == {0, 1}

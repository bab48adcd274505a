"""Warm start: an earlier run's best configurations, re-expressed in a new run's pools, scored first."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import (
    STRATEGIES,
    BaseStageOptimizer,
    CoordinateDescent,
    JointBayesian,
    OptimizationResult,
    SearchSpace,
    WarmStart,
    config_key,
)
from stageopt.strategies._warmstart import PLAN_ATTR, WARM_PHASE, read_source
from tests.conftest import (
    CapitalOfCity,
    CityToCountry,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)

#: Configurations a warm start takes by default.
TOP_K = 3


def _build(strategy: type[BaseStageOptimizer], budget: int, **kwargs: Any) -> BaseStageOptimizer:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "val_size": 6,
        "seed": 0,
    }
    settings.update(kwargs)
    if "run_dir" not in settings:
        settings.setdefault("storage", optuna.storages.InMemoryStorage())
    return strategy(capital_metric, budget=budget, **settings)


def _run(
    strategy: type[BaseStageOptimizer], budget: int, program: dspy.Module | None = None, **kwargs: Any
) -> tuple[OptimizationResult, optuna.Study]:
    optimizer = _build(strategy, budget, **kwargs)
    optimizer.compile(program or CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    storage = optimizer.storage or f"sqlite:///{(Path(kwargs['run_dir']) / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name=optimizer.study_name or optimizer.strategy_name, storage=storage)
    return optimizer.result, study


def _write_run_dir(run_dir: Path, result: OptimizationResult, program: dspy.Module | None = None) -> None:
    """What ``stageopt optimize`` leaves beside optuna.db."""
    (run_dir / "result.json").write_text(json.dumps(result.to_dict()))
    if program is not None:
        program.save(str(run_dir / "program.json"))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A joint run on the toy task with another seed (so its candidate pools differ), in a run directory."""
    run_dir = tmp_path_factory.mktemp("source")
    with dspy.context(lm=None, adapter=None):
        optimizer = _build(JointBayesian, 150, seed=1, run_dir=run_dir)
        program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    _write_run_dir(run_dir, optimizer.result, program)
    return run_dir


def _content(study: optuna.Study, config: dict[str, dict[str, int]]) -> dict[str, Any]:
    """A configuration by content: each stage's instruction text and demos."""
    space = SearchSpace.from_dict(study.user_attrs["space"])
    return {
        stage: (space.stages[stage].instructions[c["instruction"]], space.stages[stage].demo_sets[c["demos"]])
        for stage, c in config.items()
    }


def _source_top(source_dir: Path, k: int = TOP_K) -> tuple[optuna.Study, list[dict[str, Any]]]:
    result = json.loads((source_dir / "result.json").read_text())
    study = optuna.load_study(study_name="joint", storage=f"sqlite:///{source_dir / 'optuna.db'}")
    full = sorted(
        (h for h in result["history"] if h["fidelity"] == result["baseline"]["n"]),
        key=lambda h: (-h["score"], h["trial"]),
    )
    top: list[dict[str, Any]] = []
    for h in full:
        if config_key(h["params"]) not in {config_key(t["params"]) for t in top}:
            top.append(h)
    return study, top[:k]


def _warm(result: OptimizationResult) -> list[dict[str, Any]]:
    return [h for h in result.history if h["phase"] == WARM_PHASE]


def test_the_warm_configurations_are_the_first_trials(source_dir: Path) -> None:
    source_study, top = _source_top(source_dir)
    assert len(top) == TOP_K
    result, study = _run(CoordinateDescent, 200, warm_start=str(source_dir))
    phases = [h["phase"] for h in result.history]
    n = len(_warm(result))
    assert phases[: 1 + n] == ["baseline", *[WARM_PHASE] * n]
    assert WARM_PHASE not in phases[1 + n :]
    # Each is the content of one of the source's best configurations, best first, in this run's pools.
    default = _content(study, result.history[0]["params"])
    expected = [_content(source_study, h["params"]) for h in top]
    expected = [c for c in expected if c != default]
    assert n == len(expected) >= 2
    assert [_content(study, h["params"]) for h in _warm(result)] == expected
    notes = result.notes["warm_start"]
    assert notes["stages"] == {"locate": "matched", "capital": "matched"}
    assert [c["source_trial"] for c in notes["configs"]] == [
        h["trial"] for h in top if _content(source_study, h["params"]) != default
    ]
    # Told to Optuna with their parameters, so a sampler learns from them.
    trials = {t.number: t for t in study.get_trials()}
    for h in _warm(result):
        assert trials[h["trial"]].params == {f"{s}.{k}": i for s, c in h["params"].items() for k, i in c.items()}
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    # Coordinate descent starts from the warm incumbent: its first trial keeps the other stage's warm choice.
    incumbent = max([result.history[0], *_warm(result)], key=lambda h: (h["score"], -h["trial"]))
    first = next(h for h in result.history if h["phase"] == "coordinate")
    other = next(s for s in first["params"] if s != first["stage"])
    assert first["params"][other] == incumbent["params"][other]


class CountryToCapitalRenamed(dspy.Signature):
    """Give the capital city of the country."""

    nation: str = dspy.InputField()
    capital: str = dspy.OutputField()


class RenamedCapitalOfCity(dspy.Module):
    """The toy program with the second stage's input renamed: same stage names, one signature changed."""

    def __init__(self) -> None:
        super().__init__()
        self.locate = dspy.Predict(CityToCountry)
        self.capital = dspy.Predict(CountryToCapitalRenamed)

    def forward(self, city: str) -> dspy.Prediction:
        country = self.locate(city=city).country
        return dspy.Prediction(country=country, capital=self.capital(nation=country).capital)


def renamed_answer(prompt: str) -> str:
    return demo_sensitive_answer(prompt.replace("Nation:", "Country:"))


def test_a_stage_whose_signature_changed_is_not_warm_started(
    source_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source_study, top = _source_top(source_dir)
    with caplog.at_level(logging.WARNING, logger="stageopt.strategies._warmstart"):
        result, study = _run(
            JointBayesian,
            200,
            RenamedCapitalOfCity(),
            lm=scripted_lm(renamed_answer),
            warm_start=str(source_dir),
            n_trials=2,
        )
    warm = _warm(result)
    assert warm
    assert all(h["params"]["capital"] == {"instruction": 0, "demos": 0} for h in warm), "capital keeps its original"
    assert [_content(study, h["params"])["locate"] for h in warm] == [
        _content(source_study, h["params"])["locate"] for h in top
    ][: len(warm)]
    stages = result.notes["warm_start"]["stages"]
    assert stages["locate"] == "matched"
    assert "signature changed" in stages["capital"]
    assert "country -> capital" in stages["capital"]
    assert "nation -> capital" in stages["capital"]
    assert "signature changed" in caplog.text


class CountryToLanguage(dspy.Signature):
    """Name the main language of the country."""

    country: str = dspy.InputField()
    language: str = dspy.OutputField()


class LanguageOfCity(dspy.Module):
    """A related task: the same first stage, then another second stage."""

    def __init__(self) -> None:
        super().__init__()
        self.locate = dspy.Predict(CityToCountry)
        self.speak = dspy.Predict(CountryToLanguage)

    def forward(self, city: str) -> dspy.Prediction:
        country = self.locate(city=city).country
        return dspy.Prediction(country=country, language=self.speak(country=country).language)


def language_answer(prompt: str) -> str:
    return " French" if prompt.split("\n\n---\n\n")[-1].startswith("Country:") else demo_sensitive_answer(prompt)


def test_a_related_task_warm_starts_the_one_shared_stage(tmp_path: Path) -> None:
    related = tmp_path / "related"
    optimizer = JointBayesian(
        country_metric,
        budget=120,
        lm=scripted_lm(language_answer),
        adapter=SmallLMAdapter(),
        bootstrap_size=6,
        val_size=6,
        seed=0,
        run_dir=related,
    )
    optimizer.compile(LanguageOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    assert optimizer.result.best["score"] == 1.0, "the related run found demos for `locate`"
    _write_run_dir(related, optimizer.result)

    result, study = _run(CoordinateDescent, 200, warm_start=str(related))
    notes = result.notes["warm_start"]
    assert notes["stages"]["locate"] == "matched"
    assert notes["stages"]["capital"].startswith("not in the source run")
    warm = _warm(result)
    assert warm
    assert all(h["params"]["capital"] == {"instruction": 0, "demos": 0} for h in warm)
    source = optuna.load_study(study_name="joint", storage=f"sqlite:///{related / 'optuna.db'}")
    best = next(h for h in optimizer.result.history if h["trial"] == optimizer.result.best["trial"])
    assert _content(study, warm[0]["params"])["locate"] == _content(source, best["params"])["locate"]
    assert warm[0]["score"] == 1.0, "the shared stage's demos carry over to the new task"


def test_resume_neither_rereads_nor_enqueues_again(source_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "source"
    shutil.copytree(source_dir, copy)
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    # Proposals (<= 36 calls) and the baseline (12) leave room for one warm trial (12 calls) of three.
    first, _ = _run(JointBayesian, 62, warm_start=str(copy), storage=storage)
    assert first.status == "budget_exhausted"
    planned = len(first.notes["warm_start"]["configs"])
    assert 1 <= len(_warm(first)) < planned

    shutil.rmtree(copy)  # the plan is in the study: the source is not read again
    result, study = _run(JointBayesian, 300, warm_start=str(source_dir), storage=storage, n_trials=3)
    assert result.history[: len(first.history)] == first.history
    warm = _warm(result)
    assert len(warm) == planned
    assert len({config_key(h["params"]) for h in warm}) == planned
    assert [h["params"] for h in warm] == [c["params"] for c in study.user_attrs[PLAN_ATTR]["configs"]]
    assert study.user_attrs[PLAN_ATTR]["source"].startswith(str(copy))
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [h["phase"] for h in result.history].index("joint") > max(
        i for i, h in enumerate(result.history) if h["phase"] == WARM_PHASE
    )


def test_a_warm_start_is_not_added_to_a_study_that_has_searched(
    source_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    first, _ = _run(JointBayesian, 90, storage=storage)
    assert first.status == "budget_exhausted"
    assert "joint" in {h["phase"] for h in first.history}
    with caplog.at_level(logging.WARNING, logger="stageopt.strategies._warmstart"):
        result, study = _run(JointBayesian, 150, storage=storage, warm_start=str(source_dir))
    assert not _warm(result)
    assert PLAN_ATTR not in study.user_attrs
    assert "warm start ignored" in caplog.text


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_starts_from_the_warm_configurations(name: str, source_dir: Path) -> None:
    lm = scripted_lm(demo_sensitive_answer)
    result, study = _run(STRATEGIES[name], 250, lm=lm, warm_start=WarmStart(str(source_dir), "joint", top_k=2))
    assert lm.engine.calls == result.usage["lm_calls"] <= 250
    warm = _warm(result)
    assert [h["phase"] for h in result.history[: 1 + len(warm)]] == ["baseline", *[WARM_PHASE] * len(warm)]
    assert 1 <= len(warm) <= 2
    assert result.best["score"] >= max(h["score"] for h in warm)
    counted = [h for h in result.history if not h["repeated"]]
    assert len({(config_key(h["params"]), h["fidelity"]) for h in counted}) == len(counted)
    if name in {"evolutionary", "pbt"}:  # the warm configurations are in the first population
        plan = study.user_attrs.get("evolutionary.generation.0") or study.user_attrs["pbt.round.0"]
        members = [config_key(m["params"]) for m in plan["members"]]
        assert members[1 : 1 + len(warm)] == [config_key(h["params"]) for h in warm]


def test_a_study_is_read_from_its_storage_url(tmp_path: Path) -> None:
    db = tmp_path / "two.db"
    url = f"sqlite:///{db}"
    _run(JointBayesian, 120, storage=url, study_name="mine", seed=1)
    _run(JointBayesian, 60, storage=url, study_name="other", seed=2)
    with pytest.raises(ConfigurationError, match=r"holds studies .*mine.*SOURCE::STUDY"):
        read_source(WarmStart(url))
    with pytest.raises(ConfigurationError, match="no study 'nope'"):
        read_source(WarmStart(url, "nope"))
    source = read_source(WarmStart.parse(f"{url}::mine", top_k=2))
    assert len(source.configs) == 2
    scores = [c.score for c in source.configs]
    assert None not in scores
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert source.signatures["locate"] == {"inputs": ["city"], "outputs": ["country"]}
    # an optuna.db file works as well
    assert read_source(WarmStart(str(db), "mine")).configs == read_source(WarmStart.parse(f"{url}::mine")).configs


def test_a_run_directory_without_its_study_gives_its_program(source_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("result.json", "program.json"):
        shutil.copy(source_dir / name, copy / name)
    source = read_source(WarmStart(str(copy)))
    (config,) = source.configs
    saved = json.loads((copy / "program.json").read_text())
    assert config.stages["locate"]["demos"] == saved["locate"]["demos"]
    assert config.score == json.loads((copy / "result.json").read_text())["best"]["score"]
    result, _ = _run(CoordinateDescent, 150, warm_start=str(copy))
    (warm,) = _warm(result)
    assert warm["score"] == 1.0
    assert result.notes["warm_start"]["stages"] == {"locate": "matched", "capital": "matched"}
    # the saved program's signatures are recognised: a renamed field is still refused
    renamed, _ = _run(
        CoordinateDescent, 150, RenamedCapitalOfCity(), lm=scripted_lm(renamed_answer), warm_start=str(copy)
    )
    assert "signature changed" in renamed.notes["warm_start"]["stages"]["capital"]


def test_specs_and_bad_sources_are_refused_when_built(tmp_path: Path) -> None:
    assert WarmStart.parse("runs/x::joint") == WarmStart("runs/x", "joint")
    assert WarmStart.parse("sqlite:///runs/x/optuna.db") == WarmStart("sqlite:///runs/x/optuna.db")
    assert WarmStart.parse(Path("runs/x"), top_k=5) == WarmStart("runs/x", None, 5)
    with pytest.raises(ConfigurationError, match="top_k"):
        WarmStart("runs/x", top_k=0)
    with pytest.raises(ConfigurationError, match="does not exist"):
        _build(JointBayesian, 100, warm_start=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="warm_start"):
        _build(JointBayesian, 100, warm_start=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    lm = scripted_lm(demo_sensitive_answer)
    with pytest.raises(ConfigurationError, match=r"neither optuna\.db nor program\.json"):
        _build(JointBayesian, 100, lm=lm, warm_start=str(empty)).compile(CapitalOfCity(), trainset=city_examples())


def test_the_cli_flag_warm_starts_optimize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stageopt.cli import _commands
    from stageopt.cli._main import main
    from tests.tasks.test_hotpotqa import ROW, _script, _write

    data = _write(tmp_path / "data", [{**ROW, "id": f"x{i}"} for i in range(4)], "dev")
    data = _write(data, [{**ROW, "id": f"t{i}"} for i in range(8)], "train")
    monkeypatch.setattr(_commands, "resolve_lm", lambda spec, **kwargs: scripted_lm(_script))
    common = ["optimize", "--data-dir", str(data), "--val-size", "3", "--bootstrap-size", "3"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*common, "--budget-calls", "80", "--out", str(first), "--strategy", "joint"]) == 0
    argv = [*common, "--budget-calls", "80", "--out", str(second), "--strategy", "pbt", "--warm-start", str(first)]
    assert main(argv) == 0
    result = json.loads((second / "result.json").read_text())
    assert result["notes"]["warm_start"]["source"].startswith(str(first))
    assert set(result["notes"]["warm_start"]["stages"].values()) == {"matched"}
    assert (
        main([*common, "--budget-calls", "80", "--out", str(tmp_path / "x"), "--warm-start", str(tmp_path / "no")]) == 2
    )

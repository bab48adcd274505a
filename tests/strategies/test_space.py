from __future__ import annotations

import json
from typing import Any

import dspy
import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.evaluation import MeteredLM
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import CoordinateDescent, SearchSpace
from stageopt.strategies._space import config_from_params, config_key, validate_settings
from tests.conftest import (
    CapitalOfCity,
    CityToCountry,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)

ALL_SETTINGS: dict[str, list[Any]] = {
    "temperature": [0.0, 0.7],
    "n_demos": [None, 1],
    "module": ["predict", "cot"],
    "model": ["alt"],
}


class WithCoT(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.think = dspy.ChainOfThought(CityToCountry)
        self.plain = dspy.Predict(CityToCountry, temperature=0.3)

    def forward(self, city: str) -> dspy.Prediction:
        return self.plain(city=self.think(city=city).country)


def _demo(i: int) -> dict[str, str]:
    return {"country": f"C{i}", "capital": f"K{i}"}


def _space(**settings: list[Any]) -> tuple[SearchSpace, dspy.LM]:
    alt = scripted_lm(lambda _: " x")
    space = SearchSpace.initial(CapitalOfCity(), settings=settings or ALL_SETTINGS, models={"alt": alt})
    space.stages["capital"].demo_sets.append([_demo(1), _demo(2), _demo(3)])
    return space, alt


def test_space_without_settings_is_unchanged() -> None:
    space = SearchSpace.initial(CapitalOfCity())
    assert space.default_config() == {
        "locate": {"instruction": 0, "demos": 0},
        "capital": {"instruction": 0, "demos": 0},
    }
    assert all("settings" not in stage for stage in space.to_dict().values())
    assert list(space.distributions("locate")) == ["locate.instruction", "locate.demos"]
    assert config_key(space.default_config()) == "capital:0/0;locate:0/0"
    assert list(space.describe(space.default_config())["locate"]) == [
        "instruction",
        "demos",
        "instruction_text",
        "n_demos",
    ]


def test_setting_choices_start_with_each_stages_original() -> None:
    space, _ = _space()
    settings = space.stages["locate"].settings
    assert settings == {
        "temperature": [None, 0.0, 0.7],
        "n_demos": [None, 1],
        "module": ["predict", "cot"],
        "model": [None, "alt"],
    }
    assert space.default_config()["locate"] == {
        "instruction": 0,
        "demos": 0,
        "temperature": 0,
        "n_demos": 0,
        "module": 0,
        "model": 0,
    }
    other = SearchSpace.initial(WithCoT(), settings={"temperature": [0.0, 0.3], "module": ["predict", "cot"]})
    assert other.names() == ["think.predict", "plain"]
    assert other.stages["think.predict"].settings == {"temperature": [None, 0.0, 0.3], "module": ["cot", "predict"]}
    assert other.stages["plain"].settings == {"temperature": [0.3, 0.0], "module": ["predict", "cot"]}


def test_distributions_and_grid_cover_every_knob() -> None:
    space, _ = _space()
    distributions = space.distributions("capital")
    assert {k: len(d.choices) for k, d in distributions.items()} == {  # type: ignore[attr-defined]
        "capital.instruction": 1,
        "capital.demos": 2,
        "capital.temperature": 3,
        "capital.n_demos": 2,
        "capital.module": 2,
        "capital.model": 2,
    }
    configs = list(space.stage_configs("capital"))
    assert len(configs) == 2 * 3 * 2 * 2 * 2
    assert configs[0] == space.default_config()["capital"]
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    assert set(space.all_distributions()) == set(distributions) | set(space.distributions("locate"))


def test_config_key_and_params_handle_settings_generically() -> None:
    space, _ = _space()
    base = space.default_config()
    assert config_key(base) == "capital:0/0;locate:0/0", "knobs at their original choice do not change the key"
    changed = config_from_params({"capital.temperature": 2, "capital.module": 1, "locate.demos": 0}, base)
    assert changed["capital"] == {**base["capital"], "temperature": 2, "module": 1}
    assert config_key(changed) == "capital:0/0/temperature=2/module=1;locate:0/0"
    keys = {config_key({"capital": c}) for c in space.stage_configs("capital")}
    assert len(keys) == len(list(space.stage_configs("capital")))


def test_apply_sets_each_knob_and_keeps_stage_names() -> None:
    space, alt = _space()
    original = CapitalOfCity()
    config = space.default_config()
    config["capital"].update(demos=1, temperature=2, n_demos=1, module=1, model=1)
    program = space.apply(original, config)
    assert [name for name, _ in program.named_predictors()] == ["locate", "capital"]
    capital = program.capital
    assert list(capital.signature.output_fields) == ["reasoning", "capital"]
    assert capital.signature.instructions == original.capital.signature.instructions
    assert [d.toDict() for d in capital.demos] == [_demo(1)]
    assert capital.config["temperature"] == 0.7
    assert capital.lm is alt
    # The original program and the untouched stage are as they were.
    assert list(original.capital.signature.output_fields) == ["capital"]
    assert not original.capital.demos
    assert original.capital.lm is None
    assert "temperature" not in original.capital.config
    locate = program.locate
    assert list(locate.signature.output_fields) == ["country"]
    assert locate.lm is None
    assert "temperature" not in locate.config
    described = space.describe(config)["capital"]
    assert described["n_demos"] == 1
    assert (described["temperature"], described["module"], described["model"]) == (0.7, "cot", "alt")


def test_apply_default_config_is_the_original_program() -> None:
    space, _ = _space()
    space.stages["capital"].demo_sets[0] = [_demo(0)]
    program = space.apply(CapitalOfCity(), space.default_config())
    original = CapitalOfCity()
    for (_, new), (_, old) in zip(program.named_predictors(), original.named_predictors(), strict=True):
        assert new.signature.equals(old.signature)
        assert new.config == old.config
        assert new.lm is None
    assert [d.toDict() for d in program.capital.demos] == [_demo(0)]


def test_predict_choice_removes_chain_of_thought() -> None:
    space = SearchSpace.initial(WithCoT(), settings={"module": ["predict"]})
    config = space.default_config()
    config["think.predict"]["module"] = 1
    program = space.apply(WithCoT(), config)
    assert list(program.think.predict.signature.output_fields) == ["country"]
    assert space.stages["plain"].settings == {"module": ["predict"]}


def test_round_trip_is_json_and_keeps_settings() -> None:
    space, alt = _space()
    data = json.loads(json.dumps(space.to_dict()))
    restored = SearchSpace.from_dict(data, models={"alt": alt})
    assert restored == space
    assert restored.models == {"alt": alt}
    config = space.default_config()
    config["locate"]["model"] = 1
    assert SearchSpace.from_dict(data).describe(config)["locate"]["model"] == "alt"
    with pytest.raises(ConfigurationError, match=r"models=\{'alt'"):
        SearchSpace.from_dict(data).apply(CapitalOfCity(), config)


def test_apply_refuses_out_of_range_and_disabled_knobs() -> None:
    space = SearchSpace.initial(CapitalOfCity(), settings={"n_demos": [2]})
    with pytest.raises(ConfigurationError, match="out of range"):
        space.apply(CapitalOfCity(), {"locate": {"instruction": 0, "demos": 0, "n_demos": 5}})
    with pytest.raises(ConfigurationError, match="out of range"):
        space.apply(CapitalOfCity(), {"locate": {"instruction": 3, "demos": 0}})
    with pytest.raises(ConfigurationError, match="not enabled"):
        space.apply(CapitalOfCity(), {"locate": {"instruction": 0, "demos": 0, "temperature": 1}})
    with pytest.raises(ConfigurationError, match="unknown stage"):
        space.apply(CapitalOfCity(), {"nope": {"instruction": 0, "demos": 0}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temprature": [0.1]}, r"unknown setting knob.*'temprature'.*allowed: temperature, n_demos, module, model"),
        ({"temperature": []}, "non-empty list"),
        ({"module": "cot"}, "non-empty list"),
        ({"temperature": [-0.5]}, r"numbers >= 0.*-0.5"),
        ({"temperature": [True]}, "numbers >= 0"),
        ({"temperature": [float("nan")]}, "numbers >= 0"),
        ({"n_demos": [1.5]}, r"ints >= 0.*1.5"),
        ({"n_demos": [-1]}, "ints >= 0"),
        ({"module": ["react"]}, r"\['predict', 'cot'\].*'react'"),
        ({"module": [None]}, "must be one of"),
        ({"model": ["big"]}, r"'big'.*known models: \[\]"),
        ([("temperature", [0.1])], "must map knob names"),
    ],
)
def test_bad_settings_are_named(settings: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        validate_settings(settings)


def test_settings_drop_repeats_and_keep_knob_order() -> None:
    models = {"a": scripted_lm(str)}
    settings = validate_settings({"model": ["a", "a"], "temperature": (0.5, 0.5, None)}, models)
    assert settings == {"temperature": [0.5, None], "model": ["a"]}
    assert list(settings) == ["temperature", "model"]


def test_add_instruction_returns_index_and_deduplicates() -> None:
    space = SearchSpace.initial(CapitalOfCity())
    assert space.add_instruction("locate", "Say which country the city is in.") == 1
    assert space.add_instruction("locate", "  Say which country  the city is in. ") == 1
    assert space.add_instruction("locate", space.stages["locate"].instructions[0]) == 0
    assert space.stages["locate"].instructions == [CityToCountry.instructions, "Say which country the city is in."]
    program = space.apply(CapitalOfCity(), {"locate": {"instruction": 1, "demos": 0}})
    assert program.locate.signature.instructions == "Say which country the city is in."
    with pytest.raises(ConfigurationError, match="unknown stage"):
        space.add_instruction("nope", "Say it.")
    with pytest.raises(ConfigurationError, match="empty"):
        space.add_instruction("locate", "   ")


# ---- settings through an optimizer ------------------------------------------------------------


def _optimizer(budget: int = 200, **kwargs: Any) -> CoordinateDescent:
    settings: dict[str, Any] = {
        "budget": budget,
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "val_size": 6,
        "max_rounds": 1,
        "trials_per_stage": 3,
        "seed": 0,
    }
    settings.update(kwargs)
    return CoordinateDescent(capital_metric, **settings)


def test_optimizer_validates_settings_when_built() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting knob"):
        _optimizer(settings={"top_p": [0.9]})
    with pytest.raises(ConfigurationError, match="'big'"):
        _optimizer(settings={"model": ["big"]})
    with pytest.raises(TypeError, match=r"models\['big'\]"):
        _optimizer(settings={"model": ["big"]}, models={"big": "gpt"})


def test_optimizer_searches_settings_and_meters_every_model() -> None:
    main = scripted_lm(demo_sensitive_answer)
    alt = scripted_lm(demo_sensitive_answer)
    storage = optuna.storages.InMemoryStorage()
    optimizer = _optimizer(
        lm=main,
        settings={"model": ["alt"], "n_demos": [0, 2], "temperature": [0.0]},
        models={"alt": alt},
        storage=storage,
        bootstrap_size=4,
        val_size=4,
        trials_per_stage=4,
    )
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    history = result.history
    assert all(
        set(params["locate"]) == {"instruction", "demos", "model", "n_demos", "temperature"}
        for params in (h["params"] for h in history)
    )
    assert any(h["params"]["locate"]["model"] == 1 or h["params"]["capital"]["model"] == 1 for h in history)
    assert alt.engine.calls > 0
    assert result.usage["lm_calls"] == main.engine.calls + alt.engine.calls
    assert result.best["score"] > result.baseline["score"]
    assert set(result.best["params"]["locate"]) >= {"model", "temperature", "n_demos"}
    for _, predictor in program.named_predictors():
        assert predictor.lm in (None, alt), "the returned program runs on the caller's LM, not a metered copy"
        assert not isinstance(predictor.lm, MeteredLM)
    stored = optuna.load_study(study_name="coordinate", storage=storage).user_attrs
    assert stored["space"]["locate"]["settings"] == {
        "temperature": [None, 0.0],
        "n_demos": [None, 0, 2],
        "model": [None, "alt"],
    }

"""Prompt layouts of the embedded models: chosen by name suffix, kept apart in DSPy's cache."""

from __future__ import annotations

import pytest

from stageopt import ConfigurationError
from stageopt.lm import EMBEDDED_MODELS, LAYOUTS, LlamaCppEngine, LocalLM, resolve_lm


def test_each_model_has_a_known_default_layout() -> None:
    assert {spec.layout for spec in EMBEDDED_MODELS.values()} <= set(LAYOUTS)
    assert EMBEDDED_MODELS["gemma3-270m"].layout == "completion"
    assert EMBEDDED_MODELS["qwen2.5-coder-0.5b"].layout == "chat"


@pytest.mark.parametrize(
    ("name", "model", "layout"),
    [
        ("qwen2.5-coder-0.5b", "local/qwen2.5-coder-0.5b", "chat"),
        ("qwen2.5-coder-0.5b@chat", "local/qwen2.5-coder-0.5b", "chat"),
        ("qwen2.5-coder-0.5b@completion", "local/qwen2.5-coder-0.5b@completion", "completion"),
        ("local/gemma3-270m@chat", "local/gemma3-270m@chat", "chat"),
        ("gemma3-270m", "local/gemma3-270m", "completion"),
    ],
)
def test_a_layout_other_than_the_default_is_part_of_the_model_string(name: str, model: str, layout: str) -> None:
    lm = resolve_lm(name)  # nothing is loaded until the first call
    assert isinstance(lm, LocalLM)
    assert lm.model == model
    assert lm.local_engine.layout == layout


def test_an_unknown_layout_names_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="`layout` must be one of completion, chat, got 'json'"):
        LocalLM("qwen2.5-coder-0.5b@json")


def test_the_layout_survives_dump_and_load() -> None:
    engine = LlamaCppEngine("qwen2.5-coder-0.5b", layout="completion")
    assert LlamaCppEngine.load_state(engine.dump_state()).layout == "completion"


def test_parallel_must_be_a_positive_count() -> None:
    with pytest.raises(ConfigurationError, match="`parallel` must be >= 1"):
        LlamaCppEngine("gemma3-270m", parallel=0)
    engine = LocalLM("gemma3-270m", parallel=3).local_engine
    assert engine.parallel == 3
    assert engine.batch_stats is None  # nothing ran batched yet


def test_resolve_lm_passes_parallel_to_embedded_models_only() -> None:
    local = resolve_lm("gemma3-270m", parallel=4)
    assert isinstance(local, LocalLM)
    assert local.local_engine.parallel == 4
    hosted = resolve_lm("openai/some-model", api_base="http://127.0.0.1:9/v1", parallel=4)
    assert "parallel" not in hosted.kwargs

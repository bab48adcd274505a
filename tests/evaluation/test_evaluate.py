from __future__ import annotations

import dspy
import pytest

from stageopt import EvaluationError
from stageopt.evaluation import Budget, BudgetLedger, evaluate, mean_ci95
from stageopt.lm import SmallLMAdapter
from tests.conftest import (
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)


def _with_demos() -> CapitalOfCity:
    program = CapitalOfCity()
    program.locate.demos = [dspy.Example(city="Osaka", country="Japan")]
    program.capital.demos = [dspy.Example(country="Japan", capital="Tokyo")]
    return program


def test_scores_stage_metrics_and_traces() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    examples = city_examples()[:6]
    report = evaluate(
        _with_demos(),
        examples,
        capital_metric,
        lm=lm,
        adapter=SmallLMAdapter(),
        stage_metrics={"locate": country_metric},
        capture_traces=True,
    )
    assert report.score == 1.0
    assert report.n == 6
    assert report.stage_metrics == {"locate": 1.0}
    assert set(report.stages) == {"locate", "capital"}
    assert report.stages["locate"].calls == 6
    assert report.parse_rate == 1.0
    assert report.usage.lm_calls == 12
    assert report.usage.backend_calls == 12
    first = report.examples[0]
    assert [c.stage for c in first.calls] == ["locate", "capital"]
    assert first.calls[0].prompt_tokens > 0
    assert first.trace[0]["stage"] == "locate"
    assert first.trace[0]["outputs"]["country"] == "France"


def test_unoptimized_program_scores_zero_on_demo_sensitive_lm() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    report = evaluate(CapitalOfCity(), city_examples()[:4], capital_metric, lm=lm, adapter=SmallLMAdapter())
    assert report.score == 0.0
    assert report.ci95 == (0.0, 0.0)


def test_cache_hits_count_as_logical_calls_not_backend_calls() -> None:
    lm = scripted_lm(demo_sensitive_answer, cache=True)
    examples = city_examples()[:3]
    evaluate(_with_demos(), examples, capital_metric, lm=lm, adapter=SmallLMAdapter())
    again = evaluate(_with_demos(), examples, capital_metric, lm=lm, adapter=SmallLMAdapter())
    assert again.usage.lm_calls == 6
    assert again.usage.backend_calls == 0
    assert again.usage.prompt_tokens > 0
    assert all(c.cached for r in again.examples for c in r.calls)


def test_metric_that_raises_becomes_failure_score_then_clear_error() -> None:
    lm = scripted_lm(demo_sensitive_answer)

    def broken(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        if example.city == "Lyon":
            raise KeyError("boom")
        return 1.0

    report = evaluate(_with_demos(), city_examples()[:4], broken, lm=lm, adapter=SmallLMAdapter(), max_errors=2)
    assert report.errors == 1
    assert report.score == 0.75
    assert "metric raised KeyError" in (report.examples[0].error or "")
    with pytest.raises(EvaluationError, match="max_errors=0"):
        evaluate(_with_demos(), city_examples()[:4], broken, lm=lm, adapter=SmallLMAdapter(), max_errors=0)


def test_lm_that_raises_is_a_counted_example_failure() -> None:
    def flaky(prompt: str) -> str:
        if "Munich" in prompt.split("---")[-1]:
            raise TimeoutError("LM timed out")
        return demo_sensitive_answer(prompt)

    report = evaluate(
        _with_demos(), city_examples()[:3], capital_metric, lm=scripted_lm(flaky), adapter=SmallLMAdapter()
    )
    assert report.errors == 1
    assert report.examples[1].score == 0.0
    assert "timed out" in (report.examples[1].error or "")
    assert report.examples[1].calls[0].error is not None


def test_budget_stops_evaluation() -> None:
    from stageopt import BudgetExhaustedError

    ledger = BudgetLedger(Budget(lm_calls=5))
    with pytest.raises(BudgetExhaustedError):
        evaluate(
            _with_demos(),
            city_examples(),
            capital_metric,
            lm=scripted_lm(demo_sensitive_answer),
            adapter=SmallLMAdapter(),
            ledger=ledger,
        )
    assert ledger.usage().lm_calls == 5


def test_threads_give_the_same_result_in_order() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    one = evaluate(_with_demos(), city_examples(), capital_metric, lm=lm, adapter=SmallLMAdapter())
    many = evaluate(_with_demos(), city_examples(), capital_metric, lm=lm, adapter=SmallLMAdapter(), num_threads=4)
    assert [r.prediction for r in one.examples] == [r.prediction for r in many.examples]
    assert many.usage.lm_calls == 24


def test_mean_ci95() -> None:
    mean, (lo, hi) = mean_ci95([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5
    assert 0.0 <= lo < 0.5 < hi <= 1.0

"""Error origins: the first failing measured stage, the last-resort rules and thresholds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from stageopt import ConfigurationError
from stageopt.diagnostics import ErrorOrigins, error_origins
from stageopt.evaluation import EvaluationReport, ExampleResult, StageCall, StageSummary, Usage

STAGES = ["a", "b", "c", "d"]  # a and c have stage metrics, b and d do not


def _result(
    index: int, score: float, metrics: dict[str, float], *, error: str | None = None, calls: Sequence[str] = ()
) -> ExampleResult:
    return ExampleResult(
        index=index,
        example_id=f"e{index}",
        score=score,
        prediction={},
        stage_metrics=metrics,
        extra={},
        calls=[StageCall(stage=s) for s in calls],
        error=error,
    )


def _report(results: list[ExampleResult]) -> EvaluationReport:
    stages = {name: StageSummary(name, metric=0.5 if name in {"a", "c"} else None) for name in STAGES}
    return EvaluationReport(
        score=0.0, ci95=(0.0, 0.0), n=len(results), errors=0, stages=stages, extra={}, usage=Usage(), examples=results
    )


RESULTS = [
    _result(0, 1.0, {"a": 0.0, "c": 0.0}),  # perfect score: not failed whatever its stages did
    _result(1, 0.5, {"a": 0.5, "c": 1.0}),  # a below 1.0
    _result(2, 0.0, {"a": 1.0, "c": 0.0}),  # a passes, c fails
    _result(3, 0.0, {"a": 1.0, "c": 1.0}),  # every measured stage passed: the last stage
    _result(4, 0.0, {}, error="program raised X", calls=["a", "b"]),  # raised while b ran
    _result(5, 0.0, {}, error="program raised Y"),  # raised before any call: the last stage
]


def test_counts_first_failing_stage_and_last_resorts() -> None:
    origins = error_origins(_report(RESULTS))
    assert origins.n == 6
    assert origins.failed == 5
    assert origins.counts == {"a": 1, "b": 1, "c": 1, "d": 2}
    assert list(origins.counts) == STAGES
    assert origins.thresholds == {"a": 1.0, "c": 1.0}
    assert origins.share("d") == pytest.approx(0.4)


def test_threshold_overrides_and_fail_below() -> None:
    origins = error_origins(_report(RESULTS), thresholds={"a": 0.5})
    assert origins.thresholds == {"a": 0.5, "c": 1.0}
    assert origins.counts == {"a": 0, "b": 1, "c": 1, "d": 3}  # example 1 now passes a and c
    lenient = error_origins(_report(RESULTS), fail_below=0.4)
    assert lenient.failed == 4  # example 1 (0.5) is no longer failed
    assert lenient.counts["a"] == 0
    assert sum(lenient.counts.values()) == lenient.failed


def test_a_metric_equal_to_its_threshold_passes_despite_rounding() -> None:
    origins = error_origins(_report([_result(0, 0.0, {"a": 0.1 + 0.2, "c": 1.0})]), thresholds={"a": 0.3})
    assert origins.counts["a"] == 0


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ({"b": 0.5}, "thresholds given for b, which have no stage metric; stages with one: a, c"),
        ({"a": 1.5}, "the threshold of stage 'a' must be in \\[0, 1\\]"),
    ],
)
def test_bad_thresholds_are_refused(thresholds: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        error_origins(_report(RESULTS), thresholds=thresholds)


def test_round_trip() -> None:
    origins = error_origins(_report(RESULTS))
    assert ErrorOrigins.from_dict(origins.to_dict()) == origins

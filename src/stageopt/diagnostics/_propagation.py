"""Error propagation: the stage each failed example's error originates at.

A failed example is one whose end-to-end score is below ``fail_below``. Its origin is the first
stage, in program order, whose task-defined stage metric is below that stage's pass threshold.
Stages without a stage metric cannot be blamed directly; they get failures only as the last
resort:

* an example whose program raised (so it has no stage metrics) originates at the stage of its
  last LM call, the stage that was running when it failed;
* any other failed example where no measured stage failed originates at the **last** stage of
  the program (the measured stages did their part, so the error arose after them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.evaluation import EvaluationReport, ExampleResult

#: An example is failed when its score is below this: anything short of perfect.
DEFAULT_FAIL_BELOW = 1.0 - 1e-9
#: A stage passes when its stage metric reaches this (per-stage overrides allowed).
DEFAULT_THRESHOLD = 1.0
# Stage metrics are ratios such as 1/2; a rounding error must not turn a pass into a failure.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class ErrorOrigins:
    """Failed examples counted by the stage their error originates at.

    Attributes:
        fail_below: Examples scoring below this are failed.
        failed: Number of failed examples.
        n: Number of examples.
        counts: Failed examples per origin stage, every stage of the program in program order
            (they sum to ``failed``).
        thresholds: Pass threshold of each stage that has a stage metric.
    """

    fail_below: float
    failed: int
    n: int
    counts: dict[str, int]
    thresholds: dict[str, float]

    def share(self, stage: str) -> float:
        """Share of the failed examples originating at ``stage`` (0.0 when none failed)."""
        return self.counts.get(stage, 0) / self.failed if self.failed else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {
            "fail_below": self.fail_below,
            "failed": self.failed,
            "n": self.n,
            "counts": dict(self.counts),
            "thresholds": dict(self.thresholds),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErrorOrigins:
        """Inverse of :meth:`to_dict`."""
        return cls(
            fail_below=float(data["fail_below"]),
            failed=int(data["failed"]),
            n=int(data["n"]),
            counts={str(k): int(v) for k, v in data["counts"].items()},
            thresholds={str(k): float(v) for k, v in data["thresholds"].items()},
        )


def stage_thresholds(
    measured: Sequence[str], overrides: Mapping[str, float] | None = None, *, default: float = DEFAULT_THRESHOLD
) -> dict[str, float]:
    """Pass thresholds of the ``measured`` stages: ``default``, or the override given for a stage.

    Raises:
        ConfigurationError: for an override naming a stage without a stage metric, or a value
            outside [0, 1].
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(measured))
    if unknown:
        known = ", ".join(measured) or "none"
        raise ConfigurationError(
            f"thresholds given for {', '.join(unknown)}, which have no stage metric; stages with one: {known}"
        )
    for name, value in overrides.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigurationError(f"the threshold of stage {name!r} must be in [0, 1], got {value!r}")
    return {name: float(overrides.get(name, default)) for name in measured}


def origin_stage(result: ExampleResult, stages: Sequence[str], thresholds: Mapping[str, float]) -> str:
    """The stage one failed example's error originates at (see the module docstring)."""
    for name in stages:
        value = result.stage_metrics.get(name)
        if name in thresholds and value is not None and value < thresholds[name] - _TOLERANCE:
            return name
    if result.error is not None and not result.stage_metrics:
        last = next((c.stage for c in reversed(result.calls) if c.stage in stages), None)
        if last is not None:
            return last
    return stages[-1]


def error_origins(
    report: EvaluationReport,
    *,
    thresholds: Mapping[str, float] | None = None,
    fail_below: float = DEFAULT_FAIL_BELOW,
) -> ErrorOrigins:
    """Count the failed examples of ``report`` by origin stage.

    Args:
        report: An evaluation run with the task's stage metrics.
        thresholds: Per-stage pass thresholds overriding :data:`DEFAULT_THRESHOLD`.
        fail_below: Examples scoring below this are failed.

    Raises:
        ConfigurationError: for a program without stages or a bad threshold (see :func:`stage_thresholds`).
    """
    stages = list(report.stages)
    if not stages:
        raise ConfigurationError("the program has no stages (named_predictors() is empty); nothing to diagnose")
    measured = [name for name, summary in report.stages.items() if summary.metric is not None]
    limits = stage_thresholds(measured, thresholds)
    counts = dict.fromkeys(stages, 0)
    failed = [r for r in report.examples if r.score < fail_below]
    for result in failed:
        counts[origin_stage(result, stages, limits)] += 1
    return ErrorOrigins(
        fail_below=fail_below, failed=len(failed), n=len(report.examples), counts=counts, thresholds=limits
    )

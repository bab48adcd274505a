"""Stage-wise metrics of one evaluation: the task's stage metric plus generic parse, size, cost and latency figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stageopt.evaluation import EvaluationReport, StageSummary


@dataclass(frozen=True)
class StageDiagnostics:
    """What one stage did over an evaluation.

    Attributes:
        metric: Mean of the task-defined stage metric (None when the task has none for this stage).
        calls: LM calls the stage made.
        parse_failure_rate: Share of those calls whose output did not parse (0.0 without calls).
        mean_output_chars: Mean characters of a completion.
        mean_prompt_tokens: Mean prompt tokens of a call.
        mean_completion_tokens: Mean completion tokens of a call.
        mean_latency_s: Mean seconds of a call (cache hits are near zero).
        p95_latency_s: 95th percentile of a call's seconds.
    """

    metric: float | None
    calls: int
    parse_failure_rate: float
    mean_output_chars: float
    mean_prompt_tokens: float
    mean_completion_tokens: float
    mean_latency_s: float
    p95_latency_s: float

    @classmethod
    def from_summary(cls, summary: StageSummary) -> StageDiagnostics:
        """The figures of one stage of an :class:`~stageopt.evaluation.EvaluationReport`."""
        return cls(
            metric=summary.metric,
            calls=summary.calls,
            parse_failure_rate=summary.parse_failures / summary.calls if summary.calls else 0.0,
            mean_output_chars=summary.mean_output_chars,
            mean_prompt_tokens=summary.mean_prompt_tokens,
            mean_completion_tokens=summary.mean_completion_tokens,
            mean_latency_s=summary.mean_latency_s,
            p95_latency_s=summary.p95_latency_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageDiagnostics:
        """Inverse of :meth:`to_dict`."""
        metric = data.get("metric")
        return cls(
            metric=None if metric is None else float(metric),
            calls=int(data["calls"]),
            parse_failure_rate=float(data["parse_failure_rate"]),
            mean_output_chars=float(data.get("mean_output_chars", 0.0)),
            mean_prompt_tokens=float(data["mean_prompt_tokens"]),
            mean_completion_tokens=float(data["mean_completion_tokens"]),
            mean_latency_s=float(data["mean_latency_s"]),
            p95_latency_s=float(data["p95_latency_s"]),
        )


def stage_diagnostics(report: EvaluationReport) -> dict[str, StageDiagnostics]:
    """Per-stage figures of ``report``, in program order."""
    return {name: StageDiagnostics.from_summary(summary) for name, summary in report.stages.items()}

"""Running programs on data: scores, stage traces, cost and budgets."""

from stageopt.evaluation._budget import Budget, BudgetLedger, Usage
from stageopt.evaluation._evaluate import (
    EvaluationReport,
    ExampleResult,
    StageSummary,
    evaluate,
    mean_ci95,
    stage_names,
)
from stageopt.evaluation._meter import ExampleRecorder, MeteredLM, StageCall, active_recorder

__all__ = [
    "Budget",
    "BudgetLedger",
    "EvaluationReport",
    "ExampleRecorder",
    "ExampleResult",
    "MeteredLM",
    "StageCall",
    "StageSummary",
    "Usage",
    "active_recorder",
    "evaluate",
    "mean_ci95",
    "stage_names",
]

"""Running programs on data: scores, stage traces, cost and budgets."""

from stageopt.evaluation._budget import Budget, BudgetLedger, Usage
from stageopt.evaluation._cost import ModelPrice, PriceTable, call_cost, parse_price
from stageopt.evaluation._evaluate import (
    EvaluationReport,
    ExampleResult,
    StageSummary,
    evaluate,
    mean_ci95,
    stage_names,
)
from stageopt.evaluation._meter import ExampleRecorder, MeteredLM, StageCall, active_recorder
from stageopt.evaluation._stats import PairedGain, paired_gain

__all__ = [
    "Budget",
    "BudgetLedger",
    "EvaluationReport",
    "ExampleRecorder",
    "ExampleResult",
    "MeteredLM",
    "ModelPrice",
    "PairedGain",
    "PriceTable",
    "StageCall",
    "StageSummary",
    "Usage",
    "active_recorder",
    "call_cost",
    "evaluate",
    "mean_ci95",
    "paired_gain",
    "parse_price",
    "stage_names",
]

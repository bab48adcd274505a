"""Comparing optimizers on one task: stageopt's strategies and DSPy's own, same budget and data.

``stageopt compare`` runs every method on every seed (a *cell*) with the same program, task LM,
train split and budget of logical LM calls, scores the returned programs on data selection
never saw, and writes ``results.json`` (after every cell), ``table.md`` and ``convergence.png``.
"""

from stageopt.compare._dspy import (
    DSPY_METHODS,
    BudgetedMIPROv2,
    DSPyOutcome,
    DSPyRun,
    ValidationObserver,
    bfsrs_num_candidates,
    budgeted_bfsrs,
    budgeted_mipro,
    copro_breadth_depth,
    gepa_max_metric_calls,
    mipro_num_candidates,
    run_dspy,
)
from stageopt.compare._harness import (
    BASELINE_ROWS,
    RESULTS_SCHEMA_VERSION,
    CompareConfig,
    Comparison,
    cell_key,
)
from stageopt.compare._methods import (
    MethodContext,
    MethodOutcome,
    MethodRunner,
    methods,
    resolve_methods,
    resolve_names,
    selection_split,
)

__all__ = [
    "BASELINE_ROWS",
    "DSPY_METHODS",
    "RESULTS_SCHEMA_VERSION",
    "BudgetedMIPROv2",
    "CompareConfig",
    "Comparison",
    "DSPyOutcome",
    "DSPyRun",
    "MethodContext",
    "MethodOutcome",
    "MethodRunner",
    "ValidationObserver",
    "bfsrs_num_candidates",
    "budgeted_bfsrs",
    "budgeted_mipro",
    "cell_key",
    "copro_breadth_depth",
    "gepa_max_metric_calls",
    "methods",
    "mipro_num_candidates",
    "resolve_methods",
    "resolve_names",
    "run_dspy",
    "selection_split",
]

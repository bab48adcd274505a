"""Stage diagnostics: where a multi-stage program's errors come from and what each stage contributes."""

from stageopt.diagnostics._attribution import (
    Attribution,
    HybridScore,
    StageAttribution,
    attribute,
    hybrid_program,
    mean_ci95_signed,
    shapley_exact,
    shapley_permutations,
)
from stageopt.diagnostics._convergence import (
    ConvergenceReport,
    CurvePoint,
    Plateau,
    RegretFit,
    analyze_convergence,
    best_so_far,
    find_plateau,
    fit_regret_decay,
    stopping_decision,
)
from stageopt.diagnostics._diagnosis import Diagnosis, DiagnosisConfig, diagnose
from stageopt.diagnostics._oracle import OracleResult
from stageopt.diagnostics._propagation import DEFAULT_FAIL_BELOW, DEFAULT_THRESHOLD, ErrorOrigins, error_origins
from stageopt.diagnostics._stages import StageDiagnostics, stage_diagnostics

__all__ = [
    "DEFAULT_FAIL_BELOW",
    "DEFAULT_THRESHOLD",
    "Attribution",
    "ConvergenceReport",
    "CurvePoint",
    "Diagnosis",
    "DiagnosisConfig",
    "ErrorOrigins",
    "HybridScore",
    "OracleResult",
    "Plateau",
    "RegretFit",
    "StageAttribution",
    "StageDiagnostics",
    "analyze_convergence",
    "attribute",
    "best_so_far",
    "diagnose",
    "error_origins",
    "find_plateau",
    "fit_regret_decay",
    "hybrid_program",
    "mean_ci95_signed",
    "shapley_exact",
    "shapley_permutations",
    "stage_diagnostics",
    "stopping_decision",
]

"""``diagnose()``: stage metrics, error origins, stage attribution and oracle bounds of one program.

Every score comes from :func:`stageopt.evaluation.evaluate` on the same examples, LM, adapter and
budget ledger, so the error policy and the metering are those of any evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.diagnostics._attribution import Attribution, Coalition, attribute, coalition_label, hybrid_program
from stageopt.diagnostics._attribution import shared_stages as _shared_stages
from stageopt.diagnostics._oracle import OracleResult, with_gold_inputs
from stageopt.diagnostics._propagation import DEFAULT_FAIL_BELOW, ErrorOrigins, error_origins
from stageopt.diagnostics._stages import StageDiagnostics, stage_diagnostics
from stageopt.evaluation import Budget, BudgetLedger, EvaluationReport, evaluate
from stageopt.tasks import BaseTask, OracleProgram, StageMetric

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

#: ``run(program, examples, desc, with_stages=...)``: one metered evaluation on the shared ledger.
_Runner = Callable[..., EvaluationReport]


@dataclass(frozen=True)
class DiagnosisConfig:
    """Settings of :func:`diagnose`.

    Args:
        thresholds: Pass threshold per stage overriding 1.0 (a stage fails an example when its
            stage metric is below its threshold).
        fail_below: Examples scoring below this are failed (default: anything short of perfect).
        exact_max_stages: Attribution scores all ``2**K`` hybrids up to this many stages and
            samples stage orders beyond.
        n_permutations: Sampled attribution: stage orders averaged over.
        max_hybrids: Sampled attribution: most hybrids evaluated besides the two programs.
        seed: Seed of the sampled stage orders.
        num_threads: Examples evaluated in parallel (1 for the embedded model, which is serialised).
        max_errors: Failing examples tolerated per evaluation (default: evaluate()'s).
        progress: Show a progress bar per evaluation.
    """

    thresholds: Mapping[str, float] = field(default_factory=dict)
    fail_below: float = DEFAULT_FAIL_BELOW
    exact_max_stages: int = 4
    n_permutations: int = 10
    max_hybrids: int = 24
    seed: int = 0
    num_threads: int = 1
    max_errors: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", dict(self.thresholds))
        if not (isinstance(self.fail_below, int | float) and math.isfinite(self.fail_below)):
            raise ConfigurationError(f"`fail_below` must be a finite number, got {self.fail_below!r}")
        for name in ("exact_max_stages", "n_permutations", "max_hybrids", "num_threads"):
            value = getattr(self, name)
            minimum = 0 if name == "exact_max_stages" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigurationError(f"`{name}` must be an integer >= {minimum}, got {name}={value!r}")


@dataclass(frozen=True)
class Diagnosis:
    """Where a program's errors come from, stage by stage. Serialise with :meth:`to_dict` / :meth:`save`.

    Attributes:
        task: Task name, or None for a program diagnosed with a bare metric.
        metric: What the score measures (the task's ``metric_name``).
        n: Examples scored.
        score: The program's mean end-to-end score on them.
        ci95: Its 95 % interval.
        stages: Per-stage figures, in program order.
        error_origins: Failed examples by the stage their error originates at.
        attribution: Shapley attribution against a baseline (None without a baseline).
        oracle: Oracle bounds per downstream stage (None when the task has no gold intermediates).
        usage: LM calls, tokens and seconds the diagnosis spent.
        schema_version: Version of the :meth:`to_dict` layout.
    """

    task: str | None
    metric: str
    n: int
    score: float
    ci95: tuple[float, float]
    stages: dict[str, StageDiagnostics]
    error_origins: ErrorOrigins
    attribution: Attribution | None
    oracle: dict[str, OracleResult] | None
    usage: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready diagnosis (the layout ``stageopt report`` reads)."""
        return {
            "schema_version": self.schema_version,
            "task": self.task,
            "metric": self.metric,
            "n": self.n,
            "score": self.score,
            "ci95": list(self.ci95),
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
            "error_origins": self.error_origins.to_dict(),
            "attribution": None if self.attribution is None else self.attribution.to_dict(),
            "oracle": None if self.oracle is None else {name: o.to_dict() for name, o in self.oracle.items()},
            "usage": dict(self.usage),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigurationError: for a schema version this stageopt does not read.
        """
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigurationError(
                f"diagnosis schema_version {version!r} is not supported (expected {SCHEMA_VERSION}); "
                "rerun `stageopt diagnose` with this version of stageopt"
            )
        lo, hi = data["ci95"]
        oracle = data.get("oracle")
        attribution = data.get("attribution")
        return cls(
            task=data.get("task"),
            metric=str(data["metric"]),
            n=int(data["n"]),
            score=float(data["score"]),
            ci95=(float(lo), float(hi)),
            stages={str(k): StageDiagnostics.from_dict(v) for k, v in data["stages"].items()},
            error_origins=ErrorOrigins.from_dict(data["error_origins"]),
            attribution=None if attribution is None else Attribution.from_dict(attribution),
            oracle=None if oracle is None else {str(k): OracleResult.from_dict(v) for k, v in oracle.items()},
            usage=dict(data.get("usage") or {}),
            schema_version=int(version),
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically (a reader never sees half a file); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Diagnosis:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def diagnose(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    *,
    task: BaseTask | None = None,
    metric: Callable[..., float] | None = None,
    stage_metrics: Mapping[str, StageMetric] | None = None,
    baseline: dspy.Module | None = None,
    oracles: Mapping[str, OracleProgram] | None = None,
    lm: dspy.BaseLM | None = None,
    adapter: dspy.Adapter | None = None,
    budget: Budget | None = None,
    ledger: BudgetLedger | None = None,
    config: DiagnosisConfig | None = None,
) -> Diagnosis:
    """Diagnose ``program`` on ``examples``: stage metrics, error origins, attribution and oracle bounds.

    Cost: one evaluation of the program, and with a baseline one of the baseline plus one per
    hybrid (``2**K - 2`` for K <= ``exact_max_stages`` stages, else at most ``max_hybrids``),
    plus one per oracle. Hybrids repeat many prompts of the two programs, so with a cached LM
    most of their calls are cache hits; they still count as logical calls.

    Args:
        program: The program to diagnose; it is not modified.
        examples: Examples with inputs set (and the gold fields the oracles read).
        task: Supplies ``metric``, ``stage_metrics``, the metric's name and the oracles unless they are given.
        metric: ``metric(example, prediction, trace=None) -> float`` (default: the task's).
        stage_metrics: Per-stage metrics by stage name (default: the task's).
        baseline: A program with the same stages to attribute the score difference against.
        oracles: Oracle variants by stage (default: ``task.oracle_programs(program)``; none without a task).
        lm: Task LM (default: DSPy's configured one).
        adapter: Adapter (default: DSPy's configured one).
        budget: Limits for a fresh ledger (ignored when ``ledger`` is given).
        ledger: Budget ledger to charge, shared with the caller.
        config: Thresholds, attribution sampling, threads and progress.

    Raises:
        ConfigurationError: for no metric, no examples, programs with different stages or bad settings.
        BudgetExhaustedError: when the budget runs out (nothing is returned).
        EvaluationError: when an evaluation has too many failing examples.
    """
    config = config or DiagnosisConfig()
    if metric is not None:
        score_fn = metric
    elif task is not None:
        score_fn = task.metric
    else:
        raise ConfigurationError("diagnose() needs a metric: pass task= or metric=")
    if not examples:
        raise ConfigurationError("diagnose() needs at least one example")
    if stage_metrics is None:
        stage_metrics = task.stage_metrics() if task is not None else {}
    if oracles is None:
        oracles = task.oracle_programs(program) if task is not None else {}
    stage_order = [name for name, _ in program.named_predictors()]
    if not stage_order:
        raise ConfigurationError("the program has no stages (named_predictors() is empty); nothing to diagnose")
    if baseline is not None:
        _shared_stages(baseline, program)  # refuse before spending anything
    ledger = ledger or BudgetLedger(budget)
    start = ledger.usage()

    def run(module: dspy.Module, data: Sequence[dspy.Example], desc: str, *, with_stages: bool) -> EvaluationReport:
        report = evaluate(
            module,
            data,
            score_fn,
            lm=lm,
            adapter=adapter,
            stage_metrics=stage_metrics if with_stages else None,
            ledger=ledger,
            num_threads=config.num_threads,
            max_errors=config.max_errors,
            progress=config.progress,
            desc=desc,
        )
        logger.info("%s: score %.3f on %d examples", desc, report.score, report.n)
        return report

    report = run(program, examples, "program", with_stages=True)
    origins = error_origins(report, thresholds=config.thresholds, fail_below=config.fail_below)

    attribution: Attribution | None = None
    if baseline is not None:
        attribution = _attribute(program, baseline, examples, report, run, stage_order, config)

    oracle: dict[str, OracleResult] | None = None
    if oracles:
        oracle = {}
        for stage, variant in oracles.items():
            gold = with_gold_inputs(examples, variant.gold_inputs, stage=stage)
            scored = run(variant.program, gold, f"oracle {stage}", with_stages=False)
            oracle[stage] = OracleResult(
                description=variant.description, score=scored.score, ci95=scored.ci95, program_score=report.score
            )

    spent = ledger.usage()
    usage = {
        "lm_calls": spent.lm_calls - start.lm_calls,
        "backend_calls": spent.backend_calls - start.backend_calls,
        "prompt_tokens": spent.prompt_tokens - start.prompt_tokens,
        "completion_tokens": spent.completion_tokens - start.completion_tokens,
        "tokens": spent.tokens - start.tokens,
        "wall_s": round(spent.wall_s - start.wall_s, 3),
    }
    return Diagnosis(
        task=task.name if task is not None else None,
        metric=task.metric_name if task is not None else getattr(score_fn, "__name__", "score"),
        n=report.n,
        score=report.score,
        ci95=report.ci95,
        stages=stage_diagnostics(report),
        error_origins=origins,
        attribution=attribution,
        oracle=oracle,
        usage=usage,
    )


def _attribute(
    program: dspy.Module,
    baseline: dspy.Module,
    examples: Sequence[dspy.Example],
    report: EvaluationReport,
    run: _Runner,
    stage_order: list[str],
    config: DiagnosisConfig,
) -> Attribution:
    """Score the baseline and the hybrids; the program's own report stands for the all-stages coalition."""
    stages = list(stage_order)
    everything = frozenset(stages)
    counter = iter(range(1, 1 << len(stages)))

    def score(coalition: Coalition) -> list[float]:
        if coalition == everything:
            scored = report
        elif not coalition:
            scored = run(baseline, examples, "baseline", with_stages=False)
        else:
            label = coalition_label(coalition, stages)
            hybrid = hybrid_program(baseline, program, from_program=coalition)
            scored = run(hybrid, examples, f"hybrid {next(counter)}: {label}", with_stages=False)
        return [r.score for r in scored.examples]

    return attribute(
        stages,
        score,
        exact_max_stages=config.exact_max_stages,
        n_permutations=config.n_permutations,
        max_hybrids=config.max_hybrids,
        seed=config.seed,
    )

"""Run a program on a dataset: score, per-stage traces, cost, and a confidence interval."""

from __future__ import annotations

import contextvars
import copy
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
from scipy import stats

from stageopt._errors import (
    BudgetExhaustedError,
    ConfigurationError,
    EvaluationError,
    ModelNotAvailableError,
    StorageUnavailableError,
    find_cause,
)
from stageopt.evaluation._budget import BudgetLedger, Usage
from stageopt.evaluation._meter import ExampleRecorder, MeteredLM, StageCall, reset_recorder, set_recorder
from stageopt.lm._adapter import reset_parse_listener, set_parse_listener

logger = logging.getLogger(__name__)

Metric = Callable[..., float]
ExampleMetric = Callable[[dspy.Example, dspy.Prediction], float]


@dataclass
class ExampleResult:
    """One example's outcome: prediction, score, stage metrics and the trace of LM calls."""

    index: int
    example_id: str | None
    score: float
    prediction: dict[str, Any]
    stage_metrics: dict[str, float]
    extra: dict[str, float]
    calls: list[StageCall]
    error: str | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result."""
        data = asdict(self)
        data["calls"] = [c.to_dict() for c in self.calls]
        return data


@dataclass
class StageSummary:
    """Aggregates for one stage over an evaluation."""

    name: str
    calls: int = 0
    parse_failures: int = 0
    mean_prompt_tokens: float = 0.0
    mean_completion_tokens: float = 0.0
    mean_latency_s: float = 0.0
    p95_latency_s: float = 0.0
    metric: float | None = None
    mean_output_chars: float = 0.0

    @property
    def parse_rate(self) -> float:
        """Share of this stage's calls whose output parsed (1.0 when there were none)."""
        return 1.0 - self.parse_failures / self.calls if self.calls else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (parse rate included)."""
        return {**asdict(self), "parse_rate": self.parse_rate}


@dataclass
class EvaluationReport:
    """What :func:`evaluate` returns."""

    score: float
    ci95: tuple[float, float]
    n: int
    errors: int
    stages: dict[str, StageSummary]
    extra: dict[str, float]
    usage: Usage
    examples: list[ExampleResult] = field(repr=False)

    @property
    def stage_metrics(self) -> dict[str, float]:
        """Task-defined stage metric means, by stage (stages without one are left out)."""
        return {name: s.metric for name, s in self.stages.items() if s.metric is not None}

    @property
    def parse_rate(self) -> float:
        """Share of all stage outputs that parsed."""
        calls = sum(s.calls for s in self.stages.values())
        failures = sum(s.parse_failures for s in self.stages.values())
        return 1.0 - failures / calls if calls else 1.0

    def to_dict(self, *, with_examples: bool = True) -> dict[str, Any]:
        """JSON-ready report."""
        data: dict[str, Any] = {
            "score": self.score,
            "ci95": list(self.ci95),
            "n": self.n,
            "errors": self.errors,
            "parse_rate": self.parse_rate,
            "stage_metrics": self.stage_metrics,
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "extra": self.extra,
            "usage": self.usage.to_dict(),
        }
        if with_examples:
            data["examples"] = [e.to_dict() for e in self.examples]
        return data


def mean_ci95(values: Sequence[float], *, clip: bool = True) -> tuple[float, tuple[float, float]]:
    """Mean and Student-t 95 % interval of the mean (``scipy.stats.t``; degenerate for n < 2 or no spread).

    With ``clip`` the interval is kept within [0, 1] (scores); without, it is left as computed
    (differences of scores may be negative).
    """
    if not values:
        return 0.0, (0.0, 0.0)
    mean = statistics.fmean(values)
    sem = float(stats.sem(values)) if len(values) >= 2 else 0.0
    if not sem or math.isnan(sem):
        return mean, (mean, mean)
    low, high = (float(x) for x in stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem))
    if clip:
        return mean, (max(0.0, low), min(1.0, high))
    return mean, (low, high)


def stage_names(program: dspy.Module) -> dict[int, str]:
    """``id(predictor) -> name`` for the stages of ``program``."""
    return {id(p): name for name, p in program.named_predictors()}


def _systemic(exc: BaseException) -> BaseException | None:
    """A stageopt error anywhere in the cause chain that must stop the run (not one example)."""
    return find_cause(exc, BudgetExhaustedError, ModelNotAvailableError, StorageUnavailableError)


def _root_message(exc: BaseException) -> str:
    seen: BaseException = exc
    while isinstance(seen.__cause__, BaseException):
        seen = seen.__cause__
    return f"{type(seen).__name__}: {seen}"


def _jsonable(prediction: dspy.Prediction | None) -> dict[str, Any]:
    if prediction is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in prediction.items():
        out[key] = value if isinstance(value, str | int | float | bool | list | type(None)) else str(value)
    return out


def evaluate(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    metric: Metric,
    *,
    lm: dspy.BaseLM | None = None,
    adapter: dspy.Adapter | None = None,
    stage_metrics: Mapping[str, ExampleMetric] | None = None,
    extra_metrics: Mapping[str, ExampleMetric] | None = None,
    ledger: BudgetLedger | None = None,
    num_threads: int = 1,
    max_errors: int | None = None,
    failure_score: float = 0.0,
    progress: bool = False,
    desc: str = "eval",
    capture_traces: bool = False,
) -> EvaluationReport:
    """Run ``program`` on ``examples`` and score it, stage by stage.

    Args:
        program: The DSPy program; it is not modified.
        examples: Examples with inputs set.
        metric: ``metric(example, prediction, trace=None) -> float``.
        lm: Task LM (default: the LM configured in DSPy's context).
        adapter: Adapter to use (default: the one in DSPy's context).
        stage_metrics: Task-defined stage metrics by stage name.
        extra_metrics: Further end-to-end metrics to average (e.g. EM).
        ledger: Budget ledger to charge; a fresh unlimited one when None.
        num_threads: Examples run in parallel (1 for the embedded model, which is serialised).
        max_errors: Failing examples tolerated (default: max(5, 25 % of the examples)); one more
            raises :class:`~stageopt.EvaluationError`.
        failure_score: The score of an example whose program or metric raised.
        progress: Show a progress bar.
        desc: The progress bar's label.
        capture_traces: Keep each stage's inputs and outputs in :attr:`ExampleResult.trace`
            (what demo proposers bootstrap from).

    Raises:
        BudgetExhaustedError: when the ledger's budget runs out mid-evaluation.
        EvaluationError: when more than ``max_errors`` examples fail.
    """
    if num_threads < 1:
        raise ConfigurationError(f"`num_threads` must be >= 1, got {num_threads=}")
    ledger = ledger or BudgetLedger()
    before = ledger.usage()
    limit = max_errors if max_errors is not None else max(5, len(examples) // 4)
    base_lm = lm or dspy.settings.lm
    if base_lm is None:
        raise EvaluationError("no LM: pass lm= or configure one with dspy.context(lm=...)")
    metered = base_lm if isinstance(base_lm, MeteredLM) else MeteredLM(base_lm, ledger)
    program, names = _metered_program(program, ledger)
    stage_metrics = dict(stage_metrics or {})
    extra_metrics = dict(extra_metrics or {})
    results: list[ExampleResult | None] = [None] * len(examples)
    errors: list[str] = []

    def run_one(index: int) -> ExampleResult:
        example = examples[index]
        recorder = ExampleRecorder(names)
        token = set_recorder(recorder)
        parse_token = set_parse_listener(lambda _sig, ok: recorder.mark_parse(ok))
        prediction: dspy.Prediction | None = None
        error: str | None = None
        dspy_trace: list[Any] = []
        try:
            with dspy.context(trace=dspy_trace if capture_traces else None):
                prediction = program(**example.inputs())
        except Exception as exc:
            if (systemic := _systemic(exc)) is not None:
                raise systemic from exc
            if type(exc).__name__ == "AdapterParseError" and recorder.calls:
                recorder.calls[-1].parse_ok = False
            error = f"program raised {_root_message(exc)}"
        finally:
            reset_parse_listener(parse_token)
            reset_recorder(token)
        score = failure_score
        stages: dict[str, float] = {}
        extra: dict[str, float] = {}
        if prediction is not None:
            try:
                score = float(metric(example, prediction))
                stages = {k: float(fn(example, prediction)) for k, fn in stage_metrics.items()}
                extra = {k: float(fn(example, prediction)) for k, fn in extra_metrics.items()}
            except Exception as exc:
                error = f"metric raised {type(exc).__name__}: {exc}"
                score = failure_score
        return ExampleResult(
            index=index,
            example_id=example.get("id"),
            score=score,
            prediction=_jsonable(prediction),
            stage_metrics=stages,
            extra=extra,
            calls=recorder.calls,
            error=error,
            trace=[
                {"stage": names.get(id(p)), "inputs": dict(inputs), "outputs": dict(out.items())}
                for p, inputs, out in dspy_trace
                if id(p) in names
            ],
        )

    bar = _progress(len(examples), desc) if progress else None
    with dspy.context(lm=metered, **({"adapter": adapter} if adapter is not None else {})):
        context = contextvars.copy_context()

        def record(result: ExampleResult) -> None:
            results[result.index] = result
            if result.error:
                errors.append(result.error)
                logger.warning("example %s failed: %s", result.example_id or result.index, result.error)
                if len(errors) > limit:
                    raise EvaluationError(
                        f"{len(errors)} of {len(examples)} examples failed (max_errors={limit}); "
                        f"first error: {errors[0]}. Check the LM and the metric, or raise max_errors"
                    )
            if bar is not None:
                bar.update(1)

        try:
            if num_threads == 1:
                for i in range(len(examples)):
                    record(context.copy().run(run_one, i))
            else:
                with ThreadPoolExecutor(max_workers=num_threads) as pool:
                    futures = [pool.submit(context.copy().run, run_one, i) for i in range(len(examples))]
                    for future in futures:
                        record(future.result())
        finally:
            if bar is not None:
                bar.close()
    done = [r for r in results if r is not None]
    return _summarise(done, stage_metrics, extra_metrics, names, ledger, before)


def _metered_program(program: dspy.Module, ledger: BudgetLedger) -> tuple[dspy.Module, dict[int, str]]:
    """Meter predictors that carry their own LM (on a copy, never the caller's program).

    The copy shares the caller's LMs rather than copying them: an embedded model must not be
    copied (llama.cpp would load it again), and calls must reach the LM the caller holds.
    """
    own = {id(p.lm): p.lm for _, p in program.named_predictors() if p.lm is not None}
    if any(not isinstance(lm, MeteredLM) for lm in own.values()):
        try:
            program = copy.deepcopy(program, dict(own))  # memo: each LM "copies" to itself
        except Exception:
            program = program.deepcopy()
        for _, predictor in program.named_predictors():
            if predictor.lm is not None and not isinstance(predictor.lm, MeteredLM):
                predictor.lm = MeteredLM(predictor.lm, ledger)
    return program, stage_names(program)


def _summarise(
    results: list[ExampleResult],
    stage_metrics: Mapping[str, ExampleMetric],
    extra_metrics: Mapping[str, ExampleMetric],
    names: dict[int, str],
    ledger: BudgetLedger,
    before: Usage,
) -> EvaluationReport:
    score, ci = mean_ci95([r.score for r in results])
    stages: dict[str, StageSummary] = {name: StageSummary(name) for name in names.values()}
    for name, summary in stages.items():
        calls = [c for r in results for c in r.calls if c.stage == name]
        summary.calls = len(calls)
        summary.parse_failures = sum(not c.parse_ok for c in calls)
        if calls:
            summary.mean_prompt_tokens = statistics.fmean(c.prompt_tokens for c in calls)
            summary.mean_completion_tokens = statistics.fmean(c.completion_tokens for c in calls)
            summary.mean_output_chars = statistics.fmean(c.output_chars for c in calls)
            latencies = sorted(c.latency_s for c in calls)
            summary.mean_latency_s = statistics.fmean(latencies)
            summary.p95_latency_s = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)]
        if name in stage_metrics:
            values = [r.stage_metrics[name] for r in results if name in r.stage_metrics]
            summary.metric = statistics.fmean(values) if values else 0.0
    extra = {k: statistics.fmean([r.extra.get(k, 0.0) for r in results]) if results else 0.0 for k in extra_metrics}
    after = ledger.usage()
    if ledger.shared:  # other processes spend from the same ledger: count this evaluation's own calls
        own = [c for r in results for c in r.calls]
        usage = Usage(
            lm_calls=len(own),
            backend_calls=sum(not c.cached for c in own),
            prompt_tokens=sum(c.prompt_tokens for c in own),
            completion_tokens=sum(c.completion_tokens for c in own),
            wall_s=after.wall_s - before.wall_s,
        )
    else:
        usage = Usage(
            lm_calls=after.lm_calls - before.lm_calls,
            backend_calls=after.backend_calls - before.backend_calls,
            prompt_tokens=after.prompt_tokens - before.prompt_tokens,
            completion_tokens=after.completion_tokens - before.completion_tokens,
            wall_s=after.wall_s - before.wall_s,
        )
    return EvaluationReport(
        score=score,
        ci95=ci,
        n=len(results),
        errors=sum(r.error is not None for r in results),
        stages=stages,
        extra=extra,
        usage=usage,
        examples=results,
    )


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", leave=False)

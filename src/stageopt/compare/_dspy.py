"""DSPy's own optimizers run on a budget of logical LM calls, metered like stageopt's strategies.

MIPROv2, BootstrapFewShotWithRandomSearch, COPRO and GEPA run through their public API inside
``dspy.context(lm=MeteredLM(task LM), adapter=...)``: every call they make (program runs,
bootstrapping, instruction proposals, GEPA's reflection) goes through one
:class:`~stageopt.evaluation.MeteredLM` on one :class:`~stageopt.evaluation.BudgetLedger`, the
same counter stageopt's strategies use. Each is given the setting of its own that comes closest
to the budget (see :func:`dspy_settings`); what it actually spent is read from the ledger.

Running out of budget inside a DSPy optimizer never crashes the run: its evaluations score the
failed examples 0 (``max_errors`` is unbounded) or, where the error escapes the optimizer, the
unoptimized program is returned; either way the status is ``budget_exhausted``.

Curves: DSPy optimizers do not report their trials with LM-call counts, so the metric is wrapped
(:class:`ValidationObserver`). Every completed pass of the metric over the whole validation set
is taken as one candidate's validation score, at the ledger's call count when the pass ended;
the curve is the best-so-far of these. Passes cut short (an example failed, the budget ran out)
and metric calls on other examples (bootstrapping, GEPA's minibatches and feedback) are left
out. This is an honest approximation of the optimizer's own view, not its internal bookkeeping.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from stageopt._errors import BudgetExhaustedError, ConfigurationError, find_cause
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM, Usage

logger = logging.getLogger(__name__)

#: DSPy's optimizers by their compare name.
DSPY_METHODS = ("mipro", "bootstrap_rs", "copro", "gepa")

#: Demos per stage the DSPy optimizers may use (stageopt's default proposer uses up to 2 + 2 too).
DSPY_MAX_BOOTSTRAPPED = 2
DSPY_MAX_LABELED = 2

#: Errors tolerated inside DSPy's evaluations: unbounded, so a spent budget scores 0 instead of raising.
UNBOUNDED_ERRORS = 10**9


class BudgetedMIPROv2(dspy.MIPROv2):
    """MIPROv2 whose number of trials is set from the budget left after its proposal steps.

    MIPROv2 spends an unknown number of calls bootstrapping demos and proposing instructions
    before its trials; sizing the trials then (full evaluations, ``minibatch=False``) makes the
    run fit the budget instead of failing at its end.
    """

    def __init__(self, *args: Any, ledger: BudgetLedger, calls_per_example: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ledger = ledger
        self._calls_per_example = calls_per_example
        self.sized_trials: int | None = None
        self.pools: tuple[Any, Any] | None = None

    def _optimize_prompt_parameters(
        self, program: Any, instruction_candidates: Any, demo_candidates: Any, evaluate: Any, valset: list[Any],
        num_trials: int, *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        self.pools = (instruction_candidates, demo_candidates)
        remaining = self._ledger.remaining_calls() or 0
        per_evaluation = max(1, len(valset) * self._calls_per_example)
        trials = remaining // per_evaluation - 1  # the default program is fully evaluated first
        self.sized_trials = max(trials, 0)
        if trials < 1:
            return program.deepcopy()
        return super()._optimize_prompt_parameters(
            program, instruction_candidates, demo_candidates, evaluate, valset, trials, *args, **kwargs
        )


def caused_by_budget(exc: BaseException) -> bool:
    """Whether a :class:`BudgetExhaustedError` is anywhere in ``exc``'s cause chain."""
    return find_cause(exc, BudgetExhaustedError) is not None


class Quiet:
    """Silences DSPy's optimizers for a run: their prints, progress bars and per-example logs.

    Examples that fail because the budget is spent are expected there; they score 0.
    """

    def __enter__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        self._levels = {}
        for name in ("dspy", "gepa"):
            named = logging.getLogger(name)
            self._levels[name] = named.level
            named.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._stack.close()


def budgeted_mipro(
    metric: Callable[..., Any], *, ledger: BudgetLedger, calls_per_example: int, num_candidates: int, seed: int
) -> BudgetedMIPROv2:
    """MIPROv2 as every budgeted run uses it: explicit candidates, trials sized later, quiet."""
    return BudgetedMIPROv2(
        metric,
        ledger=ledger,
        calls_per_example=calls_per_example,
        auto=None,
        num_candidates=num_candidates,
        max_bootstrapped_demos=DSPY_MAX_BOOTSTRAPPED,
        max_labeled_demos=DSPY_MAX_LABELED,
        num_threads=1,
        max_errors=UNBOUNDED_ERRORS,
        seed=seed,
        verbose=False,
        track_stats=False,
    )


def budgeted_bfsrs(metric: Callable[..., Any], *, num_candidate_programs: int) -> dspy.BootstrapFewShotWithRandomSearch:
    """BootstrapFewShotWithRandomSearch as every budgeted run uses it (a spent budget scores 0)."""
    return dspy.BootstrapFewShotWithRandomSearch(
        metric,
        max_bootstrapped_demos=DSPY_MAX_BOOTSTRAPPED,
        max_labeled_demos=DSPY_MAX_LABELED,
        num_candidate_programs=num_candidate_programs,
        num_threads=1,
        max_errors=UNBOUNDED_ERRORS,
    )


# ---- sizing to the budget ---------------------------------------------------------------------


def bfsrs_num_candidates(
    budget_calls: int, *, n_train: int, n_val: int, calls_per_example: int, bootstrap_share: float = 1.0
) -> int:
    """``num_candidate_programs`` of BootstrapFewShotWithRandomSearch that fits ``budget_calls``.

    BFSRS scores the zero-shot and the labeled-only programs, then per candidate bootstraps
    (about ``bootstrap_share`` of the trainset is run before it has its demos; 1.0 when the model
    rarely succeeds) and scores it on the valset.
    """
    k = calls_per_example
    per_candidate = (n_val + int(n_train * bootstrap_share)) * k
    fixed = 2 * n_val * k + per_candidate  # zero-shot, labeled-only, the unshuffled bootstrap
    return max(1, (budget_calls - fixed) // max(1, per_candidate))


def mipro_num_candidates(budget_calls: int, *, n_train: int, calls_per_example: int) -> int:
    """``num_candidates`` of MIPROv2 such that proposals take at most about half the budget (2 to 8).

    Each candidate costs up to one bootstrap pass over the trainset and, with the program-aware
    proposer, about three proposal calls per stage (describe the program, describe the module,
    write the instruction); the trials are then sized to what is left (:class:`BudgetedMIPROv2`).
    """
    k = calls_per_example
    per_candidate = n_train * k + 3 * k
    return max(2, min(8, budget_calls // (2 * max(1, per_candidate))))


def copro_breadth_depth(budget_calls: int, *, n_val: int, calls_per_example: int, n_stages: int) -> tuple[int, int]:
    """``(breadth, depth)`` of COPRO that fits ``budget_calls`` (the deepest with breadth >= 3).

    With several stages COPRO re-scores every candidate so far at each depth: depth ``d`` scores
    ``n_stages * breadth * d`` programs on the valset, plus one proposal call per stage and depth.
    """
    per_eval = n_val * calls_per_example
    for depth in (3, 2):
        evaluations = n_stages * depth * (depth + 1) // 2
        breadth = (budget_calls - n_stages * depth) // max(1, evaluations * per_eval)
        if breadth >= 3:
            return min(breadth, 10), depth
    breadth = (budget_calls - n_stages) // max(1, n_stages * per_eval)
    return max(2, min(breadth, 10)), 1


def gepa_max_metric_calls(budget_calls: int, *, calls_per_example: int, minibatch: int = 3) -> int:
    """GEPA's ``max_metric_calls`` for ``budget_calls``: program runs, leaving room for reflection.

    A GEPA iteration runs about two minibatches (``2 * minibatch`` metric calls) per reflection
    call, so each metric call carries ``1 / (2 * minibatch)`` reflection calls on top of its own
    ``calls_per_example`` program calls. A guard stops GEPA when the budget is nearly spent.
    """
    per_metric_call = calls_per_example + 1 / (2 * minibatch)
    return max(1, int(budget_calls / per_metric_call))


# ---- curves -----------------------------------------------------------------------------------


def _example_key(example: Any) -> str:
    inputs = example.inputs() if hasattr(example, "inputs") else example
    try:
        return json.dumps(dict(inputs.items()), sort_keys=True, default=str)
    except Exception:  # pragma: no cover - odd example types
        return repr(inputs)


class ValidationObserver:
    """A metric wrapper that reads validation scores off the metric calls (see the module doc).

    Accepts DSPy's three-argument and GEPA's five-argument metric calls. For GEPA's feedback
    calls (``pred_name`` set) it returns the score with a feedback text naming the expected
    outputs, since the task metric gives none.
    """

    def __init__(self, metric: Callable[..., float], valset: Sequence[dspy.Example], ledger: BudgetLedger) -> None:
        self.metric = metric
        self.ledger = ledger
        self._val_keys = {_example_key(e) for e in valset}
        self._n_val = len(self._val_keys)
        self._block: dict[str, float] = {}
        self.curve: list[tuple[int, float]] = []

    @property
    def best(self) -> float | None:
        """The best completed validation pass so far."""
        return self.curve[-1][1] if self.curve else None

    def __call__(
        self,
        example: dspy.Example,
        prediction: dspy.Prediction,
        trace: Any = None,
        pred_name: str | None = None,
        pred_trace: Any = None,
    ) -> Any:
        score = float(self.metric(example, prediction, trace))
        if pred_name is not None:
            labels = {k: v for k, v in example.labels().items() if isinstance(v, str | int | float)}
            return dspy.Prediction(score=score, feedback=f"Score {score:.2f}. Expected: {labels!s:.300}")
        key = _example_key(example)
        if key in self._val_keys:
            if key in self._block:  # a new pass began before the last one completed
                self._block = {}
            self._block[key] = score
            if len(self._block) == self._n_val:
                value = sum(self._block.values()) / self._n_val
                best = max(value, self.best if self.best is not None else value)
                self.curve.append((self.ledger.usage().lm_calls, best))
                self._block = {}
        return score


# ---- one run ----------------------------------------------------------------------------------


@dataclass
class DSPyRun:
    """What one DSPy optimizer run gets: the same program, data, LM and budget as every method.

    Attributes:
        metric: Task metric ``metric(example, prediction, trace=None) -> float``.
        student: The unoptimized program (not modified).
        trainset: Examples to bootstrap demos from / reflect on.
        valset: Examples candidates are selected on.
        lm: The task LM (unmetered; metered here).
        adapter: The adapter programs run with.
        budget_calls: Logical LM calls the run may spend, proposals and reflection included.
        seed: Seed, where the optimizer takes one.
    """

    metric: Callable[..., float]
    student: dspy.Module
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    lm: dspy.BaseLM
    adapter: dspy.Adapter | None
    budget_calls: int
    seed: int


@dataclass
class DSPyOutcome:
    """What a DSPy optimizer run returned and spent."""

    program: dspy.Module
    status: str
    usage: Usage
    settings: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)
    val_score: float | None = None
    note: str | None = None


def run_dspy(method: str, run: DSPyRun) -> DSPyOutcome:
    """Run DSPy's optimizer ``method`` (one of :data:`DSPY_METHODS`) within ``run.budget_calls``."""
    if method not in DSPY_METHODS:
        raise ConfigurationError(f"unknown DSPy optimizer {method!r}; known: {', '.join(DSPY_METHODS)}")
    ledger = BudgetLedger(Budget(lm_calls=run.budget_calls))
    lm = MeteredLM(run.lm, ledger)
    observer = ValidationObserver(run.metric, run.valset, ledger)
    k = len(run.student.named_predictors())
    settings: dict[str, Any] = {}
    note = None
    exhausted = False
    # DSPy's own evaluations that take no max_errors argument read it from the settings.
    context = {"lm": lm, "max_errors": UNBOUNDED_ERRORS, **({"adapter": run.adapter} if run.adapter else {})}
    with Quiet(), dspy.context(**context):
        try:
            program = _RUNNERS[method](run, lm, ledger, observer, k, settings)
        except Exception as exc:
            if not (caused_by_budget(exc) or ledger.remaining_calls() == 0):
                raise
            exhausted = True
            program = run.student.deepcopy()
            note = f"budget exhausted inside the optimizer ({exc}); returned the unoptimized program"
    status = "budget_exhausted" if exhausted or ledger.remaining_calls() == 0 else "completed"
    if settings.get("stopped_by_guard"):
        status = "budget_exhausted"
    return DSPyOutcome(program, status, ledger.usage(), settings, list(observer.curve), observer.best, note)


def _mipro(
    run: DSPyRun, lm: MeteredLM, ledger: BudgetLedger, metric: ValidationObserver, k: int, settings: dict[str, Any]
) -> dspy.Module:
    num_candidates = mipro_num_candidates(run.budget_calls, n_train=len(run.trainset), calls_per_example=k)
    mipro = budgeted_mipro(metric, ledger=ledger, calls_per_example=k, num_candidates=num_candidates, seed=run.seed)
    settings["num_candidates"] = num_candidates
    try:
        program = mipro.compile(run.student, trainset=run.trainset, valset=run.valset, num_trials=1, minibatch=False)
    finally:
        settings["num_trials"] = mipro.sized_trials
    return program


def _bootstrap_rs(
    run: DSPyRun, lm: MeteredLM, ledger: BudgetLedger, metric: ValidationObserver, k: int, settings: dict[str, Any]
) -> dspy.Module:
    candidates = bfsrs_num_candidates(
        run.budget_calls, n_train=len(run.trainset), n_val=len(run.valset), calls_per_example=k
    )
    settings["num_candidate_programs"] = candidates
    bfsrs = budgeted_bfsrs(metric, num_candidate_programs=candidates)
    return bfsrs.compile(run.student, trainset=run.trainset, valset=run.valset)


def _copro(
    run: DSPyRun, lm: MeteredLM, ledger: BudgetLedger, metric: ValidationObserver, k: int, settings: dict[str, Any]
) -> dspy.Module:
    breadth, depth = copro_breadth_depth(run.budget_calls, n_val=len(run.valset), calls_per_example=k, n_stages=k)
    settings.update(breadth=breadth, depth=depth)
    copro = dspy.COPRO(prompt_model=lm, metric=metric, breadth=breadth, depth=depth)
    # COPRO selects on the set it is compiled with: the validation examples, like every method.
    eval_kwargs = {"num_threads": 1, "display_progress": False}
    return copro.compile(run.student, trainset=run.valset, eval_kwargs=eval_kwargs)


def _gepa(
    run: DSPyRun, lm: MeteredLM, ledger: BudgetLedger, metric: ValidationObserver, k: int, settings: dict[str, Any]
) -> dspy.Module:
    minibatch = 3
    max_metric_calls = gepa_max_metric_calls(run.budget_calls, calls_per_example=k, minibatch=minibatch)
    # One iteration's worst case: two minibatches, a reflection call and a full validation pass.
    reserve = (2 * minibatch + len(run.valset)) * k + 1
    settings.update(max_metric_calls=max_metric_calls, reflection_minibatch_size=minibatch, guard_reserve=reserve)

    def guard(_state: Any) -> bool:
        remaining = ledger.remaining_calls() or 0
        if remaining < reserve:
            settings["stopped_by_guard"] = True
            return True
        return False

    gepa = dspy.GEPA(
        metric,
        max_metric_calls=max_metric_calls,
        reflection_minibatch_size=minibatch,
        reflection_lm=lm,
        num_threads=1,
        seed=run.seed,
        gepa_kwargs={"stop_callbacks": [guard]},
    )
    return gepa.compile(run.student, trainset=run.trainset, valset=run.valset)


_Runner = Callable[[DSPyRun, MeteredLM, BudgetLedger, ValidationObserver, int, dict[str, Any]], dspy.Module]
_RUNNERS: dict[str, _Runner] = {"mipro": _mipro, "bootstrap_rs": _bootstrap_rs, "copro": _copro, "gepa": _gepa}

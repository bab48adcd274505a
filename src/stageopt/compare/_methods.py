"""The methods ``stageopt compare`` runs, by name: stageopt's strategies and DSPy's optimizers.

Every method gets the same :class:`MethodContext` (task, program, task LM, adapter, the task's
``train`` split, budget, seed) and returns a :class:`MethodOutcome`: the optimized program, what
it spent on the logical-call counter (:class:`~stageopt.evaluation.BudgetLedger`), its status and
a best-so-far validation curve.

Selection data: stageopt's strategies split the train split themselves
(:meth:`~stageopt.strategies.BaseStageOptimizer.split`: ``bootstrap_size`` examples to bootstrap
from, ``val_size`` to validate on, seeded); DSPy's optimizers get the very same two lists as
their ``trainset`` and ``valset``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError, StageoptError
from stageopt.compare._dspy import DSPY_METHODS, DSPyRun, caused_by_budget, run_dspy
from stageopt.evaluation import Budget, Usage
from stageopt.strategies import STRATEGIES, OptimizationResult, get_strategy
from stageopt.tasks import BaseTask


@dataclass(frozen=True)
class MethodContext:
    """What every method of one comparison cell gets; identical across methods but the name.

    Attributes:
        task: The task (program, metric, stage metrics).
        lm: The task LM, unmetered (each method meters it on its own budget ledger).
        adapter: The adapter programs run with.
        trainset: The task's train split: the only data any selection sees.
        budget_calls: Logical LM calls the method may spend.
        seed: The cell's seed.
        val_size: Validation examples (from ``trainset``) candidates are selected on.
        confirm_size: Held-out training examples stageopt's strategies confirm their choice on
            (paid from the same budget; 0: none). DSPy's optimizers do not confirm.
        racing: Whether stageopt's strategies race candidates on the validation set.
        bootstrap_size: Training examples traced for demos / reflected on.
        num_threads: Examples evaluated in parallel by stageopt's strategies (DSPy's run on 1).
    """

    task: BaseTask
    lm: dspy.BaseLM
    adapter: dspy.Adapter | None
    trainset: list[dspy.Example]
    budget_calls: int
    seed: int
    val_size: int = 10
    bootstrap_size: int = 8
    num_threads: int = 1
    confirm_size: int = 20
    racing: bool = True


@dataclass
class MethodOutcome:
    """What a method returned and spent.

    Attributes:
        program: The optimized program (the unoptimized one when the method could not finish).
        status: ``completed``, ``budget_exhausted`` or ``early_stopped``.
        usage: Logical calls, tokens and wall time of the optimization, from its ledger.
        curve: ``(logical LM calls, best validation score so far)`` points.
        val_score: The best validation score the method saw (None: none completed).
        settings: The method's settings that depend on the budget (e.g. MIPROv2's candidates).
        note: Anything a reader of the results should know about this run.
    """

    program: dspy.Module
    status: str
    usage: Usage
    curve: list[tuple[int, float]] = field(default_factory=list)
    val_score: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


MethodRunner = Callable[[MethodContext], MethodOutcome]


def selection_split(ctx: MethodContext) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """The bootstrap and validation examples stageopt's strategies use for ``ctx`` (same seed)."""
    probe = get_strategy("random")(
        ctx.task.metric, budget=1, bootstrap_size=ctx.bootstrap_size, val_size=ctx.val_size, seed=ctx.seed
    )
    return probe.split(ctx.trainset, None)


def best_so_far(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Running maximum of ``(calls, score)`` points, ordered by calls."""
    out: list[tuple[int, float]] = []
    for calls, score in sorted(points, key=lambda p: p[0]):
        best = max(score, out[-1][1]) if out else score
        out.append((int(calls), float(best)))
    return out


def history_curve(result: OptimizationResult) -> list[tuple[int, float]]:
    """Best-so-far curve of a stageopt run: its full-fidelity trials at their cumulative calls."""
    full = max((int(r["fidelity"]) for r in result.history), default=0)
    points = [
        (int(r["lm_calls"]), float(r["score"]))
        for r in result.history
        if int(r["fidelity"]) == full and r.get("variant") is None
    ]
    return best_so_far(points)


def run_stageopt(strategy: str, ctx: MethodContext) -> MethodOutcome:
    """Run stageopt's ``strategy`` (in-memory study) on ``ctx``."""
    optimizer = get_strategy(strategy)(
        ctx.task.metric,
        budget=Budget(lm_calls=ctx.budget_calls),
        lm=ctx.lm,
        adapter=ctx.adapter,
        stage_metrics=ctx.task.stage_metrics(),
        seed=ctx.seed,
        storage=optuna.storages.InMemoryStorage(),
        val_size=ctx.val_size,
        confirm_size=ctx.confirm_size,
        racing=ctx.racing,
        bootstrap_size=ctx.bootstrap_size,
        num_threads=ctx.num_threads,
    )
    try:
        program = optimizer.compile(ctx.task.program(), trainset=ctx.trainset)
    except StageoptError as exc:
        if not caused_by_budget(exc):
            raise
        # The budget ran out before the first trial (while proposing): nothing was selected.
        spent = Usage(lm_calls=ctx.budget_calls)
        note = f"{exc}; returned the unoptimized program (tokens of the spent calls unknown)"
        return MethodOutcome(ctx.task.program(), "budget_exhausted", spent, note=note)
    result = optimizer.result
    if result is None:  # pragma: no cover - compile always sets it
        raise ConfigurationError(f"strategy {strategy!r} returned no result")
    usage = Usage(**{k: v for k, v in result.usage.items() if k in Usage.__dataclass_fields__})
    return MethodOutcome(
        program,
        result.status,
        usage,
        curve=history_curve(result),
        val_score=result.best.get("score"),
        settings={"candidates": result.candidates},
        note=result.stop_reason,
    )


def run_dspy_method(method: str, ctx: MethodContext) -> MethodOutcome:
    """Run DSPy's optimizer ``method`` on the same selection split as stageopt's strategies."""
    boot, val = selection_split(ctx)
    run = DSPyRun(
        metric=ctx.task.metric,
        student=ctx.task.program(),
        trainset=boot,
        valset=val,
        lm=ctx.lm,
        adapter=ctx.adapter,
        budget_calls=ctx.budget_calls,
        seed=ctx.seed,
    )
    out = run_dspy(method, run)
    return MethodOutcome(out.program, out.status, out.usage, out.curve, out.val_score, out.settings, out.note)


def methods() -> dict[str, MethodRunner]:
    """Every method by name: stageopt's strategies (as registered now), then DSPy's optimizers."""
    registry: dict[str, MethodRunner] = {name: functools.partial(run_stageopt, name) for name in STRATEGIES}
    registry.update({name: functools.partial(run_dspy_method, name) for name in DSPY_METHODS})
    return registry


def resolve_names(spec: str, known: list[str], *, kind: str) -> list[str]:
    """``all`` or a comma-separated list of names, each in ``known`` (duplicates dropped, order kept).

    Raises:
        ConfigurationError: naming the unknown names and listing the known ones.
    """
    if spec.strip() == "all":
        return list(known)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ConfigurationError(f"unknown {kind} name(s) {unknown or [spec]}; known: all, {', '.join(known)}")
    return list(dict.fromkeys(names))


def resolve_methods(spec: str) -> list[str]:
    """``all`` or a comma-separated list of method names, checked against :func:`methods`."""
    return resolve_names(spec, list(methods()), kind="method")

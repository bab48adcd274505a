"""Convergence of a run: best-so-far curve, plateau, fitted regret decay, stopping decision.

Everything here reads a finished run (:class:`~stageopt.strategies.OptimizationResult` or its
``history``); nothing calls an LM. Which trials count toward the best-so-far score is the rule of
:attr:`stageopt.strategies.RunState.best`: full-fidelity trials (scored on the whole validation
set) that are not a cheaper variant; probe trials, multi-fidelity rungs and other subset
evaluations spend LM calls but never raise the curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from stageopt._errors import ConfigurationError
from stageopt.strategies import OptimizationResult, TrialRecord

#: Version of :meth:`ConvergenceReport.to_dict`.
CONVERGENCE_SCHEMA_VERSION = 1

#: Regret at or below this counts as zero (the optimum is reached) in :func:`fit_regret_decay`.
ZERO_REGRET = 1e-9

Axis = Literal["lm_calls", "trials"]


@dataclass(frozen=True)
class CurvePoint:
    """The best-so-far score after one trial of a run.

    Attributes:
        trial: Optuna trial number of the trial just finished.
        lm_calls: Logical LM calls the run had spent after it (proposals included).
        wall_s: Seconds the run had taken after it.
        score: Best full-fidelity, non-variant validation score so far.
        best_trial: The trial holding ``score`` (earliest among ties).
        counted: Whether this trial itself could count (full fidelity, not a variant).
    """

    trial: int
    lm_calls: int
    wall_s: float
    score: float
    best_trial: int
    counted: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready point."""
        return asdict(self)


@dataclass(frozen=True)
class Plateau:
    """Where a best-so-far curve stops improving (see :func:`find_plateau`).

    Attributes:
        trial: Trial at which the plateau starts.
        lm_calls: LM calls spent at that point.
        wall_s: Seconds at that point.
        score: Best-so-far score at that point.
        index: Position of the point in the curve.
        axis: What ``window`` was counted in, ``lm_calls`` or ``trials``.
        window: The window with no gain of ``min_delta``.
        min_delta: The smallest gain that counts.
        later_gain: Final best score minus ``score``: what the run still gained after the
            plateau (a later escape from it shows here).
    """

    trial: int
    lm_calls: int
    wall_s: float
    score: float
    index: int
    axis: str
    window: float
    min_delta: float
    later_gain: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plateau."""
        return asdict(self)


@dataclass(frozen=True)
class RegretFit:
    """A power law ``regret(c) = a * c ** (-b)`` fitted by least squares in log-log space.

    Attributes:
        a: Scale (regret at ``c = 1``); None when there were too few points to fit.
        b: Decay rate: regret shrinks by ``2 ** -b`` each time the calls double (None: no fit).
        r2: Coefficient of determination in log space (None: no fit, or constant regret).
        n: Points used in the fit (positive regret and calls).
        n_zero: Points left out because their regret was zero (the optimum was reached).
    """

    a: float | None
    b: float | None
    r2: float | None
    n: int
    n_zero: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fit."""
        return asdict(self)

    def predict(self, calls: float) -> float | None:
        """The fitted regret after ``calls`` LM calls (None without a fit)."""
        if self.a is None or self.b is None or calls <= 0:
            return None
        return self.a * calls ** (-self.b)


@dataclass(frozen=True)
class ConvergenceReport:
    """How a run converged. Build with :func:`analyze_convergence`; serialise with :meth:`to_dict`.

    Attributes:
        strategy: The strategy that ran.
        seed: Its seed.
        status: Why the run stopped (``completed``, ``budget_exhausted``, ``early_stopped``).
        baseline_score: Validation score of the unoptimized program.
        final_score: Best validation score at the end.
        calls_to_best: LM calls spent when ``final_score`` was first reached.
        trials_to_best: Trial number that first reached it.
        curve: Best-so-far score after every trial (see :func:`best_so_far`).
        plateau: Where improvement stopped (None: it did not stop within the run).
        regret_fit: Fitted regret decay (None unless an optimum was given).
        stopping: The stopping decision: at which trial the run decided to stop, why, and the
            early-stopping settings and checks (see :func:`stopping_decision`).
        schema_version: Version of this layout.
    """

    strategy: str
    seed: int
    status: str
    baseline_score: float | None
    final_score: float | None
    calls_to_best: int | None
    trials_to_best: int | None
    curve: list[CurvePoint]
    plateau: Plateau | None
    regret_fit: RegretFit | None
    stopping: dict[str, Any] = field(default_factory=dict)
    schema_version: int = CONVERGENCE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (``schema_version`` first)."""
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}


def _as_dict(record: TrialRecord | Mapping[str, Any]) -> Mapping[str, Any]:
    return record.to_dict() if isinstance(record, TrialRecord) else record


def full_fidelity(history: Sequence[TrialRecord | Mapping[str, Any]]) -> int | None:
    """The number of validation examples a full-fidelity trial of ``history`` was scored on.

    The baseline trial is always scored in full; without one, the largest fidelity in the
    history (None for an empty history).
    """
    records = [_as_dict(r) for r in history]
    for record in records:
        if record.get("phase") == "baseline" and record.get("variant") is None:
            return int(record["fidelity"])
    return max((int(r["fidelity"]) for r in records), default=None)


def best_so_far(history: Iterable[TrialRecord | Mapping[str, Any]], *, fidelity: int | None = None) -> list[CurvePoint]:
    """The best validation score so far after each trial, in trial order.

    A trial counts toward the best when it was scored on the full validation set and is not a
    variant and met the run's limits, as in :attr:`~stageopt.strategies.RunState.best`; ties keep
    the earliest trial.
    Every trial after the first counted one gives a point (trials that do not count, such as
    probes or multi-fidelity rungs, spend calls while the best stays), so the curve can be drawn
    against ``lm_calls`` or ``wall_s``. Trials before the first counted one have no point.

    Args:
        history: ``OptimizationResult.history`` (dicts) or :class:`TrialRecord` objects.
        fidelity: Examples of a full-fidelity trial (default: :func:`full_fidelity`).
    """
    records = sorted((_as_dict(r) for r in history), key=lambda r: int(r["trial"]))
    full = fidelity if fidelity is not None else full_fidelity(records)
    curve: list[CurvePoint] = []
    best: tuple[float, int] | None = None
    for record in records:
        counted = int(record["fidelity"]) == full and record.get("variant") is None
        feasible = record.get("feasible", True)  # a trial that broke the run's limits is never the best
        if counted and feasible and (best is None or float(record["score"]) > best[0]):
            best = (float(record["score"]), int(record["trial"]))
        if best is None:
            continue
        curve.append(
            CurvePoint(
                trial=int(record["trial"]),
                lm_calls=int(record["lm_calls"]),
                wall_s=float(record["wall_s"]),
                score=best[0],
                best_trial=best[1],
                counted=counted,
            )
        )
    return curve


def find_plateau(
    curve: Sequence[CurvePoint], *, min_delta: float = 0.005, window: float, axis: Axis = "lm_calls"
) -> Plateau | None:
    """The first point of ``curve`` after which the best score gains less than ``min_delta``
    over the next ``window`` LM calls (or trials).

    Point ``i`` starts a plateau when the curve is observed for the whole window after it (some
    later point ``j`` has ``x_j >= x_i + window``) and every point ``j`` with
    ``x_i < x_j <= x_i + window`` has ``score_j < score_i + min_delta``. ``x`` is the point's
    ``lm_calls`` (``axis="lm_calls"``) or its position in the curve (``axis="trials"``). A
    point whose window runs past the end of the run is not judged, so a run that stalls only
    in its last ``window`` has no plateau (None). The plateau is where improvement *first*
    stops; :attr:`Plateau.later_gain` says whether the run escaped from it afterwards.

    Raises:
        ConfigurationError: for a negative ``min_delta``, a ``window`` that is not positive or
            an unknown ``axis``.
    """
    if min_delta < 0:
        raise ConfigurationError(f"`min_delta` must be >= 0, got {min_delta=}")
    if not window > 0:
        raise ConfigurationError(f"`window` must be positive, got {window=}")
    if axis not in ("lm_calls", "trials"):
        raise ConfigurationError(f"`axis` must be 'lm_calls' or 'trials', got {axis=}")
    xs = [float(p.lm_calls) if axis == "lm_calls" else float(i) for i, p in enumerate(curve)]
    for i, point in enumerate(curve):
        end = xs[i] + window
        if not any(x >= end for x in xs[i + 1 :]):
            continue  # the window runs past the end of the run: not judged
        ahead = [q.score for q, x in zip(curve[i + 1 :], xs[i + 1 :], strict=True) if x <= end]
        if all(score < point.score + min_delta for score in ahead):
            return Plateau(
                trial=point.trial,
                lm_calls=point.lm_calls,
                wall_s=point.wall_s,
                score=point.score,
                index=i,
                axis=axis,
                window=float(window),
                min_delta=min_delta,
                later_gain=curve[-1].score - point.score,
            )
    return None


def fit_regret_decay(points: Iterable[tuple[float, float] | CurvePoint], optimum: float) -> RegretFit:
    """Fit ``regret(c) = a * c ** (-b)`` to ``(calls, score)`` points by least squares in log space.

    ``regret = optimum - score``. Points with regret at most :data:`ZERO_REGRET` reached the
    optimum, where the logarithm is undefined: they are left out of the fit and counted in
    ``n_zero``; points with ``calls <= 0`` are left out. With fewer than two points at distinct
    calls the fit is undefined (``a``, ``b`` and ``r2`` None). ``r2`` is None when the regret is
    the same at every point (nothing to explain). Uses numpy only.

    Args:
        points: ``(lm_calls, score)`` pairs or :class:`CurvePoint` objects.
        optimum: The best score there is (e.g. the testbed's known optimum).
    """
    xs: list[float] = []
    ys: list[float] = []
    n_zero = 0
    for point in points:
        calls, score = (point.lm_calls, point.score) if isinstance(point, CurvePoint) else point
        regret = optimum - float(score)
        if regret <= ZERO_REGRET:
            n_zero += 1
            continue
        if calls <= 0:
            continue
        xs.append(math.log(float(calls)))
        ys.append(math.log(regret))
    if len(set(xs)) < 2:
        return RegretFit(None, None, None, len(xs), n_zero)
    x, y = np.asarray(xs), np.asarray(ys)
    design = np.column_stack([np.ones_like(x), x])
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (intercept + slope * x)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 1e-12 else None
    return RegretFit(float(math.exp(intercept)), float(-slope), r2, len(xs), n_zero)


def stopping_decision(result: OptimizationResult) -> dict[str, Any]:
    """Why and where ``result``'s run stopped.

    Runs of this version store it in ``result.notes["stopping"]`` (status, reason, the trial
    after which the run decided to stop, the early-stopping settings and, for strategies that
    record them, each check it passed). For an older ``result.json`` without that note it is
    rebuilt from the status, the reason and the last trial of the history (``"inferred": True``).
    """
    stored = result.notes.get("stopping")
    if isinstance(stored, Mapping):
        return dict(stored)
    last = max(result.history, key=lambda r: int(r["trial"]), default=None)
    return {
        "status": result.status,
        "reason": result.stop_reason,
        "after_trial": int(last["trial"]) if last else None,
        "lm_calls": int(last["lm_calls"]) if last else None,
        "inferred": True,
    }


def analyze_convergence(
    result: OptimizationResult,
    *,
    optimum: float | None = None,
    min_delta: float = 0.005,
    window: float | None = None,
    axis: Axis = "lm_calls",
) -> ConvergenceReport:
    """The convergence of one run: curve, plateau, regret fit (with ``optimum``), stopping decision.

    Args:
        result: A finished run (``OptimizationResult.from_dict`` loads a ``result.json``).
        optimum: The best score there is, when known (the testbed's): adds :class:`RegretFit`
            of the best-so-far score against the LM calls.
        min_delta: Smallest gain that counts, for the plateau.
        window: Plateau window (default: a quarter of the LM calls the run spent, or of its
            trials with ``axis="trials"``).
        axis: Count ``window`` in ``lm_calls`` or in ``trials``.
    """
    fidelity = result.baseline.get("n")
    curve = best_so_far(result.history, fidelity=int(fidelity) if fidelity is not None else None)
    if not curve and fidelity is not None:  # an older result whose n is not the trial fidelity
        curve = best_so_far(result.history)
    plateau = None
    if curve:
        span = curve[-1].lm_calls if axis == "lm_calls" else len(curve)
        plateau = find_plateau(curve, min_delta=min_delta, window=window or max(1.0, span / 4), axis=axis)
    final = curve[-1] if curve else None
    first_best = next((p for p in curve if p.trial == final.best_trial), None) if final else None
    return ConvergenceReport(
        strategy=result.strategy,
        seed=result.seed,
        status=result.status,
        baseline_score=result.baseline.get("score"),
        final_score=final.score if final else None,
        calls_to_best=first_best.lm_calls if first_best else None,
        trials_to_best=first_best.trial if first_best else None,
        curve=curve,
        plateau=plateau,
        regret_fit=fit_regret_decay(curve, optimum) if optimum is not None and curve else None,
        stopping=stopping_decision(result),
    )

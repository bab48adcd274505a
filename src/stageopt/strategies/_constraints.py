"""Limits a returned program must meet, and what a trial's evaluation measures against them.

Every strategy accepts ``limits=Limits(...)``. Each trial's evaluation is measured
(:func:`measure`): mean tokens and dollars per example, the 95th percentile of the time one
example takes, and the largest prompt each stage sent. A trial that breaks a limit is
*infeasible*: it is recorded with ``feasible=False`` and its ``violations``, it is never the
run's best, and strategies that select by themselves (coordinate descent's incumbent,
evolutionary elitism and tournaments, multi-fidelity promotions, the stage-wise optima) rank it
below every feasible one. Where Optuna proposes configurations, each trial's constraint values
(``measured / limit - 1``, feasible when <= 0) are set on the trial before it is told, so
Optuna's constrained samplers (TPE, NSGA-II, GP) steer away from infeasible regions: with
``Trial.set_constraint`` (Optuna >= 5) for any sampler, else through the ``constraints_func``
of the samplers stageopt builds by default.

Measurements come from the calls each example made (``ExampleResult.calls``). DSPy's response
cache makes repeated calls fast: turn it off (``--no-cache``) when a latency limit matters.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.evaluation import ModelPrice, PriceTable, call_cost

if TYPE_CHECKING:
    from stageopt.evaluation import ExampleResult
    from stageopt.strategies._result import TrialRecord

#: Key of ``Limits.max_prompt_tokens`` that applies to every stage not named.
ANY_STAGE = "*"

#: The trial user attribute holding the constraint values, in :meth:`Limits.constraints` order.
CONSTRAINTS_ATTR = "constraints"

#: Whether this Optuna has ``Trial.set_constraint`` (5.0 and later).
_NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


@dataclass(frozen=True)
class TrialMeasures:
    """What one evaluation cost, per example.

    Attributes:
        tokens: Mean prompt + completion tokens per example.
        cost: Mean dollars per example (models without a price cost 0).
        latency: 95th percentile (nearest rank) of an example's seconds in LM calls.
        prompt_tokens: The largest prompt, in tokens, of any call of each stage.
        n: Examples measured.
    """

    tokens: float
    cost: float
    latency: float
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready measures (what a :class:`~stageopt.strategies.TrialRecord` keeps as ``objectives``)."""
        return {
            "tokens": self.tokens,
            "cost": self.cost,
            "latency": self.latency,
            "prompt_tokens": dict(self.prompt_tokens),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialMeasures:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tokens=float(data.get("tokens", 0.0)),
            cost=float(data.get("cost", 0.0)),
            latency=float(data.get("latency", 0.0)),
            prompt_tokens={str(k): int(v) for k, v in (data.get("prompt_tokens") or {}).items()},
            n=int(data.get("n", 0)),
        )


def measure(examples: Sequence[ExampleResult], prices: PriceTable | None = None) -> TrialMeasures:
    """Measure an evaluation from its examples' LM calls.

    Args:
        examples: The evaluated examples (``EvaluationReport.examples``).
        prices: Dollars per million tokens by model name; a call's model is looked up by its
            full name, then by the part after the last ``/`` (``openai/gpt-4o-mini`` finds
            ``gpt-4o-mini``). Unpriced models cost 0.
    """
    prices = prices or {}
    tokens: list[float] = []
    dollars: list[float] = []
    seconds: list[float] = []
    largest: dict[str, int] = {}
    for example in examples:
        tokens.append(float(sum(c.prompt_tokens + c.completion_tokens for c in example.calls)))
        dollars.append(
            sum(
                call_cost(price_key(c.model, prices), c.prompt_tokens, c.completion_tokens, prices)
                for c in example.calls
            )
        )
        seconds.append(sum(c.latency_s for c in example.calls))
        for call in example.calls:
            if call.stage is not None:
                largest[call.stage] = max(largest.get(call.stage, 0), call.prompt_tokens)
    return TrialMeasures(
        tokens=statistics.fmean(tokens) if tokens else 0.0,
        cost=statistics.fmean(dollars) if dollars else 0.0,
        latency=percentile(seconds, 0.95),
        prompt_tokens=largest,
        n=len(examples),
    )


def price_key(model: str | None, prices: PriceTable) -> str | None:
    """The key of ``prices`` that prices ``model``: its full name, else its last ``/`` part."""
    if model is None or model in prices:
        return model
    short = model.rsplit("/", 1)[-1]
    return short if short in prices else model


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Limits:
    """Limits on what a returned program may cost per example (each None: no limit).

    Args:
        max_tokens_per_example: Mean prompt + completion tokens per example.
        max_cost_per_example: Mean dollars per example; needs ``prices``.
        prices: Dollars per million tokens by model name (``parse_price("m=IN/OUT")`` reads the
            CLI form); also what measured costs use when no cost limit is set.
        max_p95_latency_s: 95th percentile of an example's seconds in LM calls.
        max_prompt_tokens: The largest prompt a stage may send (the memory limit M_max: every
            prompt must fit the model's context), one int for every stage or ``{stage: int}``;
            the key ``"*"`` covers the stages a mapping does not name.

    Raises:
        ConfigurationError: for a limit that is not positive, a cost limit without prices, or
            a price that is not a :class:`~stageopt.evaluation.ModelPrice`.
    """

    max_tokens_per_example: float | None = None
    max_cost_per_example: float | None = None
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    max_p95_latency_s: float | None = None
    max_prompt_tokens: int | Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens_per_example", "max_cost_per_example", "max_p95_latency_s"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not value > 0):
                raise ConfigurationError(f"`{name}` must be a number > 0 or None (no limit), got {name}={value!r}")
        if not isinstance(self.prices, Mapping):
            raise ConfigurationError(f"`prices` must map model names to ModelPrice, got {self.prices!r}")
        for model, price in self.prices.items():
            if not isinstance(price, ModelPrice):
                raise ConfigurationError(
                    f"`prices[{model!r}]` must be a ModelPrice, got {price!r}; parse_price('MODEL=IN/OUT') makes one"
                )
        object.__setattr__(self, "prices", dict(self.prices))
        if self.max_cost_per_example is not None and not self.prices:
            raise ConfigurationError(
                "`max_cost_per_example` needs prices (e.g. --price gpt-4o-mini=0.15/0.60): without them every "
                "call costs 0; for an embedded model limit tokens instead (max_tokens_per_example)"
            )
        prompt = self.max_prompt_tokens
        if prompt is not None:
            table = dict(prompt) if isinstance(prompt, Mapping) else {ANY_STAGE: prompt}
            for stage, value in table.items():
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigurationError(
                        f"`max_prompt_tokens` must be ints >= 1 (one for all stages or by stage), got {stage}={value!r}"
                    )
            object.__setattr__(self, "max_prompt_tokens", table if isinstance(prompt, Mapping) else prompt)

    @property
    def active(self) -> bool:
        """Whether any limit is set (prices alone limit nothing)."""
        return any(
            v is not None
            for v in (
                self.max_tokens_per_example,
                self.max_cost_per_example,
                self.max_p95_latency_s,
                self.max_prompt_tokens,
            )
        )

    def prompt_limit(self, stage: str) -> int | None:
        """The prompt-size limit of ``stage`` (None: none)."""
        limit = self.max_prompt_tokens
        if limit is None or isinstance(limit, int):
            return limit
        return limit.get(stage, limit.get(ANY_STAGE))

    def check_stages(self, stages: Sequence[str]) -> None:
        """Refuse per-stage limits for stages the program does not have."""
        if isinstance(self.max_prompt_tokens, Mapping):
            unknown = [s for s in self.max_prompt_tokens if s != ANY_STAGE and s not in stages]
            if unknown:
                raise ConfigurationError(
                    f"`max_prompt_tokens` names unknown stage(s) {unknown}; the stages are {list(stages)} "
                    f"(use {ANY_STAGE!r} for every other stage)"
                )

    def bounds(self, stages: Sequence[str]) -> dict[str, tuple[str, float]]:
        """Every limit in force for a program with ``stages``: constraint name -> (measure, limit).

        Names are ``tokens``, ``cost``, ``latency`` and ``prompt_tokens:<stage>``; the order is
        the order of the constraint values.
        """
        out: dict[str, tuple[str, float]] = {}
        for name, value in (
            ("tokens", self.max_tokens_per_example),
            ("cost", self.max_cost_per_example),
            ("latency", self.max_p95_latency_s),
        ):
            if value is not None:
                out[name] = (name, float(value))
        for stage in stages:
            limit = self.prompt_limit(stage)
            if limit is not None:
                out[f"prompt_tokens:{stage}"] = ("prompt_tokens", float(limit))
        return out

    def constraints(self, measures: TrialMeasures, stages: Sequence[str]) -> dict[str, float]:
        """Optuna constraint values, ``measured / limit - 1`` by name (feasible when all <= 0)."""
        out: dict[str, float] = {}
        for name, (kind, limit) in self.bounds(stages).items():
            out[name] = _measured(measures, name, kind) / limit - 1.0
        return out

    def violations(self, measures: TrialMeasures, stages: Sequence[str]) -> list[str]:
        """What ``measures`` break, one readable line per limit (empty: feasible)."""
        out = []
        for name, (kind, limit) in self.bounds(stages).items():
            value = _measured(measures, name, kind)
            if value > limit:
                out.append(f"{_LABELS.get(kind, name)}{_stage_suffix(name)} {_fmt(value)} > {_fmt(limit)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready limits (prices as ``[prompt, completion]`` dollars per million tokens)."""
        prompt = self.max_prompt_tokens
        return {
            "max_tokens_per_example": self.max_tokens_per_example,
            "max_cost_per_example": self.max_cost_per_example,
            "prices": {m: [p.prompt_per_million, p.completion_per_million] for m, p in self.prices.items()},
            "max_p95_latency_s": self.max_p95_latency_s,
            "max_prompt_tokens": dict(prompt) if isinstance(prompt, Mapping) else prompt,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """Inverse of :meth:`to_dict`."""
        prices = {m: ModelPrice(float(p[0]), float(p[1])) for m, p in (data.get("prices") or {}).items()}
        return cls(
            max_tokens_per_example=data.get("max_tokens_per_example"),
            max_cost_per_example=data.get("max_cost_per_example"),
            prices=prices,
            max_p95_latency_s=data.get("max_p95_latency_s"),
            max_prompt_tokens=data.get("max_prompt_tokens"),
        )


_LABELS = {
    "tokens": "tokens per example",
    "cost": "dollars per example",
    "latency": "p95 seconds per example",
    "prompt_tokens": "prompt tokens",
}


def _measured(measures: TrialMeasures, name: str, kind: str) -> float:
    if kind == "prompt_tokens":
        return float(measures.prompt_tokens.get(name.partition(":")[2], 0))
    return float(getattr(measures, kind))


def _stage_suffix(name: str) -> str:
    stage = name.partition(":")[2]
    return f" of stage {stage!r}" if stage else ""


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def set_constraints(trial: optuna.trial.Trial, values: Mapping[str, float]) -> None:
    """Put a trial's constraint values where Optuna's samplers read them, before it is told.

    Always as the user attribute ``constraints`` (a list, in ``values`` order); with Optuna >= 5
    also through ``Trial.set_constraint`` (any constrained sampler reads those).
    """
    trial.set_user_attr(CONSTRAINTS_ATTR, [float(v) for v in values.values()])
    if _NATIVE_CONSTRAINTS:
        for name, value in values.items():
            trial.set_constraint(name, float(value))


def constraints_func(limits: Limits | None) -> Callable[[optuna.trial.FrozenTrial], Sequence[float]] | None:
    """A sampler's ``constraints_func`` reading :data:`CONSTRAINTS_ATTR`, for Optuna < 5.

    None when no limit is set or when Optuna reads ``Trial.set_constraint`` values itself (it
    deprecates ``constraints_func`` from 5.0).
    """
    if limits is None or not limits.active or _NATIVE_CONSTRAINTS:
        return None
    return _stored_constraints


def _stored_constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return [float(v) for v in trial.user_attrs.get(CONSTRAINTS_ATTR, [])]


def limits_note(limits: Limits, records: Sequence[TrialRecord], full_fidelity: int) -> dict[str, Any]:
    """``notes["limits"]`` of a result: the limits and how many full-fidelity trials met them."""
    full = [r for r in records if r.fidelity == full_fidelity and r.variant is None]
    return {**limits.to_dict(), "full_trials": len(full), "feasible_trials": sum(r.feasible for r in full)}

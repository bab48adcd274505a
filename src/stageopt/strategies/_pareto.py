"""Multi-objective search: NSGA-II over the same space, the Pareto set of programs, and a rule to pick one.

:class:`Pareto` searches score against cost (tokens or dollars per example) and latency with
Optuna's ``NSGAIISampler`` in a study with one direction per objective. Every trial is measured
(:class:`~stageopt.strategies.TrialMeasures`), so the objectives are what each configuration
cost on the validation set. The result keeps the whole front (:class:`ParetoFront`, in
``result.notes["pareto"]``): each point's configuration, readable parameters and measured
objectives; :meth:`Pareto.program_for` rebuilds any of them. :func:`pick` chooses one point by
a :class:`ParetoRule`, e.g. the best score at most 300 tokens per example.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError
from stageopt.evaluation import ModelPrice, PriceTable
from stageopt.strategies._base import BaseStageOptimizer, Direction
from stageopt.strategies._constraints import constraints_func
from stageopt.strategies._joint import check_loop_settings, sampler_loop
from stageopt.strategies._result import OptimizationResult, TrialRecord
from stageopt.strategies._space import Config, SearchSpace, config_key
from stageopt.strategies._state import RunState

logger = logging.getLogger(__name__)

#: Objectives a Pareto search can trade off, with their directions.
OBJECTIVES: dict[str, Direction] = {
    "score": "maximize",
    "tokens": "minimize",
    "cost": "minimize",
    "latency": "minimize",
}

#: Version of :meth:`ParetoFront.to_dict`.
FRONT_SCHEMA_VERSION = 1

#: Phase of every trial the search runs after the baseline.
PHASE = "pareto"


@dataclass(frozen=True)
class ParetoPoint:
    """One program on the front.

    Attributes:
        trial: Its trial number.
        params: Its configuration (indices into the run's choices; :meth:`Pareto.program_for`
            rebuilds the program).
        program: The configuration in readable form (``SearchSpace.describe``).
        values: Its measured value of each objective, by name.
        measures: Everything its evaluation measured (the trial's ``objectives``).
        feasible: Whether it met the run's limits.
        violations: The limits it broke.
    """

    trial: int
    params: Config
    program: dict[str, dict[str, Any]]
    values: dict[str, float]
    measures: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True
    violations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready point."""
        return {
            "trial": self.trial,
            "params": {s: dict(c) for s, c in self.params.items()},
            "program": {s: dict(c) for s, c in self.program.items()},
            "values": dict(self.values),
            "measures": dict(self.measures),
            "feasible": self.feasible,
            "violations": list(self.violations),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParetoPoint:
        """Inverse of :meth:`to_dict`."""
        return cls(
            trial=int(data["trial"]),
            params={s: {k: int(v) for k, v in c.items()} for s, c in data["params"].items()},
            program={s: dict(c) for s, c in (data.get("program") or {}).items()},
            values={k: float(v) for k, v in data["values"].items()},
            measures=dict(data.get("measures") or {}),
            feasible=bool(data.get("feasible", True)),
            violations=list(data.get("violations") or []),
        )


@dataclass(frozen=True)
class ParetoFront:
    """The non-dominated programs of a run, best score first.

    Attributes:
        objectives: The objectives, in the study's order.
        points: The non-dominated full-fidelity trials (a configuration once).
        feasible: True when the points are the front of the feasible trials; False when no
            trial met the limits and the points are the front of them all.
    """

    objectives: tuple[str, ...]
    points: tuple[ParetoPoint, ...]
    feasible: bool = True

    @property
    def directions(self) -> tuple[Direction, ...]:
        """``"maximize"``/``"minimize"`` per objective."""
        return tuple(OBJECTIVES[o] for o in self.objectives)

    def hypervolume(self, reference: Mapping[str, float]) -> float:
        """The objective-space volume the front dominates, bounded by ``reference``.

        Args:
            reference: A worst acceptable value per objective (e.g. ``{"score": 0.0,
                "tokens": 600}``); points not strictly better than it in every objective add nothing.
        """
        missing = [o for o in self.objectives if o not in reference]
        if missing:
            raise ConfigurationError(f"the hypervolume reference needs a value for {missing}, got {dict(reference)}")
        vectors = [minimized(p.values, self.objectives) for p in self.points]
        return hypervolume(vectors, minimized(reference, self.objectives))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready front (``schema_version`` first)."""
        return {
            "schema_version": FRONT_SCHEMA_VERSION,
            "objectives": list(self.objectives),
            "directions": list(self.directions),
            "feasible": self.feasible,
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParetoFront:
        """Inverse of :meth:`to_dict`; refuses a newer schema."""
        version = data.get("schema_version")
        if version != FRONT_SCHEMA_VERSION:
            raise ConfigurationError(
                f"Pareto front schema_version {version!r} is not supported (this stageopt reads {FRONT_SCHEMA_VERSION})"
            )
        return cls(
            objectives=tuple(data["objectives"]),
            points=tuple(ParetoPoint.from_dict(p) for p in data["points"]),
            feasible=bool(data.get("feasible", True)),
        )

    @classmethod
    def from_result(cls, result: OptimizationResult) -> ParetoFront:
        """The front a :class:`Pareto` run stored in ``result.notes["pareto"]``."""
        note = result.notes.get("pareto")
        if not isinstance(note, Mapping) or "front" not in note:
            raise ConfigurationError(
                f"this result ({result.strategy!r}) holds no Pareto front: run the `pareto` strategy "
                "(--objectives score,tokens)"
            )
        return cls.from_dict(note["front"])


@dataclass(frozen=True)
class ParetoRule:
    """How to pick one program from a front: the best ``best`` among points within the bounds.

    ``ParetoRule(best="score", at_most={"cost": 0.002})`` is the best score with cost <= 0.002.
    Ties go to the point better on the other objectives in the front's order, then to the
    earlier trial.

    Args:
        best: The objective to optimize (in its own direction).
        at_most: Upper bounds by objective.
        at_least: Lower bounds by objective.
    """

    best: str = "score"
    at_most: Mapping[str, float] = field(default_factory=dict)
    at_least: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in [self.best, *self.at_most, *self.at_least]:
            if name not in OBJECTIVES:
                raise ConfigurationError(f"unknown objective {name!r} in a Pareto rule; known: {', '.join(OBJECTIVES)}")
        object.__setattr__(self, "at_most", {k: float(v) for k, v in self.at_most.items()})
        object.__setattr__(self, "at_least", {k: float(v) for k, v in self.at_least.items()})

    def describe(self) -> str:
        """The rule in words, e.g. ``best score with tokens <= 300``."""
        bounds = [f"{k} <= {v:g}" for k, v in self.at_most.items()] + [
            f"{k} >= {v:g}" for k, v in self.at_least.items()
        ]
        return f"best {self.best}" + (f" with {' and '.join(bounds)}" if bounds else "")

    def excess(self, point: ParetoPoint) -> float:
        """How far ``point`` is outside the bounds, relative to each bound (0: within)."""
        total = 0.0
        for name, bound in self.at_most.items():
            total += max(0.0, _measure(point, name) - bound) / max(abs(bound), 1e-12)
        for name, bound in self.at_least.items():
            total += max(0.0, bound - _measure(point, name)) / max(abs(bound), 1e-12)
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready rule."""
        return {"best": self.best, "at_most": dict(self.at_most), "at_least": dict(self.at_least)}


Rule = ParetoRule | Callable[[Sequence[ParetoPoint]], ParetoPoint | None]


def pick(front: ParetoFront | Sequence[ParetoPoint], rule: Rule | None = None) -> ParetoPoint | None:
    """The point of ``front`` that ``rule`` picks (default: the best score), None when none qualifies.

    Args:
        front: A :class:`ParetoFront` or its points.
        rule: A :class:`ParetoRule`, or a function of the points returning one of them.
    """
    points = list(front.points if isinstance(front, ParetoFront) else front)
    if rule is None:
        rule = ParetoRule()
    if not isinstance(rule, ParetoRule):
        return rule(points)
    inside = [p for p in points if rule.excess(p) == 0.0]
    if not inside:
        return None
    order = list(dict.fromkeys([rule.best, *(o for p in points for o in p.values)]))
    return min(inside, key=lambda p: (*(_signed(p, o) for o in order), p.trial))


def _measure(point: ParetoPoint, name: str) -> float:
    """An objective's value of ``point`` from its measures when it was not an objective of the run."""
    if name in point.values:
        return point.values[name]
    value = point.measures.get(name)
    if not isinstance(value, int | float):
        raise ConfigurationError(f"the front's points have no measured {name!r}; the run's objectives: {point.values}")
    return float(value)


def _signed(point: ParetoPoint, name: str) -> float:
    """The value to minimise for ``name`` (maximised objectives negated)."""
    value = _measure(point, name)
    return -value if OBJECTIVES[name] == "maximize" else value


def minimized(values: Mapping[str, float], objectives: Sequence[str]) -> list[float]:
    """``values`` as a vector to minimise, in ``objectives`` order (maximised ones negated)."""
    return [-float(values[o]) if OBJECTIVES[o] == "maximize" else float(values[o]) for o in objectives]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether minimisation vector ``a`` is no worse than ``b`` everywhere and better somewhere."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_dominated(vectors: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the vectors (to minimise) no other vector dominates, in order."""
    return [i for i, v in enumerate(vectors) if not any(dominates(w, v) for j, w in enumerate(vectors) if j != i)]


def hypervolume(vectors: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The exact volume that ``vectors`` (to minimise) dominate below ``reference``.

    Slices along the last objective and recurses (exact for any number of objectives, meant
    for the small fronts of a prompt search). Vectors not strictly better than ``reference``
    in every objective add nothing. Optuna's own hypervolume code is private
    (``optuna._hypervolume``), so it is not used.
    """
    points = [list(map(float, v)) for v in vectors if all(x < r for x, r in zip(v, reference, strict=True))]
    if not points:
        return 0.0
    if len(reference) == 1:
        return float(reference[0]) - min(p[0] for p in points)
    points.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(points):
        upper = points[i + 1][-1] if i + 1 < len(points) else float(reference[-1])
        if upper > point[-1]:
            volume += hypervolume([p[:-1] for p in points[: i + 1]], reference[:-1]) * (upper - point[-1])
    return volume


def front_of(
    records: Sequence[TrialRecord], objectives: Sequence[str], *, fidelity: int, space: SearchSpace
) -> ParetoFront:
    """The front of the full-fidelity trials in ``records`` (the feasible ones when there are any).

    A configuration counts once (its first trial); subset and variant trials never count.
    """
    seen: set[str] = set()
    full: list[TrialRecord] = []
    for record in sorted(records, key=lambda r: r.trial):
        key = config_key(record.params)
        if record.fidelity == fidelity and record.variant is None and key not in seen:
            seen.add(key)
            full.append(record)
    feasible = [r for r in full if r.feasible]
    pool = feasible or full
    values = [objective_values(r, objectives) for r in pool]
    vectors = [minimized(v, objectives) for v in values]
    front = [pool[i] for i in non_dominated(vectors)]
    points = [
        ParetoPoint(
            trial=r.trial,
            params={s: dict(c) for s, c in r.params.items()},
            program=space.describe(r.params),
            values=objective_values(r, objectives),
            measures=dict(r.objectives or {}),
            feasible=r.feasible,
            violations=list(r.violations),
        )
        for r in front
    ]
    points.sort(key=lambda p: (-p.values.get("score", 0.0), *minimized(p.values, objectives), p.trial))
    return ParetoFront(tuple(objectives), tuple(points), feasible=bool(feasible) or not full)


def objective_values(record: TrialRecord, objectives: Sequence[str]) -> dict[str, float]:
    """A trial's value of each objective (the score, else its measured cost per example)."""
    measures = record.objectives or {}
    return {o: float(record.score if o == "score" else measures.get(o, math.inf)) for o in objectives}


def check_objectives(objectives: Sequence[str] | str) -> tuple[str, ...]:
    """Objective names from a list or a comma-separated string, checked."""
    names = [o.strip() for o in objectives.split(",")] if isinstance(objectives, str) else list(objectives)
    unknown = [o for o in names if o not in OBJECTIVES]
    if unknown:
        raise ConfigurationError(f"unknown objective(s) {unknown}; choose among {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigurationError(f"give at least two distinct objectives, e.g. score,tokens; got {names}")
    if "score" not in names:
        raise ConfigurationError(f"the objectives must include `score` (what the program is for), got {names}")
    return tuple(names)


class Pareto(BaseStageOptimizer):
    """Multi-objective search (NSGA-II) over the same space: the Pareto set of score against cost.

    One Optuna study with one direction per objective (``score`` maximised; ``tokens`` and
    ``cost``, mean tokens and dollars per example, and ``latency``, the p95 seconds per
    example, minimised), driven by ask/tell with ``NSGAIISampler`` (seeded; pass ``sampler=``
    for another multi-objective sampler, e.g. ``TPESampler``). Generation 0 is drawn at random,
    later generations come from crossover and mutation of the non-dominated members; a
    configuration scored before is told again for free. Limits (``limits=``) are constraints:
    NSGA-II ranks infeasible trials after feasible ones, and the front holds feasible
    programs only.

    :meth:`compile` returns the program :func:`pick` chooses by ``rule`` (default: the best
    score; ties to the cheaper). When no point meets the rule's bounds, the point nearest to
    them is returned and ``notes["pareto"]["rule_met"]`` is False. The front is in
    :attr:`front` and in ``result.notes["pareto"]["front"]``
    (:meth:`ParetoFront.from_result`); :meth:`program_for` rebuilds any of its programs.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        objectives: Names among ``score``, ``tokens``, ``cost``, ``latency`` (a list or
            ``"score,cost"``); ``score`` and one more at least. ``cost`` needs prices.
        prices: Dollars per million tokens by model name, for ``cost`` (default: the limits' prices).
        rule: How :meth:`compile` picks a program (a :class:`ParetoRule` or a function of the points).
        population_size: NSGA-II's generation size.
        n_trials: Upper bound on counted trials (None: until the budget ends the run).
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, sampler, limits, ...).
    """

    strategy_name = "pareto"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        objectives: Sequence[str] | str = ("score", "tokens"),
        prices: PriceTable | None = None,
        rule: Rule | None = None,
        population_size: int = 8,
        n_trials: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        self.objectives = check_objectives(objectives)
        self.prices = dict(prices or {})
        for model, price in self.prices.items():
            if not isinstance(price, ModelPrice):
                raise ConfigurationError(f"`prices[{model!r}]` must be a ModelPrice, got {price!r}")
        if "cost" in self.objectives and not self.price_table():
            raise ConfigurationError(
                "objective `cost` needs prices (prices= or --price MODEL=IN/OUT): without them every call costs 0; "
                "for an embedded model use `tokens` instead"
            )
        if rule is None:
            rule = ParetoRule()
        if isinstance(rule, ParetoRule):
            unknown = [o for o in (rule.best, *rule.at_most, *rule.at_least) if o not in self.objectives]
            if unknown:
                raise ConfigurationError(
                    f"the rule ({rule.describe()}) uses {unknown}, which are not objectives of this run "
                    f"{list(self.objectives)}: add them to `objectives` or change the rule"
                )
        elif not callable(rule):
            raise TypeError(f"`rule` must be a ParetoRule or a function of the front's points, got {rule!r}")
        self.rule = rule
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
            raise ConfigurationError(f"`population_size` must be an int >= 2, got {population_size=}")
        check_loop_settings(n_trials, None, 0.0)
        self.population_size = population_size
        self.n_trials = n_trials
        self.front: ParetoFront | None = None
        self._rebuild: tuple[dspy.Module, SearchSpace] | None = None

    def directions(self) -> list[Direction]:
        return [OBJECTIVES[o] for o in self.objectives]

    def trial_values(self, record: TrialRecord) -> list[float]:
        values = objective_values(record, self.objectives)
        return [values[o] if math.isfinite(values[o]) else 0.0 for o in self.objectives]

    def price_table(self) -> dict[str, ModelPrice]:
        table = super().price_table()
        for model, price in self.prices.items():
            table[model] = price
            lm = self.models.get(model)
            if lm is not None and isinstance(getattr(lm, "model", None), str):
                table[lm.model] = price
        return table

    def default_sampler(self) -> optuna.samplers.BaseSampler:
        """NSGA-II, seeded, constrained by the limits."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.NSGAIISampler(
                population_size=self.population_size, seed=self.seed, constraints_func=constraints_func(self.limits)
            )

    def baseline_trial(self, state: RunState) -> optuna.trial.Trial:
        """The baseline with its parameters (NSGA-II's search space is the trials' intersection)."""
        distributions = state.space.all_distributions()
        params = dict.fromkeys(distributions, 0)  # index 0 of every knob: the original program
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            state.study.enqueue_trial(params, skip_if_exists=False)
            return state.study.ask(distributions)

    def _search(self, state: RunState) -> tuple[str, str | None]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            state.study.set_metric_names(list(self.objectives))
        return sampler_loop(state, phase=PHASE, n_trials=self.n_trials, patience=None, min_delta=0.0)

    def select(self, state: RunState) -> TrialRecord | None:
        """The trial :func:`pick` chooses from the front by :attr:`rule`; records the front in the notes."""
        front = front_of(state.records, self.objectives, fidelity=state.full_fidelity, space=state.space)
        self.front = front
        self._rebuild = (state.program, state.space)
        note: dict[str, Any] = {"front": front.to_dict(), "picked": None, "rule_met": None}
        note["rule"] = (
            self.rule.describe() if isinstance(self.rule, ParetoRule) else getattr(self.rule, "__name__", "custom")
        )
        state.notes["pareto"] = note
        if not front.points or not front.feasible:
            return None
        chosen = pick(front, self.rule)
        note["rule_met"] = chosen is not None
        if chosen is None and isinstance(self.rule, ParetoRule):
            rule = self.rule
            chosen = min(front.points, key=lambda p: (rule.excess(p), _signed(p, rule.best), p.trial))
            logger.warning(
                "no program on the front meets the rule (%s); returning the nearest, trial %d",
                rule.describe(),
                chosen.trial,
            )
        if chosen is None:
            return None
        note["picked"] = chosen.trial
        return next(r for r in state.records if r.trial == chosen.trial)

    def confirmation(
        self, state: RunState, best: TrialRecord | None, baseline: TrialRecord | None
    ) -> dict[str, Any] | None:
        """A rule that picks the best score is confirmed like any choice; a trade-off is not.

        A rule with bounds or another objective to optimize picks for cost, not for a score
        gain, so a held-out score gain is not required of it (nothing is spent on it).
        """
        rule = self.rule
        if isinstance(rule, ParetoRule) and rule.best == "score" and not rule.at_most and not rule.at_least:
            return super().confirmation(state, best, baseline)
        if not state.confirmset or best is None or baseline is None:
            return None
        why = f"picked from the Pareto front by {state.notes.get('pareto', {}).get('rule')}: a trade-off, not confirmed"
        return {"confirmed": True, "reason": why, "n": len(state.confirmset), "gain": None, "candidate": None}

    def program_for(self, point: ParetoPoint) -> dspy.Module:
        """The program of a front point of the last :meth:`compile` (on the caller's LMs)."""
        if self._rebuild is None:
            raise ConfigurationError("program_for() needs a finished compile(): call compile first")
        program, space = self._rebuild
        return space.apply(program, point.params, models=self.models)

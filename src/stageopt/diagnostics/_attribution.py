"""Counterfactual stage attribution: Shapley values of the stages over hybrid programs.

Two programs with the same stages, a *baseline* and the *program* under diagnosis, define a
game: the value of a coalition ``T`` of stages is the score of the hybrid that takes the stages
in ``T`` from the program and every other stage from the baseline. ``v(empty)`` is the baseline's
score and ``v(all)`` the program's. A stage's Shapley value is its marginal contribution
``v(T + {i}) - v(T)`` averaged over the orders in which the stages can be switched; the values
sum to ``v(all) - v(empty)`` (efficiency).

Values are computed per example and then averaged, so each stage gets a mean and a 95 %
interval over the examples. With up to ``exact_max_stages`` stages every coalition is scored
(exact); beyond, the marginal contributions are averaged over seeded random orders, scoring at
most ``max_hybrids`` hybrids between the two programs. Each sampled order telescopes from the
baseline to the program, so efficiency still holds exactly.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.evaluation import mean_ci95

logger = logging.getLogger(__name__)

Coalition = frozenset[str]
#: Per-example scores of the hybrid taking ``coalition`` from the program (index-aligned examples).
CoalitionScorer = Callable[[Coalition], Sequence[float]]


# ---- hybrid programs --------------------------------------------------------------------------------


def shared_stages(baseline: dspy.Module, program: dspy.Module) -> list[str]:
    """The stage names of two programs, in the baseline's order, when both have the same stages.

    Raises:
        ConfigurationError: naming the stages only one of them has.
    """
    base = [name for name, _ in baseline.named_predictors()]
    own = [name for name, _ in program.named_predictors()]
    if set(base) != set(own) or len(base) != len(own):
        only_base = sorted(set(base) - set(own)) or ["-"]
        only_program = sorted(set(own) - set(base)) or ["-"]
        raise ConfigurationError(
            "the program and the baseline must have the same stages (named_predictors() names) to be mixed; "
            f"only in the baseline: {', '.join(only_base)}; only in the program: {', '.join(only_program)}. "
            "Compare programs built by the same task"
        )
    if not base:
        raise ConfigurationError("the programs have no stages (named_predictors() is empty); nothing to attribute")
    return base


def hybrid_program(baseline: dspy.Module, program: dspy.Module, *, from_program: Iterable[str]) -> dspy.Module:
    """A deep copy of ``baseline`` whose stages ``from_program`` are deep copies of ``program``'s.

    A stage is swapped whole (instruction, demos, per-stage LM and settings); the module's own
    code and attributes stay the baseline's. Neither program is modified.

    Raises:
        ConfigurationError: when the two programs' stages differ or ``from_program`` names an unknown stage.
    """
    stages = shared_stages(baseline, program)
    chosen = set(from_program)
    if unknown := sorted(chosen - set(stages)):
        raise ConfigurationError(f"unknown stages {', '.join(unknown)}; the program's stages: {', '.join(stages)}")
    hybrid = baseline.deepcopy()
    sources = dict(program.named_predictors())
    for name, predictor in hybrid.named_predictors():
        if name in chosen:
            donor = sources[name].deepcopy()
            # Swap the state in place: the predictor stays where the module holds it (an
            # attribute, a list item, a nested module), whatever the path.
            predictor.__class__ = donor.__class__
            predictor.__dict__.clear()
            predictor.__dict__.update(donor.__dict__)
    return hybrid


def coalition_label(coalition: Iterable[str], stages: Sequence[str]) -> str:
    """``query1+answer`` in program order; ``baseline`` for none."""
    members = set(coalition)
    return "+".join(s for s in stages if s in members) or "baseline"


# ---- Shapley values ---------------------------------------------------------------------------------


def mean_ci95_signed(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Mean and Student-t 95 % interval of the mean, not clipped (differences may be negative)."""
    return mean_ci95(values, clip=False)


def shapley_exact(stages: Sequence[str], values: Mapping[Coalition, Sequence[float]]) -> dict[str, list[float]]:
    """Exact per-example Shapley values from the scores of all ``2**K`` coalitions."""
    k = len(stages)
    n = _n_examples(values)
    weight = [math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k) for size in range(k)]
    out: dict[str, list[float]] = {}
    for stage in stages:
        others = [s for s in stages if s != stage]
        phi = [0.0] * n
        for size in range(k):
            for subset in itertools.combinations(others, size):
                without = values[frozenset(subset)]
                with_stage = values[frozenset((*subset, stage))]
                for e in range(n):
                    phi[e] += weight[size] * (with_stage[e] - without[e])
        out[stage] = phi
    return out


def shapley_permutations(
    stages: Sequence[str], values: Mapping[Coalition, Sequence[float]], orders: Sequence[Sequence[str]]
) -> dict[str, list[float]]:
    """Per-example Shapley estimates: marginal contributions averaged over the stage ``orders``."""
    n = _n_examples(values)
    out = {stage: [0.0] * n for stage in stages}
    for order in orders:
        before: Coalition = frozenset()
        for stage in order:
            after = before | {stage}
            for e in range(n):
                out[stage][e] += values[after][e] - values[before][e]
            before = after
    return {stage: [v / len(orders) for v in phi] for stage, phi in out.items()}


def sample_orders(
    stages: Sequence[str], *, n_permutations: int, max_hybrids: int, rng: random.Random
) -> list[tuple[str, ...]]:
    """Distinct random stage orders whose coalitions need at most ``max_hybrids`` intermediate hybrids.

    Orders are drawn until ``n_permutations`` are kept, every order is drawn, or the next one would
    need more hybrids than are left (sampling stops there, so the set is a prefix of the seeded stream).

    Raises:
        ConfigurationError: when ``max_hybrids`` cannot afford a single order (``K - 1`` hybrids).
    """
    k = len(stages)
    if max_hybrids < k - 1:
        raise ConfigurationError(f"`max_hybrids` must be at least K - 1 = {k - 1} for {k} stages, got {max_hybrids=}")
    if n_permutations >= math.factorial(k):
        stream: Iterable[tuple[str, ...]] = rng.sample(list(itertools.permutations(stages)), math.factorial(k))
    else:
        stream = _distinct_orders(stages, rng)
    kept: list[tuple[str, ...]] = []
    hybrids: set[Coalition] = set()
    for order in stream:
        prefixes = {frozenset(order[:i]) for i in range(1, k)}
        new = prefixes - hybrids
        if len(hybrids) + len(new) > max_hybrids:
            break
        kept.append(order)
        hybrids |= new
        if len(kept) >= n_permutations:
            break
    return kept


def _distinct_orders(stages: Sequence[str], rng: random.Random) -> Iterable[tuple[str, ...]]:
    seen: set[tuple[str, ...]] = set()
    while True:
        order = tuple(rng.sample(list(stages), len(stages)))
        if order not in seen:
            seen.add(order)
            yield order


def _n_examples(values: Mapping[Coalition, Sequence[float]]) -> int:
    sizes = {len(v) for v in values.values()}
    if len(sizes) != 1:
        raise ValueError(f"every coalition must be scored on the same examples, got sizes {sorted(sizes)}")
    return sizes.pop()


# ---- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageAttribution:
    """One stage's Shapley value (mean over examples) and its 95 % interval."""

    shapley: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready value."""
        return {"shapley": self.shapley, "ci95": list(self.ci95)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageAttribution:
        """Inverse of :meth:`to_dict`."""
        lo, hi = data["ci95"]
        return cls(shapley=float(data["shapley"]), ci95=(float(lo), float(hi)))


@dataclass(frozen=True)
class HybridScore:
    """The mean score of one hybrid: the stages it takes from the program (program order)."""

    from_program: tuple[str, ...]
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready score."""
        return {"from_program": list(self.from_program), "score": self.score}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridScore:
        """Inverse of :meth:`to_dict`."""
        return cls(from_program=tuple(data["from_program"]), score=float(data["score"]))


@dataclass(frozen=True)
class Attribution:
    """Each stage's contribution to the score difference between the program and the baseline.

    Attributes:
        baseline_score: Mean score of the baseline (no stage from the program).
        program_score: Mean score of the program (every stage from it).
        exact: True when every coalition was scored; False for sampled orders.
        hybrids: Every scored coalition, the two programs included, smallest first.
        stages: Shapley value and interval per stage, in program order; the values sum to
            ``program_score - baseline_score``.
        n_permutations: Stage orders averaged over (None when exact).
    """

    baseline_score: float
    program_score: float
    exact: bool
    hybrids: tuple[HybridScore, ...]
    stages: dict[str, StageAttribution]
    n_permutations: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready attribution."""
        return {
            "baseline_score": self.baseline_score,
            "program_score": self.program_score,
            "exact": self.exact,
            "n_permutations": self.n_permutations,
            "hybrids": [h.to_dict() for h in self.hybrids],
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        """Inverse of :meth:`to_dict`."""
        n_perm = data.get("n_permutations")
        return cls(
            baseline_score=float(data["baseline_score"]),
            program_score=float(data["program_score"]),
            exact=bool(data["exact"]),
            hybrids=tuple(HybridScore.from_dict(h) for h in data["hybrids"]),
            stages={str(k): StageAttribution.from_dict(v) for k, v in data["stages"].items()},
            n_permutations=None if n_perm is None else int(n_perm),
        )


def attribute(
    stages: Sequence[str],
    score: CoalitionScorer,
    *,
    exact_max_stages: int = 4,
    n_permutations: int = 10,
    max_hybrids: int = 24,
    seed: int = 0,
) -> Attribution:
    """Shapley attribution of ``stages`` from per-example coalition scores.

    Args:
        stages: The stages, in program order.
        score: Per-example scores of a coalition's hybrid (``frozenset()`` is the baseline, all
            stages the program); called once per coalition, smallest coalitions first.
        exact_max_stages: Score all ``2**K`` coalitions up to this many stages; sample beyond.
        n_permutations: Sampled mode: stage orders to average over.
        max_hybrids: Sampled mode: most hybrids scored besides the two programs.
        seed: Sampled mode: seed of the order sampling.

    Raises:
        ConfigurationError: for no stages or settings that cannot work.
    """
    if not stages:
        raise ConfigurationError("no stages to attribute")
    if n_permutations < 1:
        raise ConfigurationError(f"`n_permutations` must be >= 1, got {n_permutations=}")
    everything = frozenset(stages)
    exact = len(stages) <= exact_max_stages
    orders: list[tuple[str, ...]] = []
    if exact:
        coalitions = [frozenset(c) for size in range(len(stages) + 1) for c in itertools.combinations(stages, size)]
    else:
        orders = sample_orders(stages, n_permutations=n_permutations, max_hybrids=max_hybrids, rng=random.Random(seed))
        middle = {frozenset(order[:i]) for order in orders for i in range(1, len(stages))}
        ordered = sorted(middle, key=lambda c: (len(c), [stages.index(s) for s in stages if s in c]))
        coalitions = [frozenset(), *ordered, everything]
        logger.info("sampled %d stage orders, %d hybrids between the programs", len(orders), len(middle))
    values: Mapping[Coalition, Sequence[float]] = {c: list(score(c)) for c in coalitions}
    per_example = shapley_exact(stages, values) if exact else shapley_permutations(stages, values, orders)
    result: dict[str, StageAttribution] = {}
    for stage in stages:
        mean, ci = mean_ci95_signed(per_example[stage])
        result[stage] = StageAttribution(shapley=mean, ci95=ci)
    return Attribution(
        baseline_score=_mean(values[frozenset()]),
        program_score=_mean(values[everything]),
        exact=exact,
        hybrids=tuple(
            HybridScore(from_program=tuple(s for s in stages if s in c), score=_mean(values[c])) for c in coalitions
        ),
        stages=result,
        n_permutations=None if exact else len(orders),
    )


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0

"""Budget by stage criticality: probe each stage's room for improvement, then share the budget.

``allocate="blame"`` (for :class:`~stageopt.strategies.CoordinateDescent` and
:class:`~stageopt.strategies.HierarchicalBayesian`) runs a *probe* phase before the search:

1. The original program is scored on the first ``probe_size`` validation examples (the probe
   subset, a prefix of the validation set so that probe scores are paired).
2. For each stage, ``probe_trials_per_stage`` other configurations of that stage alone (the
   other stages at their original setting), drawn at random with a seeded generator, are scored
   on the same subset.
3. A stage's *room* is ``max(0, best probe score of the stage - probe score of the original)``.
4. Shares: every stage gets at least ``min_share``; the rest (``1 - K * min_share``) is split in
   proportion to the rooms. All rooms zero (or ``K * min_share >= 1``) gives equal shares.

Stage metrics (e.g. a query stage's supporting-title recall) are *not* mixed into the room:
only some stages have one and its unit differs from the end-to-end score, so the rule stays one
measured quantity, the end-to-end gain a stage alone can buy.

Probe trials are recorded with phase ``probe`` (``stage`` None for the original program), are
scored on a subset (so they never count as the run's best, see :attr:`RunState.best`) and spend
logical LM calls from the run's budget. They are asked from Optuna without parameters, so the
sampler does not learn from their subset scores. A resumed run finds them in the history and
does not score them again.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.strategies._space import Config, config_key
from stageopt.strategies._state import RunState

logger = logging.getLogger(__name__)

#: Phase name of probe trials.
PROBE_PHASE = "probe"

#: The names ``allocate=`` accepts.
ALLOCATIONS = ("equal", "blame")


@dataclass(frozen=True)
class BlameAllocation:
    """Settings of ``allocate="blame"`` (see the module docstring).

    Attributes:
        probe_size: Validation examples (a prefix of the validation set) each probe is scored on.
        probe_trials_per_stage: Other configurations of each stage scored in the probe phase.
        min_share: Share of the budget every stage gets whatever its room (the floor).
        reuse_probes: Coordinate descent: a stage's first trial of round 1 is its best probe
            configuration, when that one beat the original on the probe subset.
    """

    probe_size: int = 5
    probe_trials_per_stage: int = 2
    min_share: float = 0.1
    reuse_probes: bool = True

    def __post_init__(self) -> None:
        for name in ("probe_size", "probe_trials_per_stage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"`{name}` of allocate='blame' must be an int >= 1, got {name}={value!r}")
        if isinstance(self.min_share, bool) or not isinstance(self.min_share, int | float):
            raise ConfigurationError(f"`min_share` must be a number in [0, 1], got min_share={self.min_share!r}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ConfigurationError(f"`min_share` must be in [0, 1], got min_share={self.min_share}")
        if not isinstance(self.reuse_probes, bool):
            raise ConfigurationError(f"`reuse_probes` must be True or False, got {self.reuse_probes!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)


def resolve_allocation(value: str | BlameAllocation | Mapping[str, Any] | None) -> BlameAllocation | None:
    """The policy ``allocate=`` names: None for ``"equal"``, a :class:`BlameAllocation` for blame.

    Accepts ``"equal"``, ``"blame"``, a :class:`BlameAllocation`, or a mapping of its settings
    (what ``--option allocate='{"probe_size": 3}'`` gives), which means blame.

    Raises:
        ConfigurationError: for an unknown name or setting (the message lists the known ones).
    """
    if value is None or value == "equal":
        return None
    if value == "blame":
        return BlameAllocation()
    if isinstance(value, BlameAllocation):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(BlameAllocation)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {unknown} of allocate='blame'; known: {', '.join(sorted(known))}"
            )
        return BlameAllocation(**value)
    raise ConfigurationError(
        f"`allocate` must be one of {', '.join(ALLOCATIONS)} (or blame settings as a dict), got {value!r}"
    )


def room_shares(rooms: Mapping[str, float], *, min_share: float) -> dict[str, float]:
    """Each stage's share of the budget from its room for improvement (shares sum to 1).

    ``share = min_share + (1 - K * min_share) * room / sum(rooms)``, negative rooms counted as
    zero. Equal shares when every room is zero or when ``K * min_share >= 1``.
    """
    if not rooms:
        return {}
    k = len(rooms)
    positive = {s: max(0.0, float(r)) for s, r in rooms.items()}
    total = sum(positive.values())
    if total <= 0.0 or k * min_share >= 1.0:
        return dict.fromkeys(rooms, 1.0 / k)
    rest = 1.0 - k * min_share
    return {s: min_share + rest * r / total for s, r in positive.items()}


def split_by_share(
    total: int,
    shares: Mapping[str, float],
    *,
    caps: Mapping[str, int] | None = None,
    minimum: int = 0,
) -> dict[str, int]:
    """Split ``total`` whole units (trials) across stages in proportion to ``shares``.

    Each stage first gets ``minimum`` units (never above its cap) when ``total`` pays for that;
    the rest is split by shares with largest remainders (ties: program order), a stage never
    above its cap; what capped stages cannot take goes to the others by their shares. The
    result sums to ``min(total, sum(caps))``. All shares zero counts as equal shares.

    Args:
        total: Units to split (>= 0).
        shares: Each stage's share (any non-negative scale).
        caps: Largest number of units per stage (default: no cap).
        minimum: Units every stage gets first, when ``total`` can pay for them all.
    """
    if total < 0:
        raise ConfigurationError(f"`total` must be >= 0, got {total=}")
    names = list(shares)
    limit = {s: max(0, int(caps[s])) if caps is not None and s in caps else total for s in names}
    weights = {s: max(0.0, float(shares[s])) for s in names}
    if sum(weights.values()) <= 0.0:
        weights = dict.fromkeys(names, 1.0)
    floor = {s: min(minimum, limit[s]) for s in names}
    out = floor if sum(floor.values()) <= total else dict.fromkeys(names, 0)
    left = total - sum(out.values())
    while left > 0:
        open_ = [s for s in names if out[s] < limit[s]]
        if not open_:
            break
        mass = sum(weights[s] for s in open_)
        ideal = {s: left * (weights[s] / mass if mass > 0 else 1.0 / len(open_)) for s in open_}
        given = {s: min(math.floor(ideal[s]), limit[s] - out[s]) for s in open_}
        spare = left - sum(given.values())
        # Largest remainders first; every open stage has room for one more, so spare > 0 gives >= 1.
        for s in sorted(open_, key=lambda s: (-(ideal[s] - math.floor(ideal[s])), names.index(s))):
            if spare > 0 and out[s] + given[s] < limit[s]:
                given[s] += 1
                spare -= 1
        for s in open_:
            out[s] += given[s]
        left -= sum(given.values())
    return out


@dataclass(frozen=True)
class ProbeOutcome:
    """What the probe phase measured (stored in the result's ``notes["allocation"]``).

    Attributes:
        probe_size: Examples each probe was scored on.
        baseline: Probe score of the original program.
        best: Best probe score of each stage (the original's when it had no alternative).
        rooms: ``max(0, best - baseline)`` per stage.
        shares: Budget shares from :func:`room_shares` (sum to 1).
        best_configs: Each stage's best probe configuration, None when none beat the original.
        lm_calls: LM calls the run had spent when the probe phase ended.
        trials: Probe trials in the history (the original's included).
    """

    probe_size: int
    baseline: float
    best: dict[str, float]
    rooms: dict[str, float]
    shares: dict[str, float]
    best_configs: dict[str, Config | None]
    lm_calls: int
    trials: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready outcome."""
        return asdict(self)


def probe_plan(state: RunState, policy: BlameAllocation) -> dict[str, list[Config]]:
    """The configurations each stage's probes score: seeded, the same on every resume."""
    base = state.space.default_config()
    plan: dict[str, list[Config]] = {}
    for stage in state.space.names():
        others = list(state.space.stage_configs(stage))[1:]
        rng = random.Random(f"stageopt-probe/{state.optimizer.seed}/{stage}")
        picked = rng.sample(others, min(policy.probe_trials_per_stage, len(others)))
        plan[stage] = [{**{s: dict(c) for s, c in base.items()}, stage: dict(choice)} for choice in picked]
    return plan


def run_probes(state: RunState, policy: BlameAllocation) -> ProbeOutcome:
    """Score the probe plan on the probe subset (what is not in the history yet) and measure rooms.

    Raises:
        StopSearch: when the budget cannot pay for a probe (the run ends ``budget_exhausted``).
    """
    examples = state.valset[: min(policy.probe_size, len(state.valset))]
    n = len(examples)
    # Replaced by allocation_note once the probes are done; stays when the budget ends them.
    state.notes["allocation"] = {"rule": "blame", "settings": policy.to_dict(), "probe": None, "targets": None}
    done = {(r.stage, config_key(r.params)): r for r in state.trials_in(phase=PROBE_PHASE) if r.fidelity == n}
    base = state.space.default_config()
    planned: list[tuple[str | None, Config]] = [(None, base)]
    planned += [(stage, config) for stage, configs in probe_plan(state, policy).items() for config in configs]
    for stage, config in planned:
        if (stage, config_key(config)) not in done:
            record = state.run_trial(config, phase=PROBE_PHASE, stage=stage, examples=examples)
            done[(stage, config_key(config))] = record
    baseline = done[(None, config_key(base))].score
    best: dict[str, float] = {}
    best_configs: dict[str, Config | None] = {}
    for stage in state.space.names():
        best[stage], best_configs[stage] = baseline, None
        for (owner, _), record in done.items():
            if owner == stage and record.score > best[stage]:
                best[stage], best_configs[stage] = record.score, record.params
    rooms = {s: max(0.0, best[s] - baseline) for s in best}
    shares = room_shares(rooms, min_share=policy.min_share)
    probes = [r for r in state.trials_in(phase=PROBE_PHASE) if r.fidelity == n]
    outcome = ProbeOutcome(
        probe_size=n,
        baseline=baseline,
        best=best,
        rooms=rooms,
        shares=shares,
        best_configs=best_configs,
        lm_calls=max(r.lm_calls for r in probes),
        trials=len(probes),
    )
    logger.info("probe phase: rooms %s, shares %s", rooms, {s: round(v, 3) for s, v in shares.items()})
    return outcome


def remaining_calls(state: RunState, outcome: ProbeOutcome) -> int | None:
    """LM calls left for the search after the probe phase (None: no ``lm_calls`` limit)."""
    limit = state.ledger.budget.lm_calls
    return None if limit is None else max(0, limit - outcome.lm_calls)


def allocation_note(
    policy: BlameAllocation, outcome: ProbeOutcome, targets: Mapping[str, int], unit: str
) -> dict[str, Any]:
    """What ``notes["allocation"]`` of the result holds for a blame run."""
    return {
        "rule": "blame",
        "settings": policy.to_dict(),
        "probe": outcome.to_dict(),
        "targets": dict(targets),
        "unit": unit,
    }

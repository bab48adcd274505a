"""Population-based training: a population scored on growing validation slices, exploit and explore."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.strategies._base import BaseStageOptimizer, RunState
from stageopt.strategies._checks import check_early_stopping
from stageopt.strategies._multifidelity import _check_fidelities
from stageopt.strategies._space import STRUCTURE, Config, SearchSpace, config_key
from stageopt.strategies._warmstart import warm_configs

#: Phase of every trial this strategy runs (``round`` is the round, ``stage`` the explored stage).
PHASE = "pbt"

#: Fractions of the validation set scored in the first rounds by default (then the whole set).
DEFAULT_FIDELITIES = (0.25, 0.5, 1.0)

#: Tries at exploring a copy that is new to the population and not scored on the next slice.
MAX_ATTEMPTS_PER_CHILD = 5

#: Rounds in a row that score nothing new (a small space is exhausted) before the run ends.
MAX_IDLE_ROUNDS = 2

#: Study user attribute holding a round's members (so a resumed run repeats it).
_PLAN_ATTR = "pbt.round.{}"


class PopulationBasedTraining(BaseStageOptimizer):
    """Population-based training (PBT) over whole-program configurations.

    A population of ``population_size`` configurations is scored round after round on growing
    prefixes of the validation set (``fidelities``, e.g. 25 %, 50 %, then the whole set in every
    later round), so every member of a round is scored on the same examples (paired). Round 0
    is the original program, the warm-start configurations (if any), then configurations drawn
    uniformly (each knob of each stage uniform over its choices). After each round the members
    are ranked by that round's score (ties: earlier member first; with ``limits``, a member that
    broke a limit ranks after every feasible one); the worst
    ``ceil(exploit_fraction * population_size)`` are replaced (*exploit*) by copies of members
    drawn uniformly from as many of the best, and each copy is *explored*: one stage, drawn
    uniformly among those with a choice to make, gets one of its knobs (drawn uniformly among
    its knobs with more than one choice) set to another choice, drawn uniformly. The others
    carry over unchanged. A copy equal to another member or already scored on the next slice
    is explored again (up to ``MAX_ATTEMPTS_PER_CHILD`` times).

    The next round scores the survivors (best first, so a budget that ends mid-round has spent
    it on the most promising members) and then the copies, on its own slice. A configuration
    already scored on a slice is never scored on it again, so once the slice is the whole
    validation set only the explored copies cost LM calls. Only whole-validation scores count
    for the returned program (:attr:`RunState.best`); a slice score never does.

    Reproducibility and resume: each round's draws come from a ``random.Random`` seeded by the
    seed and the round. A round's members are stored in the study (user attribute
    ``pbt.round.<r>``: ``{"size": n, "members": [{"params", "stage", "parent"}, ...]}``, where
    ``parent`` is the index of the copied member in the previous round) before any of them is
    scored; a resumed run reads the plans and scores only what has no score on the round's slice.
    The Optuna sampler is not consulted (the population is the model); trials carry no
    Optuna parameters.

    History: every trial has phase ``pbt``, ``round`` = its round, ``fidelity`` = its slice's
    number of examples and ``stage`` = the stage its copy explored (None for a survivor).

    The run ends after ``n_rounds`` rounds, when ``patience`` rounds in a row on the whole
    validation set raise the best score by less than ``min_delta``, when rounds stop bringing
    anything new to score, or when the budget cannot pay for a trial.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        population_size: Members of each round.
        fidelities: Increasing fractions of the validation set in ``(0, 1]``, one per round
            from round 0; ``1.0`` is appended when missing and used by every later round.
        exploit_fraction: Share of the population replaced each round by explored copies of
            as many best members, in ``(0, 0.5]`` (at least one member).
        n_rounds: Upper bound on rounds, round 0 included, at least ``len(fidelities)`` (None:
            until the budget or patience ends the run).
        patience: Whole-validation rounds in a row without an improvement of ``min_delta``
            before stopping early (None: never).
        min_delta: Smallest improvement of the best validation score that counts as progress.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, storage, warm_start, ...).
    """

    strategy_name = "pbt"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        population_size: int = 8,
        fidelities: Sequence[float] = DEFAULT_FIDELITIES,
        exploit_fraction: float = 0.25,
        n_rounds: int | None = None,
        patience: int | None = 3,
        min_delta: float = 0.005,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        if _not_int(population_size) or population_size < 2:
            raise ConfigurationError(f"`population_size` must be an int >= 2, got {population_size=}")
        self.fidelities = _check_fidelities(fidelities)
        number = isinstance(exploit_fraction, int | float) and not isinstance(exploit_fraction, bool)
        if not number or not 0 < exploit_fraction <= 0.5:
            raise ConfigurationError(f"`exploit_fraction` must be in (0, 0.5], got {exploit_fraction=}")
        if n_rounds is not None and (_not_int(n_rounds) or n_rounds < len(self.fidelities)):
            raise ConfigurationError(
                f"`n_rounds` must be an int >= {len(self.fidelities)} (one round per fidelity, the whole "
                f"validation set last) or None, got {n_rounds=}"
            )
        check_early_stopping(patience, min_delta)
        self.population_size = population_size
        self.exploit_fraction = float(exploit_fraction)
        self.n_rounds = n_rounds
        self.patience = patience
        self.min_delta = min_delta

    def stopping_note(self, state: RunState, status: str, reason: str | None) -> dict[str, Any]:
        """The base note, with ``n_rounds`` among the settings."""
        note = super().stopping_note(state, status, reason)
        note["settings"]["n_rounds"] = self.n_rounds
        return note

    @property
    def n_exploited(self) -> int:
        """Members replaced by explored copies after each round."""
        return max(1, min(self.population_size // 2, math.ceil(self.exploit_fraction * self.population_size - 1e-9)))

    def slices(self, n_val: int) -> list[int]:
        """Examples scored in rounds 0, 1, ... (later rounds: the last, the whole validation set).

        Fractions that give the same number of examples as the one before, or the whole set
        early, are dropped.
        """
        sizes: list[int] = []
        for fraction in self.fidelities:
            size = min(n_val, max(1, math.ceil(fraction * n_val - 1e-9)))
            if not sizes or size > sizes[-1]:
                sizes.append(size)
            if size == n_val:
                break
        return sizes

    def _search(self, state: RunState) -> tuple[str, str | None]:
        sizes = self.slices(state.full_fidelity)
        state.notes["pbt"] = {"slices": sizes, "exploited_per_round": self.n_exploited}
        stale = idle = 0
        ranks: list[tuple[bool, float]] = []
        members: list[dict[str, Any]] = []
        round_no = 0
        while True:
            size = sizes[min(round_no, len(sizes) - 1)]
            before = state.best_before_round(PHASE, round_no)
            members = self._plan(state, round_no, size, members, ranks)
            examples = state.valset[:size]
            for member in members:
                if not state.recorded(member["params"], examples):
                    state.run_trial(
                        member["params"], phase=PHASE, stage=member["stage"], round=round_no, examples=examples
                    )
            # Rank keys: members that broke the run's limits after every feasible one, then by score.
            ranks = [(not state.is_feasible(m["params"], examples), -_score(state, m["params"], size)) for m in members]
            new = state.trials_in(phase=PHASE, round=round_no)
            idle = 0 if new else idle + 1
            if size == state.full_fidelity:
                stale = stale + 1 if state.best_before_round(PHASE, round_no + 1) - before < self.min_delta else 0
            if self.n_rounds is not None and round_no + 1 >= self.n_rounds:
                return "completed", f"{self.n_rounds} rounds done"
            if self.patience is not None and stale >= self.patience:
                return "early_stopped", (
                    f"{stale} rounds in a row on the whole validation set improved the best score by less "
                    f"than min_delta={self.min_delta}"
                )
            if idle >= MAX_IDLE_ROUNDS:
                return "completed", f"{idle} rounds in a row brought only configurations scored before"
            round_no += 1

    # ---- planning rounds ---------------------------------------------------------------------

    def _plan(
        self, state: RunState, round_no: int, size: int, previous: list[dict[str, Any]], ranks: list[tuple[bool, float]]
    ) -> list[dict[str, Any]]:
        """The members of round ``round_no``: from the study when planned before, else made and stored."""
        attr = _PLAN_ATTR.format(round_no)
        stored = state.study.user_attrs.get(attr)
        if stored is not None:
            return [dict(m) for m in stored["members"]]
        rng = random.Random(f"{PHASE}:{self.seed}:{round_no}")
        if round_no == 0:
            members = self._first_population(state, rng)
        else:
            members = self._exploit_explore(state, rng, size, previous, ranks)
        state.study.set_user_attr(attr, {"size": size, "members": members})
        return members

    def _first_population(self, state: RunState, rng: random.Random) -> list[dict[str, Any]]:
        """The original program, the warm-start configurations, then uniform draws (all distinct)."""
        space = state.space
        members: list[dict[str, Any]] = []
        taken: set[str] = set()
        for config in [space.default_config(), *warm_configs(state)]:
            config = space.normalize(config)
            if config_key(config) not in taken and len(members) < self.population_size:
                members.append({"params": config, "stage": None, "parent": None})
                taken.add(config_key(config))
        while len(members) < self.population_size:
            for _ in range(MAX_ATTEMPTS_PER_CHILD):
                config = space.normalize(_draw(rng, space))
                if config_key(config) not in taken:
                    break
            members.append({"params": config, "stage": None, "parent": None})
            taken.add(config_key(config))
        return members

    def _exploit_explore(
        self,
        state: RunState,
        rng: random.Random,
        size: int,
        previous: list[dict[str, Any]],
        ranks: list[tuple[bool, float]],
    ) -> list[dict[str, Any]]:
        """Survivors best first, then an explored copy of a top member for each of the worst."""
        order = sorted(range(len(previous)), key=lambda i: (*ranks[i], i))
        q = self.n_exploited
        top, survivors = order[:q], order[: len(order) - q]
        members = [{"params": previous[i]["params"], "stage": None, "parent": None} for i in survivors]
        taken = {config_key(m["params"]) for m in members}
        examples = state.valset[:size]
        for _ in range(q):
            parent = rng.choice(top)
            child, stage = previous[parent]["params"], None
            for _ in range(MAX_ATTEMPTS_PER_CHILD):
                child, stage = _explore(rng, state.space, previous[parent]["params"])
                if config_key(child) not in taken and not state.recorded(child, examples):
                    break
            members.append({"params": child, "stage": stage, "parent": parent})
            taken.add(config_key(child))
        return members


def _sizes(space: SearchSpace, unit: str) -> dict[str, int]:
    """Number of choices of each knob of a stage (or of the structure, ``unit`` = STRUCTURE)."""
    if unit == STRUCTURE:
        return {k: len(v) for k, v in space.structure.choices.items()} if space.structure is not None else {}
    candidates = space.stages[unit]
    return {knob: candidates.size(knob) for knob in candidates.knobs()}


def _units(space: SearchSpace) -> list[str]:
    """What a configuration chooses for: the structure (when searched), then every stage."""
    return ([STRUCTURE] if space.structure is not None else []) + space.names()


def _draw(rng: random.Random, space: SearchSpace) -> Config:
    """A configuration with every knob uniform over its choices."""
    return {unit: {knob: rng.randrange(n) for knob, n in _sizes(space, unit).items()} for unit in _units(space)}


def _explore(rng: random.Random, space: SearchSpace, config: Config) -> tuple[Config, str | None]:
    """A copy of ``config`` with one knob of one stage (drawn uniformly) set to another choice."""
    child = {unit: dict(choice) for unit, choice in config.items()}
    config_now = space.normalize(child)
    units = [
        u
        for u in _units(space)
        if (u == STRUCTURE or space.runs(u, config_now)) and any(n > 1 for n in _sizes(space, u).values())
    ]
    if not units:
        return child, None
    unit = rng.choice(units)
    knobs = [k for k, n in _sizes(space, unit).items() if n > 1]
    knob = rng.choice(knobs)
    current = child.setdefault(unit, {}).get(knob, 0)
    pick = rng.randrange(_sizes(space, unit)[knob] - 1)
    child[unit][knob] = pick + (pick >= current)
    return space.normalize(child), unit


def _score(state: RunState, config: Config, size: int) -> float:
    """The score of a configuration already scored on the first ``size`` validation examples."""
    return state.scores[f"{config_key(config)}@{size}"][0]


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)

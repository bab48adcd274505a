"""Multi-fidelity successive halving in Hyperband brackets over validation prefixes (paired)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._base import BaseStageOptimizer, RunState, StopSearch
from stageopt.strategies._checks import check_early_stopping
from stageopt.strategies._result import TrialRecord
from stageopt.strategies._space import Config, config_from_params, config_key, param_name

#: Fractions of the validation set scored at each rung by default (the last is the whole set).
DEFAULT_FIDELITIES = (0.1, 0.3, 0.6, 1.0)

#: Phase of every trial this strategy runs (``round`` is the bracket, ``fidelity`` the rung's size).
PHASE = "multifidelity"

#: Sampled configurations per wanted configuration of a bracket before it makes do with fewer.
MAX_ATTEMPTS_PER_CONFIG = 3

#: Sampled configurations in a row already in the bracket before it makes do with fewer.
MAX_REPEATS_IN_A_ROW = 6

#: Brackets in a row that evaluate nothing new (a small space is exhausted) before the run ends.
MAX_IDLE_BRACKETS = 2

#: Study user attribute holding a bracket's plan (so a resumed run sizes it the same way).
_PLAN_ATTR = "multifidelity.bracket.{}"


@dataclass(frozen=True)
class Rung:
    """One fidelity level: a validation prefix and optional caps on demos and output length.

    Attributes:
        size: Number of validation examples (a prefix of the validation set).
        max_demos: Demos each stage keeps at most (None: all of the configuration's).
        max_tokens: Output-length cap in tokens set on each stage (None: the stage's own).
    """

    size: int
    max_demos: int | None = None
    max_tokens: int | None = None

    @property
    def variant(self) -> str | None:
        """The name of the caps (e.g. ``d3t64``), None when the configuration runs as is."""
        name = ""
        if self.max_demos is not None:
            name += f"d{self.max_demos}"
        if self.max_tokens is not None:
            name += f"t{self.max_tokens}"
        return name or None

    def transform(self, program: dspy.Module) -> dspy.Module:
        """Apply the caps to ``program`` (a configured copy, changed in place) and return it."""
        for _, predictor in program.named_predictors():
            if self.max_demos is not None:
                predictor.demos = list(predictor.demos[: self.max_demos])
            if self.max_tokens is not None:
                own = predictor.config.get("max_tokens")
                cap = self.max_tokens if own is None else min(own, self.max_tokens)
                predictor.config = {**predictor.config, "max_tokens": cap}
        return program


class SuccessiveHalving(BaseStageOptimizer):
    """Synchronous successive halving in Hyperband brackets, on paired validation prefixes.

    Rungs are fidelity levels: rung ``r`` scores a configuration on the first ``n_r``
    validation examples (``fidelities[r]`` of the validation set, at least one example; sizes
    that coincide are merged and the last rung is always the whole set). Every configuration at
    a rung sees the same examples, so rung scores are paired comparisons. Lower rungs may also
    cap each stage's demos (``max_demos``) and output length (``max_tokens``); such a trial is
    recorded with a ``variant`` such as ``d3t64``. The last rung runs the configuration as it
    is, so only its trials can be the best (see :attr:`RunState.best`).

    A bracket samples ``n`` whole-program configurations with the study's sampler (TPE by
    default, which learns from every earlier trial, so later brackets build on earlier ones),
    scores them on its first rung, ranks them (ties: rank at the previous rung, then sampling
    order) and promotes the top ``len // eta`` (at least one) to the next rung, until the
    survivors are scored on the whole validation set. A lone survivor goes straight to the last
    rung, since intermediate rungs could not change its fate. Promoted configurations are told
    to Optuna with their parameters (an enqueued trial), so the sampler sees the more accurate
    scores too. Brackets cycle Hyperband-style through first rungs 0, 1, ..., last: bracket
    ``b`` with ``h`` halvings samples ``ceil(max_configs * K / ((h + 1) * eta ** (K - 1 - h)))``
    configurations (``K`` rungs), fewer when that would not fit in the remaining LM-call budget
    (the cost is estimated from the calls per example seen so far). The plan of each bracket is
    stored in the study, so a resumed run repeats the bracket it was in and skips every trial
    already recorded for it.

    History: every trial has phase ``multifidelity``, ``round`` = its bracket, ``fidelity`` =
    its rung's number of examples and ``variant`` = its rung's caps (None on the last rung). A
    configuration the sampler proposes twice in one bracket is told again at no cost (a
    ``repeated`` trial) and does not take a place; pass ``sampler=RandomSampler(seed=...)`` for
    plain Hyperband.

    Why synchronous: Optuna's ``SuccessiveHalvingPruner`` and ``HyperbandPruner`` are
    asynchronous (ASHA) and decide inside one trial from its intermediate reports: a trial is
    promoted when it is in the top ``1 / eta`` of the trials that reached the rung before it, so
    with one worker the first trial at every rung is always promoted and early trials face
    little competition. Here a rung is finished before anyone is promoted, so promotion is a
    ranking of all the bracket's configurations on the same examples. No ``pruner`` is used.

    Why the caps are off by default: the budget counts logical LM calls, and fewer demos or a
    shorter output make calls cheaper in tokens and time, not in number; they do change the
    ranking (a cap of one demo makes demo sets that share their first demo equal, and a cut
    output may fail to parse). Turn them on when tokens or wall time are the constraint.

    The run ends after ``n_brackets`` brackets, when ``patience`` brackets in a row improve the
    best full-validation score by less than ``min_delta``, when the remaining budget cannot pay
    for a bracket that reaches the last rung, or when brackets stop finding new configurations.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        fidelities: Increasing fractions of the validation set in ``(0, 1]``, one per rung;
            ``1.0`` is appended when missing.
        eta: Promotion ratio: a rung keeps its best ``1 / eta``.
        max_demos: Per lower rung (every fidelity but the last), the most demos a stage keeps,
            or None for no cap; None: no caps.
        max_tokens: Per lower rung, the output-length cap in tokens, or None for no cap; None:
            no caps.
        max_configs: Configurations sampled by the widest bracket (default ``eta ** (K - 1)``).
        n_brackets: Upper bound on brackets (None: until the budget or patience ends the run).
        patience: Brackets in a row without an improvement of ``min_delta`` before stopping
            early (None: never).
        min_delta: Smallest improvement of the best validation score that counts as progress.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, sampler, storage, ...).
    """

    strategy_name = "multifidelity"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        fidelities: Sequence[float] = DEFAULT_FIDELITIES,
        eta: int = 3,
        max_demos: Sequence[int | None] | None = None,
        max_tokens: Sequence[int | None] | None = None,
        max_configs: int | None = None,
        n_brackets: int | None = None,
        patience: int | None = 4,
        min_delta: float = 0.005,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        self.fidelities = _check_fidelities(fidelities)
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
            raise ConfigurationError(f"`eta` must be an int >= 2, got {eta=}")
        lower = len(self.fidelities) - 1
        self.max_demos = _check_caps("max_demos", max_demos, lower, minimum=0)
        self.max_tokens = _check_caps("max_tokens", max_tokens, lower, minimum=1)
        if max_configs is not None and (isinstance(max_configs, bool) or max_configs < 1):
            raise ConfigurationError(f"`max_configs` must be >= 1 or None, got {max_configs=}")
        if n_brackets is not None and n_brackets < 1:
            raise ConfigurationError(f"`n_brackets` must be >= 1 or None (until the budget ends), got {n_brackets=}")
        check_early_stopping(patience, min_delta)
        self.eta = eta
        self.max_configs = max_configs
        self.n_brackets = n_brackets
        self.patience = patience
        self.min_delta = min_delta

    def rungs(self, n_val: int) -> list[Rung]:
        """The rungs for a validation set of ``n_val`` examples, smallest first, the full one last.

        Lower rungs whose size reaches ``n_val`` are dropped; of lower rungs with the same size,
        the later one (larger fraction, its caps) is kept.
        """
        rungs: list[Rung] = []
        for index, fraction in enumerate(self.fidelities[:-1]):
            size = max(1, math.ceil(fraction * n_val - 1e-9))
            if size >= n_val:
                break
            rung = Rung(size, self.max_demos[index], self.max_tokens[index])
            if rungs and rungs[-1].size == size:
                rungs[-1] = rung
            else:
                rungs.append(rung)
        rungs.append(Rung(n_val))
        return rungs

    def _search(self, state: RunState) -> tuple[str, str | None]:
        rungs = self.rungs(state.full_fidelity)
        stale = idle = 0
        bracket = 0
        while self.n_brackets is None or bracket < self.n_brackets:
            n, first = self._plan(state, bracket, rungs)
            before = state.best_before_round(PHASE, bracket)
            self._run_bracket(state, bracket, rungs, first, n)
            evaluated = sum(not r.repeated for r in state.trials_in(phase=PHASE, round=bracket))
            gain = state.best_before_round(PHASE, bracket + 1) - before
            idle = 0 if evaluated else idle + 1
            if idle >= MAX_IDLE_BRACKETS:
                return "completed", f"{idle} brackets in a row found only configurations scored before"
            stale = stale + 1 if gain < self.min_delta else 0
            if self.patience is not None and stale >= self.patience:
                return "early_stopped", (
                    f"{stale} brackets in a row improved the best score by less than min_delta={self.min_delta}"
                )
            bracket += 1
        return "completed", f"{self.n_brackets} brackets done"

    # ---- one bracket ---------------------------------------------------------------------------

    def _plan(self, state: RunState, bracket: int, rungs: list[Rung]) -> tuple[int, int]:
        """How many configurations bracket ``bracket`` samples and its first rung.

        Read from the study when the bracket was planned before (resume); otherwise sized now
        to fit in the remaining budget and stored. A bracket of one configuration starts at the
        last rung: a lower rung could not change its fate.
        """
        attr = _PLAN_ATTR.format(bracket)
        stored = state.study.user_attrs.get(attr)
        if stored is not None:
            return int(stored["n"]), int(stored["first_rung"])
        last = len(rungs) - 1
        first = bracket % len(rungs)
        widest = self.max_configs or self.eta**last
        halvings = last - first
        n = max(1, math.ceil(widest * len(rungs) / ((halvings + 1) * self.eta ** (last - halvings))))
        remaining = state.ledger.remaining_calls()
        if remaining is not None:
            per_example = state.calls_per_example or len(state.space.names())
            while n > 1 and self._cost(n, rungs, first) * per_example > remaining:
                n -= 1
            if self._cost(1, rungs, first) * per_example > remaining:
                raise StopSearch(
                    "budget_exhausted",
                    f"the {remaining} LM calls left cannot pay for a bracket that reaches the full validation set",
                )
        if n == 1:
            first = last
        state.study.set_user_attr(attr, {"n": n, "first_rung": first})
        return n, first

    def _cost(self, n: int, rungs: list[Rung], first: int) -> int:
        """Examples a bracket of ``n`` configurations starting at rung ``first`` scores at most."""
        last = len(rungs) - 1
        total, members, r = n * rungs[first].size, n, first
        while r < last:
            members = max(1, members // self.eta)
            r = last if members == 1 else r + 1
            total += members * rungs[r].size
        return total

    def _run_bracket(self, state: RunState, bracket: int, rungs: list[Rung], first: int, n: int) -> None:
        """Run one bracket, or on resume finish it: trials already recorded are not run again."""
        last = len(rungs) - 1
        distributions = state.space.all_distributions()
        base = state.space.default_config()

        # First rung: configurations from the sampler, distinct within the bracket. The sampler
        # may propose one already in the bracket (told again for free); after a few in a row,
        # or too many in all, the bracket makes do with the configurations it has.
        rung = rungs[first]
        members: list[TrialRecord] = []
        attempts = misses = 0
        records = iter(self._rung_records(state, bracket, rung))
        while len(members) < n and misses < MAX_REPEATS_IN_A_ROW and attempts < MAX_ATTEMPTS_PER_CONFIG * n:
            record = next(records, None)
            if record is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    trial = state.study.ask(distributions)
                record = self._score(state, config_from_params(trial.params, base), bracket, rung, trial)
            attempts += 1
            if any(config_key(m.params) == config_key(record.params) for m in members):
                misses += 1
            else:
                members.append(record)
                misses = 0

        # Promotions: the best 1/eta of each rung, ranked on the same examples.
        r = first
        while r < last:
            # With limits, a configuration that broke one at this rung ranks after every feasible one.
            ranked = sorted(range(len(members)), key=lambda i: (not members[i].feasible, -members[i].score, i))
            keep = max(1, len(members) // self.eta)
            survivors = [members[i].params for i in ranked[:keep]]
            r = last if keep == 1 else r + 1
            rung = rungs[r]
            done = {config_key(rec.params): rec for rec in self._rung_records(state, bracket, rung)}
            members = []
            for config in survivors:
                record = done.get(config_key(config))
                if record is None:
                    record = self._score(state, config, bracket, rung, self._ask_with(state, config, distributions))
                members.append(record)

    def _score(
        self, state: RunState, config: Config, bracket: int, rung: Rung, trial: optuna.trial.Trial
    ) -> TrialRecord:
        examples = state.valset[: rung.size]
        variant = rung.variant
        return state.run_trial(
            config,
            phase=PHASE,
            round=bracket,
            trial=trial,
            examples=examples,
            variant=variant,
            transform=rung.transform if variant is not None else None,
        )

    @staticmethod
    def _ask_with(
        state: RunState, config: Config, distributions: dict[str, optuna.distributions.BaseDistribution]
    ) -> optuna.trial.Trial:
        """A trial with ``config``'s parameters, so the sampler learns from the promoted score too."""
        params = {param_name(stage, knob): index for stage, choice in config.items() for knob, index in choice.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            state.study.enqueue_trial(params)
            return state.study.ask(distributions)

    @staticmethod
    def _rung_records(state: RunState, bracket: int, rung: Rung) -> list[TrialRecord]:
        return [r for r in state.trials_in(phase=PHASE, round=bracket) if r.fidelity == rung.size]


def _check_fidelities(fidelities: Sequence[float]) -> tuple[float, ...]:
    if isinstance(fidelities, str | bytes) or not isinstance(fidelities, Sequence) or not fidelities:
        raise ConfigurationError(f"`fidelities` must be a non-empty list of fractions in (0, 1], got {fidelities!r}")
    values: list[float] = []
    for value in fidelities:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 0 < value <= 1:
            raise ConfigurationError(f"`fidelities` values must be fractions in (0, 1], got {value!r}")
        if values and value <= values[-1]:
            raise ConfigurationError(f"`fidelities` must be strictly increasing, got {list(fidelities)!r}")
        values.append(float(value))
    if values[-1] != 1.0:
        values.append(1.0)
    return tuple(values)


def _check_caps(name: str, caps: Sequence[int | None] | None, lower: int, *, minimum: int) -> tuple[int | None, ...]:
    if caps is None:
        return (None,) * lower
    if isinstance(caps, str | bytes) or not isinstance(caps, Sequence) or len(caps) != lower:
        raise ConfigurationError(
            f"`{name}` must list one cap (int or None) per lower rung, {lower} in all, got {name}={caps!r}"
        )
    for cap in caps:
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < minimum):
            raise ConfigurationError(f"`{name}` caps must be ints >= {minimum} or None, got {cap!r}")
    return tuple(caps)

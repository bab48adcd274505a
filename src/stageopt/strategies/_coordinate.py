"""Coordinate descent: one stage at a time, the others frozen at the best so far, in rounds."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._allocation import (
    BlameAllocation,
    ProbeOutcome,
    allocation_note,
    remaining_calls,
    resolve_allocation,
    run_probes,
    split_by_share,
)
from stageopt.strategies._base import BaseStageOptimizer, RunState
from stageopt.strategies._space import config_from_params, param_name
from stageopt.strategies._state import TrialRequest

#: Sampled configurations tried per counted (not previously scored) trial before a stage gives up.
MAX_ATTEMPTS_PER_TRIAL = 3


class CoordinateDescent(BaseStageOptimizer):
    """Optimize each stage in turn with the other stages frozen at the best configuration so far.

    Each round visits the stages in program order; a stage gets ``trials_per_stage`` trials in
    which Optuna (ask/tell) proposes that stage's instruction and demo-set choice. The run ends
    after ``max_rounds`` rounds, when the budget cannot pay for another trial, or when
    ``patience`` consecutive rounds improve the best score by less than ``min_delta``. Each
    round's check is recorded in the result's ``notes["stopping"]["checks"]``.

    With ``allocate="blame"`` a probe phase first measures each stage's room for improvement
    on a validation subset (:mod:`~stageopt.strategies._allocation`); a round's trials are then
    split across stages in proportion to the stages' shares instead of equally. A round has as
    many trials in all as with equal allocation (the sum of the equal per-stage numbers), or
    as many as the calls left after the probes pay for when that is fewer; each stage gets at
    least one and at most its number of choices besides the original. Rounds visit the stages
    in decreasing share (ties in program order), so the most critical stage goes first. With
    ``reuse_probes``, a stage's first trial of round 1 is its best probe configuration when
    that one beat the original on the probe subset.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        max_rounds: Upper bound on rounds.
        trials_per_stage: Trials per stage per round (default: the stage's number of choices,
            capped at 6).
        min_delta: Smallest round improvement that counts as progress.
        patience: Rounds without progress before stopping early.
        allocate: ``"equal"`` (default) or ``"blame"``; a
            :class:`~stageopt.strategies.BlameAllocation` or a dict of its settings for blame
            with other probe settings.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, seed, storage, ...).
    """

    strategy_name = "coordinate"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        max_rounds: int = 3,
        trials_per_stage: int | None = None,
        min_delta: float = 0.005,
        patience: int = 1,
        allocate: str | BlameAllocation | Mapping[str, Any] = "equal",
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        if max_rounds < 1:
            raise ConfigurationError(f"`max_rounds` must be >= 1, got {max_rounds=}")
        if trials_per_stage is not None and trials_per_stage < 1:
            raise ConfigurationError(f"`trials_per_stage` must be >= 1 or None, got {trials_per_stage=}")
        if min_delta < 0:
            raise ConfigurationError(f"`min_delta` must be >= 0, got {min_delta=}")
        if patience < 1:
            raise ConfigurationError(f"`patience` must be >= 1, got {patience=}")
        self.max_rounds = max_rounds
        self.trials_per_stage = trials_per_stage
        self.min_delta = min_delta
        self.patience = patience
        self.allocation = resolve_allocation(allocate)
        self.allocate = "equal" if self.allocation is None else "blame"

    def _trials_for(self, state: RunState, stage: str) -> int:
        choices = len(list(state.space.stage_configs(stage)))
        if choices <= 1:
            return 0
        return min(self.trials_per_stage or 6, choices - 1)

    def _blame_targets(self, state: RunState, policy: BlameAllocation, outcome: ProbeOutcome) -> dict[str, int]:
        """Trials per stage per round, in proportion to the probe's shares."""
        stages = state.space.names()
        total = sum(self._trials_for(state, s) for s in stages)
        calls = remaining_calls(state, outcome)
        if calls is not None:
            cost = max(1, state.calls_needed(state.full_fidelity))
            total = min(total, max(1, calls // cost))
        caps = {s: len(list(state.space.stage_configs(s))) - 1 for s in stages}
        targets = split_by_share(total, outcome.shares, caps=caps, minimum=1)
        state.notes["allocation"] = allocation_note(policy, outcome, targets, unit="trials per stage per round")
        return targets

    def _search(self, state: RunState) -> tuple[str, str | None]:
        targets: dict[str, int] | None = None
        outcome: ProbeOutcome | None = None
        order = state.space.names()
        if self.allocation is not None:
            outcome = run_probes(state, self.allocation)
            targets = self._blame_targets(state, self.allocation, outcome)
            shares = outcome.shares
            order = sorted(order, key=lambda s: -shares[s])  # stable: ties keep program order
        checks: list[dict[str, Any]] = state.notes.setdefault("stopping_checks", [])
        stale = 0
        for round_no in range(1, self.max_rounds + 1):
            before = state.best.score if state.best else 0.0
            for stage in order:
                target = targets[stage] if targets is not None else self._trials_for(state, stage)
                # A sampled configuration scored before is told again for free and does not count
                # toward the stage's trials; attempts are capped so a small pool cannot loop forever.
                while True:
                    records = state.trials_in(phase="coordinate", stage=stage, round=round_no)
                    fresh = sum(1 for r in records if not r.repeated)
                    if fresh >= target or len(records) >= MAX_ATTEMPTS_PER_TRIAL * target:
                        break
                    base = state.best_config()
                    if round_no == 1 and not records and outcome is not None:
                        self._enqueue_probe_optimum(state, outcome, stage)
                    # Candidates asked together (parallel_trials > 1) are scored at once by the workers.
                    requests = []
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        for _ in range(max(1, min(self.parallel_trials, target - fresh))):
                            trial = state.study.ask(state.space.distributions(stage))
                            config = config_from_params(trial.params, base)
                            requests.append(TrialRequest(config, "coordinate", stage, round_no, trial))
                    state.run_trials(requests)
            after = state.best.score if state.best else 0.0
            gain = after - before
            stale = stale + 1 if gain < self.min_delta else 0
            stop = stale >= self.patience and round_no < self.max_rounds
            checks.append(
                {
                    "round": round_no,
                    "after_trial": max((r.trial for r in state.records), default=None),
                    "gain": round(gain, 6),
                    "min_delta": self.min_delta,
                    "stale_rounds": stale,
                    "patience": self.patience,
                    "decision": "stop" if stop else ("continue" if round_no < self.max_rounds else "done"),
                }
            )
            if stop:
                return "early_stopped", (
                    f"round {round_no} improved the best score by {gain:.4f} < min_delta={self.min_delta}"
                )
        return "completed", f"{self.max_rounds} rounds done"

    def _enqueue_probe_optimum(self, state: RunState, outcome: ProbeOutcome, stage: str) -> None:
        """Make the stage's best probe configuration its next trial (``reuse_probes``)."""
        best = outcome.best_configs.get(stage)
        if best is None or self.allocation is None or not self.allocation.reuse_probes:
            return
        waiting = state.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if waiting:  # a killed run left one: the next ask takes it
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            state.study.enqueue_trial({param_name(stage, k): i for k, i in best[stage].items()})

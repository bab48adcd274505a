"""Hierarchical BO: stage-wise phase on half the budget, then joint TPE warm-started with the stage optima."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._allocation import (
    BlameAllocation,
    allocation_note,
    remaining_calls,
    resolve_allocation,
    run_probes,
    split_by_share,
)
from stageopt.strategies._base import BaseStageOptimizer, RunState
from stageopt.strategies._independent import (
    DEFAULT_TRIALS_PER_STAGE,
    StagePlan,
    check_stage_settings,
    optimize_stages,
    search_calls,
    stage_trials,
)
from stageopt.strategies._joint import check_loop_settings, sampler_loop
from stageopt.strategies._space import Config, param_name


class HierarchicalBayesian(BaseStageOptimizer):
    """Hierarchical BO: each stage on its own first, then joint BO warm-started with the stage optima.

    Phase 1 (phase ``independent``) is the stage-wise search of
    :class:`~stageopt.strategies.IndependentStages`: each of the K stages, in program order,
    gets trials worth ``1/(2K)`` of the search budget (the ``lm_calls`` limit less what proposals
    and the baseline spent) at the baseline's cost per trial, at least one trial; each stage is
    optimized for its task-defined stage metric where it has one (the value Optuna is told),
    else for the end-to-end metric. Phase 1 thus spends about half of the search budget, less
    when stages stop early or run out of choices.

    Phase 2 (phase ``joint``) is joint Bayesian optimization over every stage's choices
    (:func:`~stageopt.strategies._joint.sampler_loop`, the study's multivariate TPE) until the
    budget, ``n_trials`` or ``patience`` ends it. Its first trial is the combination of the
    stage-wise optima, enqueued with ``study.enqueue_trial`` (in sequential mode that
    combination is the last stage's optimum, already scored, so it spends nothing). The
    sampler also learns from the phase-1 trials in the same study, each told its stage's
    objective (a stage metric where there is one, which then stands in for the end-to-end
    score). A resumed run recounts both phases from the stored history and enqueues nothing
    once phase 2 has begun (or while an enqueued trial still waits).

    With ``allocate="blame"`` a probe phase first measures each stage's room for improvement
    on a validation subset (:mod:`~stageopt.strategies._allocation`), and phase 1's budget
    (half of the calls left after the probes) is split across stages in proportion to their
    shares instead of ``1/(2K)`` each; with ``trials_per_stage`` set, the ``K *
    trials_per_stage`` phase-1 trials are split that way (each stage at least one).

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        trials_per_stage: Counted phase-1 trials per stage (default: from ``budget.lm_calls``
            as above; without an ``lm_calls`` limit, ``DEFAULT_TRIALS_PER_STAGE``). Capped by
            the stage's number of choices besides the original.
        stage_patience: Phase 1: counted trials in a row without a stage improvement of
            ``min_delta`` before the stage stops (None: never).
        n_trials: Phase 2: upper bound on counted joint trials (None: until the budget or
            patience ends the run).
        patience: Phase 2: joint trials in a row without an improvement of the best validation
            score by ``min_delta`` before stopping early (None: never).
        min_delta: Smallest improvement that counts as progress, in both phases.
        parallel: Phase 1 in parallel mode (every stage against the original program, waves
            evaluated concurrently; see :class:`~stageopt.strategies.IndependentStages`).
        allocate: ``"equal"`` (default) or ``"blame"``; a
            :class:`~stageopt.strategies.BlameAllocation` or a dict of its settings for blame
            with other probe settings.
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, stage_metrics, seed, ...).
    """

    strategy_name = "hierarchical"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        trials_per_stage: int | None = None,
        stage_patience: int | None = 4,
        n_trials: int | None = None,
        patience: int | None = 12,
        min_delta: float = 0.005,
        parallel: bool = False,
        allocate: str | BlameAllocation | Mapping[str, Any] = "equal",
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        if stage_patience is not None and stage_patience < 1:
            raise ConfigurationError(
                f"`stage_patience` must be >= 1 or None (no early stopping), got {stage_patience=}"
            )
        check_stage_settings(trials_per_stage, stage_patience, min_delta)
        check_loop_settings(n_trials, patience, min_delta)
        if not isinstance(parallel, bool):
            raise ConfigurationError(f"`parallel` must be True or False, got {parallel=}")
        self.trials_per_stage = trials_per_stage
        self.stage_patience = stage_patience
        self.n_trials = n_trials
        self.patience = patience
        self.min_delta = min_delta
        self.parallel = parallel
        self.allocation = resolve_allocation(allocate)
        self.allocate = "equal" if self.allocation is None else "blame"

    def _search(self, state: RunState) -> tuple[str, str | None]:
        stages = state.space.names()
        if self.allocation is not None:
            targets = self._blame_targets(state, self.allocation)
        else:
            calls = search_calls(state)
            per_stage = calls / (2 * len(stages)) if calls is not None else None
            targets = {s: stage_trials(state, s, calls=per_stage, fixed=self.trials_per_stage) for s in stages}
        plan = StagePlan("independent", targets, self.stage_patience, self.min_delta, self.parallel)
        combined = optimize_stages(state, plan)
        self._note_phase_one(state, targets)
        waiting = state.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if not state.trials_in(phase="joint") and not waiting:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                state.study.enqueue_trial(warm_start_params(combined), skip_if_exists=False)
        return sampler_loop(
            state, phase="joint", n_trials=self.n_trials, patience=self.patience, min_delta=self.min_delta
        )

    def _note_phase_one(self, state: RunState, targets: Mapping[str, int]) -> None:
        """Record in ``notes["stopping"]["checks"]`` which stages ended phase 1 before their plan."""
        checks = state.notes.setdefault("stopping_checks", [])
        for stage, target in targets.items():
            counted = sum(1 for r in state.trials_in(phase="independent", stage=stage) if not r.repeated)
            checks.append(
                {
                    "phase": "independent",
                    "stage": stage,
                    "planned": target,
                    "counted": counted,
                    "stage_patience": self.stage_patience,
                    "min_delta": self.min_delta,
                    "decision": "plan done" if counted >= target else "stopped early (stage_patience or repeats)",
                }
            )

    def _blame_targets(self, state: RunState, policy: BlameAllocation) -> dict[str, int]:
        """Phase-1 trials per stage, in proportion to the probe's shares."""
        outcome = run_probes(state, policy)
        stages = state.space.names()
        calls = remaining_calls(state, outcome)
        if self.trials_per_stage is not None or calls is None:
            each = self.trials_per_stage or DEFAULT_TRIALS_PER_STAGE
            caps = {s: len(list(state.space.stage_configs(s))) - 1 for s in stages}
            split = split_by_share(each * len(stages), outcome.shares, caps=caps, minimum=1)
            targets = {s: stage_trials(state, s, calls=None, fixed=split[s]) for s in stages}
            unit = "phase-1 trials per stage"
        else:
            phase1 = calls / 2
            targets = {s: stage_trials(state, s, calls=phase1 * outcome.shares[s], fixed=None) for s in stages}
            unit = "phase-1 trials per stage (from calls: half the budget left after the probes, by share)"
        state.notes["allocation"] = allocation_note(policy, outcome, targets, unit=unit)
        return targets


def warm_start_params(config: Config) -> dict[str, int]:
    """Optuna parameters (``stage.knob``) of a whole-program configuration, for ``enqueue_trial``."""
    return {param_name(stage, knob): index for stage, choice in config.items() for knob, index in choice.items()}

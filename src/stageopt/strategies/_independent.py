"""Decomposition: each stage optimized on its own (stage metric where defined), optima combined."""

from __future__ import annotations

import contextvars
import math
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._base import BaseStageOptimizer
from stageopt.strategies._checks import check_early_stopping
from stageopt.strategies._coordinate import MAX_ATTEMPTS_PER_TRIAL
from stageopt.strategies._result import TrialRecord
from stageopt.strategies._space import Config, config_from_params, config_key
from stageopt.strategies._state import RunState, ScoredConfig, StopSearch

#: Trials per stage when neither ``trials_per_stage`` nor an ``lm_calls`` budget sets the number.
DEFAULT_TRIALS_PER_STAGE = 6


@dataclass(frozen=True)
class StagePlan:
    """How a stage-wise phase runs (see :func:`optimize_stages`).

    Attributes:
        phase: Phase name stored with the phase's trials.
        targets: Counted (not previously scored) trials per stage.
        patience: Counted trials in a row without a stage improvement of ``min_delta`` before
            the stage stops early (None: never).
        min_delta: Smallest improvement of the stage objective that counts as progress.
        parallel: Optimize every stage against the original program, in concurrent waves.
    """

    phase: str
    targets: dict[str, int]
    patience: int | None
    min_delta: float
    parallel: bool


def check_stage_settings(trials_per_stage: int | None, patience: int | None, min_delta: float) -> None:
    """Raise a clear error for bad settings of a stage-wise phase."""
    if trials_per_stage is not None and trials_per_stage < 1:
        raise ConfigurationError(f"`trials_per_stage` must be >= 1 or None (from the budget), got {trials_per_stage=}")
    check_early_stopping(patience, min_delta)


def search_calls(state: RunState) -> int | None:
    """LM calls the search may spend: the ``lm_calls`` limit less what was spent up to the baseline.

    Computed from the stored baseline trial, so a resumed run plans the same way (None: no
    ``lm_calls`` limit).
    """
    limit = state.ledger.budget.lm_calls
    if limit is None:
        return None
    baseline = state.trials_in(phase="baseline")
    spent = baseline[0].lm_calls if baseline else state.ledger.usage().lm_calls
    return max(0, limit - spent)


def trial_cost(state: RunState) -> int:
    """Expected logical LM calls of one full-fidelity trial (at least 1)."""
    return max(1, state.calls_needed(state.full_fidelity))


def stage_trials(state: RunState, stage: str, *, calls: float | None, fixed: int | None) -> int:
    """Counted trials for one stage, never more than its choices besides the original.

    Args:
        state: The run.
        stage: The stage.
        calls: LM calls the stage may spend (None: no limit).
        fixed: A number set by the user, which wins over ``calls``.
    """
    candidates = state.space.stages[stage]
    choices = math.prod(candidates.size(knob) for knob in candidates.knobs())
    if fixed is not None:
        wanted = fixed
    elif calls is not None:
        wanted = max(1, int(calls // trial_cost(state)))
    else:
        wanted = DEFAULT_TRIALS_PER_STAGE
    return min(wanted, choices - 1)


def split_trials(calls: int, n_stages: int, cost: int) -> list[int]:
    """LM calls per stage that buy ``ceil(calls / cost)`` trials in all, spread evenly.

    Rounding up uses the whole budget: the planned trials overrun ``calls`` by less than one
    trial, so at most the last one is refused by the budget. Later stages get the extra trials.
    """
    total = math.ceil(calls / cost)
    base, extra = divmod(total, n_stages)
    return [cost * (base + (1 if i >= n_stages - extra else 0)) for i in range(n_stages)]


def stage_objective(state: RunState, stage: str) -> Callable[[TrialRecord], float]:
    """What a stage is optimized for: its task-defined stage metric, else the end-to-end score."""
    if stage in state.optimizer.stage_metrics:
        return lambda record: record.stage_metrics.get(stage, 0.0)
    return lambda record: record.score


def optimize_stages(state: RunState, plan: StagePlan) -> Config:
    """Run a stage-wise phase (or continue it on resume) and return the combination of stage optima.

    Sequential mode visits the stages in program order; stage ``s`` is scored with the stages
    before it at their stage-wise optima and the stages after it at their original setting.
    Parallel mode scores every stage against the original program, one trial per stage per
    wave, the waves' programs evaluated concurrently. Raises :class:`StopSearch` when the
    budget cannot pay for a trial.
    """
    combined = state.space.default_config()
    if plan.parallel:
        base = state.space.default_config()
        while active := [s for s in state.space.names() if not _stage_done(state, plan, s, base)]:
            _run_wave(state, plan, active, base)
        for stage in state.space.names():
            combined[stage] = stage_optimum(state, plan.phase, stage, base)[stage]
        return combined
    for stage in state.space.names():
        base = {s: dict(choice) for s, choice in combined.items()}
        objective = stage_objective(state, stage)
        while not _stage_done(state, plan, stage, base):
            trial = _ask(state, stage)
            config = config_from_params(trial.params, base)
            state.run_trial(config, phase=plan.phase, stage=stage, trial=trial, objective=objective)
        combined[stage] = stage_optimum(state, plan.phase, stage, base)[stage]
    return combined


def stage_optimum(state: RunState, phase: str, stage: str, base: Config) -> Config:
    """The best configuration for ``stage`` by its objective: ``base`` or one of its trials on ``base``.

    ``base`` itself (the stage at its original setting) is the incumbent and wins ties, then
    earlier trials win; a trial counts only when it was scored with the other stages as in
    ``base`` (after a resume with a larger budget, upstream optima can have moved). With
    limits, a feasible trial beats every infeasible one.
    """
    objective = stage_objective(state, stage)
    incumbent = _find(state, base)
    best_config = base
    best_value = (incumbent.feasible, objective(incumbent)) if incumbent is not None else (False, -math.inf)
    for record in _stage_records(state, phase, stage, base):
        value = (record.feasible, objective(record))
        if value > best_value:
            best_config, best_value = record.params, value
    return {s: dict(choice) for s, choice in best_config.items()}


def _find(state: RunState, config: Config) -> TrialRecord | None:
    """The first full-fidelity trial of ``config``, if it was scored."""
    key = config_key(config)
    for record in state.records:
        if record.fidelity == state.full_fidelity and record.variant is None and config_key(record.params) == key:
            return record
    return None


def _stage_records(state: RunState, phase: str, stage: str, base: Config) -> list[TrialRecord]:
    """Trials of ``stage`` in ``phase`` scored with every other stage as in ``base``."""
    others = [s for s in base if s != stage]
    return [
        r
        for r in state.trials_in(phase=phase, stage=stage)
        if all(config_key({s: r.params[s]}) == config_key({s: base[s]}) for s in others)
    ]


def _stage_done(state: RunState, plan: StagePlan, stage: str, base: Config) -> bool:
    """Whether ``stage`` has its trials, gave up on repeats, or stopped early (from the records)."""
    target = plan.targets[stage]
    records = _stage_records(state, plan.phase, stage, base)
    fresh = [r for r in records if not r.repeated]
    if len(fresh) >= target or len(records) >= MAX_ATTEMPTS_PER_TRIAL * target:
        return True
    if plan.patience is None:
        return False
    objective = stage_objective(state, stage)
    incumbent = _find(state, base)
    best = objective(incumbent) if incumbent is not None else -math.inf
    stale = 0
    for record in fresh:
        value = objective(record)
        stale = 0 if value - best >= plan.min_delta else stale + 1
        best = max(best, value)
    return stale >= plan.patience


def _ask(state: RunState, stage: str) -> optuna.trial.Trial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return state.study.ask(state.space.distributions(stage))


def _run_wave(state: RunState, plan: StagePlan, active: list[str], base: Config) -> None:
    """Ask one trial per active stage in stage order, evaluate them concurrently, record in order.

    Only as many trials as the budget can pay for are evaluated (the first ones in stage order);
    the others are failed and the search stops, so the history does not depend on thread timing.
    """
    wave = 1 + max((r.round or 0 for r in state.trials_in(phase=plan.phase)), default=0)
    asked = []
    for stage in active:
        trial = _ask(state, stage)
        asked.append((stage, trial, config_from_params(trial.params, base)))
    # The budget pays for the wave's new configurations in stage order, before any runs.
    cost, fresh_keys, paid = trial_cost(state), set[str](), 0
    stop: StopSearch | None = None
    for _, _, config in asked:
        key = config_key(config)
        if not state.recorded(config) and key not in fresh_keys:
            reason = state.ledger.exhausted_reason(calls_needed=cost * (len(fresh_keys) + 1))
            if reason is not None:
                stop = StopSearch("budget_exhausted", reason)
                break
            fresh_keys.add(key)
        paid += 1
    outcomes: dict[str, ScoredConfig | StopSearch]
    if state.executor is not None:  # a shared storage: the workers score the wave
        configs = {config_key(c): c for _, _, c in asked[:paid] if config_key(c) in fresh_keys}
        scored = state.evaluate_many(list(configs.values()), check_budget=False)
        outcomes = dict(zip(configs, scored, strict=True))
    else:
        outcomes = _run_threads(state, asked[:paid], fresh_keys)
    for stage, trial, config in asked[:paid]:
        outcome = outcomes.pop(config_key(config), None)
        if outcome is None:  # a configuration scored before, or earlier in this wave
            try:
                outcome = state.evaluate_config(config, desc=f"trial {trial.number}")
            except StopSearch as exc:
                outcome = exc
        if isinstance(outcome, StopSearch):
            state.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            stop = stop or outcome
            continue
        objective = stage_objective(state, stage)
        state.record_trial(trial, outcome, phase=plan.phase, stage=stage, round=wave, objective=objective)
    for _, trial, _ in asked[paid:]:
        state.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if stop is not None:
        raise stop


def _run_threads(
    state: RunState, asked: list[tuple[str, optuna.trial.Trial, Config]], fresh_keys: set[str]
) -> dict[str, ScoredConfig | StopSearch]:
    """Evaluate the wave's new configurations in threads, one per configuration."""
    jobs: dict[str, Future[ScoredConfig]] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(fresh_keys))) as pool:
        for _, trial, config in asked:
            key = config_key(config)
            if key in fresh_keys and key not in jobs:
                run = contextvars.copy_context().run
                jobs[key] = pool.submit(
                    run, state.evaluate_config, config, desc=f"trial {trial.number}", check_budget=False
                )
        return {key: _outcome(job) for key, job in jobs.items()}


def _outcome(job: Future[ScoredConfig]) -> ScoredConfig | StopSearch:
    try:
        return job.result()
    except StopSearch as exc:
        return exc


class IndependentStages(BaseStageOptimizer):
    """Decomposition: each stage optimized on its own, then the stage-wise optima combined.

    Stages are visited in program order. Stage ``s`` gets up to ``trials_per_stage`` trials in
    which Optuna (ask/tell) proposes only that stage's choices; the stages before it are at the
    stage-wise optima found so far and the stages after it at their original setting. A stage
    is optimized for its task-defined stage metric when ``stage_metrics`` has one (e.g.
    supporting-title recall of a query stage; this value is what Optuna is told), and for the
    end-to-end metric otherwise. A stage's optimum is its best trial by that objective, or the
    stage's original setting when no trial beats it. Finally the combination of the optima is
    scored end to end as one trial (phase ``combine``; in sequential mode it is the last
    stage's optimum, already scored, so it spends nothing). Like every strategy, the returned
    program is the best full-fidelity trial on validation by the end-to-end metric, which need
    not be the combination.

    Trials have phase ``independent`` with their ``stage``; in parallel mode ``round`` is the wave.
    A sampled configuration scored before is told again for free and does not count; a stage
    gives up after ``MAX_ATTEMPTS_PER_TRIAL`` samples per counted trial. A stage stops early
    when ``patience`` counted trials in a row improve its objective by less than ``min_delta``.
    A resumed run recounts each stage's trials from the stored history and continues.

    With ``parallel=True`` every stage is optimized against the original program (all other
    stages at their original setting), in waves: each wave asks one trial per unfinished stage
    in stage order, evaluates those programs in threads, then tells and records them in stage
    order, so a seed still gives the same history. A wave evaluates only the trials the budget
    can pay for (the first ones in stage order), then the run stops. The combination is then a
    new configuration, scored as the ``combine`` trial (its cost is set aside when planning).

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        trials_per_stage: Counted trials per stage (default: the search budget, i.e. the
            ``lm_calls`` limit less what proposals and the baseline spent, split evenly over
            the stages at the baseline's cost per trial, rounded up so that the whole budget
            is used (the last planned trial may be refused by the budget), at least 1; without
            an ``lm_calls`` limit, ``DEFAULT_TRIALS_PER_STAGE``). Always capped by the stage's
            number of choices besides the original.
        patience: Counted trials in a row without a stage improvement before the stage stops
            (None: never).
        min_delta: Smallest improvement of a stage objective that counts as progress.
        parallel: Optimize all stages at once against the original program (see above).
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, adapter, stage_metrics, seed, ...).
    """

    strategy_name = "independent"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        trials_per_stage: int | None = None,
        patience: int | None = 4,
        min_delta: float = 0.005,
        parallel: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        check_stage_settings(trials_per_stage, patience, min_delta)
        if not isinstance(parallel, bool):
            raise ConfigurationError(f"`parallel` must be True or False, got {parallel=}")
        self.trials_per_stage = trials_per_stage
        self.patience = patience
        self.min_delta = min_delta
        self.parallel = parallel

    def _search(self, state: RunState) -> tuple[str, str | None]:
        stages = state.space.names()
        calls = search_calls(state)
        if calls is not None and self.parallel:
            calls -= trial_cost(state)  # the combination is a new configuration: set its trial aside
        shares = split_trials(max(0, calls), len(stages), trial_cost(state)) if calls is not None else None
        targets = {
            s: stage_trials(state, s, calls=shares[i] if shares else None, fixed=self.trials_per_stage)
            for i, s in enumerate(stages)
        }
        plan = StagePlan("independent", targets, self.patience, self.min_delta, self.parallel)
        combined = optimize_stages(state, plan)
        if not state.trials_in(phase="combine"):
            state.run_trial(combined, phase="combine")
        return "completed", f"{len(stages)} stages optimized independently ({targets} trials planned), optima combined"

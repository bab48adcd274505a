"""The state of one run: its space, study, ledger and trials, and how a configuration is scored.

:class:`RunState` is what a strategy's ``_search`` receives. It scores configurations on the
validation set (or a prefix of it), records each as an Optuna trial with JSON-only attributes,
and keeps the best full-fidelity trial.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dspy
import optuna

from stageopt._errors import BudgetExhaustedError, ConfigurationError
from stageopt.evaluation import BudgetLedger, EvaluationReport, ModelPrice, evaluate
from stageopt.strategies._constraints import TrialMeasures, measure, set_constraints
from stageopt.strategies._racing import race
from stageopt.strategies._result import TrialRecord
from stageopt.strategies._space import Config, SearchSpace, config_key

if TYPE_CHECKING:
    from stageopt.strategies._base import BaseStageOptimizer

logger = logging.getLogger("stageopt.strategies._base")


class StopSearch(Exception):
    """Raised inside a search to end it; ``status`` is one of the result statuses."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class RunState:
    """Everything a search step needs: the space, the study, the ledger and the trials so far.

    A strategy may put JSON-ready entries in :attr:`notes`; they end up in the result's
    ``notes`` (``notes["stopping_checks"]``: a list of the early-stopping checks it made, which
    goes into ``notes["stopping"]["checks"]``). :attr:`measures` holds what each scored
    configuration cost per example, under the keys of :attr:`scores`. :attr:`executor` is set
    when the study is on a shared storage: evaluations then go through its job queue, where
    ``stageopt worker`` processes take them (see :mod:`stageopt.distributed`). :attr:`confirmset`
    holds the held-out examples the chosen configuration is confirmed on (never searched on).
    :attr:`example_scores` keeps each scored configuration's per-example scores (what Optuna is
    told as intermediate values, and what racing pairs on); :attr:`pruned` the configurations
    racing dropped, with the examples they were scored on (their entries in :attr:`scores` are
    the means over those).
    """

    optimizer: BaseStageOptimizer
    program: dspy.Module
    space: SearchSpace
    study: optuna.Study
    ledger: BudgetLedger
    valset: list[dspy.Example]
    lm: dspy.BaseLM
    records: list[TrialRecord] = field(default_factory=list)
    scores: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)
    measures: dict[str, TrialMeasures] = field(default_factory=dict)
    calls_per_example: float = 0.0
    bar: Any = None
    notes: dict[str, Any] = field(default_factory=dict)
    executor: Any = None
    confirmset: list[dspy.Example] = field(default_factory=list)
    example_scores: dict[str, tuple[float, ...]] = field(default_factory=dict)
    pruned: dict[str, int] = field(default_factory=dict)

    @property
    def full_fidelity(self) -> int:
        """Number of validation examples a full-fidelity trial is scored on."""
        return len(self.valset)

    @property
    def best(self) -> TrialRecord | None:
        """The best feasible full-fidelity trial so far (earliest among ties).

        Trials scored on a subset of the validation set or as a cheaper variant (multi-fidelity
        rungs) never count: the returned program is the best on the whole validation set. Nor
        do trials that broke the run's limits (``feasible=False``); None when no trial counts.
        """
        best: TrialRecord | None = None
        for record in self.records:
            if record.fidelity != self.full_fidelity or record.variant is not None or not record.feasible:
                continue
            if best is None or record.score > best.score:
                best = record
        return best

    def recorded(self, config: Config, examples: Sequence[dspy.Example] | None = None) -> bool:
        """Whether ``config`` was already scored on ``examples`` (default: the validation set)."""
        n = len(examples) if examples is not None else self.full_fidelity
        return f"{config_key(config)}@{n}" in self.scores

    def is_pruned(self, config: Config) -> bool:
        """Whether racing dropped ``config`` before it was scored on the whole validation set."""
        return f"{config_key(config)}@{self.full_fidelity}" in self.pruned

    def races(
        self,
        examples: Sequence[dspy.Example] | None,
        variant: str | None,
        objective: Callable[[TrialRecord], float] | None,
    ) -> bool:
        """Whether a trial scored this way is raced (see :mod:`stageopt.strategies._racing`).

        Only a trial on the whole validation set (``examples`` None), run as it is, told its
        score in a single-objective study, scored in this process: a trial told another value
        (a stage metric) or on a chosen subset (rungs, slices, probes) is judged another way.
        """
        return (
            self.optimizer.racing is not None
            and examples is None
            and variant is None
            and objective is None
            and self.executor is None
            and len(self.study.directions) == 1
            and self.full_fidelity > self.optimizer.racing.min_examples
        )

    def is_feasible(self, config: Config, examples: Sequence[dspy.Example] | None = None) -> bool:
        """Whether ``config``, scored on ``examples`` (default: the validation set), met the limits.

        True when the run has no limits or the configuration was not measured.
        """
        n = len(examples) if examples is not None else self.full_fidelity
        measures = self.measures.get(f"{config_key(config)}@{n}")
        limits = self.optimizer.limits
        if measures is None or limits is None or not limits.active:
            return True
        return not limits.violations(measures, self.space.names())

    def best_config(self) -> Config:
        """The best configuration so far, or the original program's."""
        best = self.best
        config = best.params if best is not None else self.space.default_config()
        return {stage: dict(choice) for stage, choice in config.items()}  # a copy: callers edit it

    def checkpoint_usage(self) -> None:
        """Store what the run has spent so far in the study, so a resumed run counts it.

        Trials store their usage themselves; call this after spending outside a trial (e.g.
        an LM mutation of an instruction). :meth:`BaseStageOptimizer.finish` calls it too.
        """
        self.study.set_user_attr("usage_latest", self.ledger.usage().to_dict())

    def best_before_round(self, phase: str, round_no: int) -> float:
        """Best feasible full-validation score of the trials outside ``phase`` and of its rounds before ``round_no``.

        Strategies that run in rounds (brackets, generations) compare it across rounds for
        patience; a resumed round counts the same as the first time it ran.
        """
        scores = [
            r.score
            for r in self.records
            if r.fidelity == self.full_fidelity
            and r.variant is None
            and r.feasible
            and (r.phase != phase or (r.round is not None and r.round < round_no))
        ]
        return max(scores, default=0.0)

    def trials_in(self, **attrs: Any) -> list[TrialRecord]:
        """Completed trials whose phase/stage/round equal ``attrs``."""
        return [r for r in self.records if all(getattr(r, k) == v for k, v in attrs.items())]

    def run_trial(
        self,
        config: Config,
        *,
        phase: str,
        stage: str | None = None,
        round: int | None = None,
        trial: optuna.trial.Trial | None = None,
        examples: Sequence[dspy.Example] | None = None,
        variant: str | None = None,
        transform: Callable[[dspy.Module], dspy.Module] | None = None,
        objective: Callable[[TrialRecord], float] | None = None,
    ) -> TrialRecord:
        """Score ``config`` and record it as a trial (asking Optuna for one when none is given).

        A configuration already scored on the same examples is told again with its known score
        and spends nothing. Raises :class:`StopSearch` when the budget cannot pay for the trial.
        The same as :meth:`evaluate_config` followed by :meth:`record_trial`.

        Args:
            config: The configuration to score.
            phase: Strategy phase, stored with the trial.
            stage: The stage this trial changes (None: all or none).
            round: Round or generation number, when the strategy has them.
            trial: The Optuna trial to tell (default: a new one).
            examples: Examples to score on (default: the validation set). Subsets must be
                prefixes of :attr:`valset`, so that equal sizes mean equal examples (paired).
            variant: Name of a cheaper way of running ``config`` (e.g. a multi-fidelity rung's
                demo and output-length caps); part of the repeat key, so it must name
                ``transform`` exactly. None: the configuration as it is.
            transform: Applied to the configured program before it runs (with ``variant``).
            objective: The value told to Optuna, computed from the record (default: its
                score); e.g. a stage metric. The record and :attr:`best` keep the score.
        """
        _check_variant(variant, transform)
        if trial is None:
            trial = self.study.ask()
        try:
            scored = self.evaluate_config(
                config,
                examples=examples,
                variant=variant,
                transform=transform,
                desc=f"trial {trial.number}",
                trial=trial if self.races(examples, variant, objective) else None,
            )
        except StopSearch:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        return self.record_trial(trial, scored, phase=phase, stage=stage, round=round, objective=objective)

    def evaluate_config(
        self,
        config: Config,
        *,
        examples: Sequence[dspy.Example] | None = None,
        variant: str | None = None,
        transform: Callable[[dspy.Module], dspy.Module] | None = None,
        desc: str = "trial",
        check_budget: bool = True,
        trial: optuna.trial.Trial | None = None,
    ) -> ScoredConfig:
        """Score ``config`` without recording a trial or telling Optuna (half of :meth:`run_trial`).

        For strategies that evaluate several configurations concurrently: threads call this
        for different configurations, then the caller records the results with
        :meth:`record_trial` in a fixed order, so a seed still gives the same history. The
        first evaluation of a run (it measures :attr:`calls_per_example`) must not be concurrent.

        Args:
            config, examples, variant, transform: As for :meth:`run_trial`.
            desc: Label of the progress bar.
            check_budget: Refuse up front when the budget cannot pay for an evaluation of this
                size; pass False when the caller checked the budget for a whole batch.
            trial: The Optuna trial to race on (see :meth:`races`): the configuration is
                scored slice by slice, each example's score reported to it, and dropped
                (``pruned``) once the study's pruner says it is worse than the best trial.

        Raises:
            StopSearch: ``budget_exhausted``, before the evaluation or when the budget ran out
                during it. Nothing is told to Optuna: the caller fails its trial.
        """
        _check_variant(variant, transform)
        examples = list(examples if examples is not None else self.valset)
        key = f"{config_key(config)}@{len(examples)}" + (f"#{variant}" if variant else "")
        if key in self.scores:
            score, stage_metrics = self.scores[key]
            return ScoredConfig(
                config,
                self.pruned.get(key, len(examples)),
                score,
                stage_metrics,
                repeated=True,
                variant=variant,
                measures=self.measures.get(key),
                example_scores=self.example_scores.get(key, ()),
                pruned=key in self.pruned,
            )
        if self.executor is not None and transform is None:
            outcome = self.evaluate_many([config], examples=examples, check_budget=check_budget)[0]
            if isinstance(outcome, StopSearch):
                raise outcome
            return outcome
        if check_budget:
            reason = self.ledger.exhausted_reason(calls_needed=self.calls_needed(len(examples)))
            if reason is not None:
                raise StopSearch("budget_exhausted", reason)
        racing = self.optimizer.racing
        try:
            if trial is not None and racing is not None and len(examples) == self.full_fidelity and transform is None:
                scored, pruned = race(self, config, trial, racing, desc)
                return self.remember(key, config, scored, variant=variant, pruned=pruned, reported=True)
            scored = self.scorer().score(config, len(examples), transform=transform, desc=desc)
        except BudgetExhaustedError as exc:
            raise StopSearch("budget_exhausted", str(exc)) from exc
        return self.remember(key, config, scored, variant=variant)

    def scorer(self) -> Scorer:
        """How this run scores a configuration (the same in a ``stageopt worker``)."""
        opt = self.optimizer
        return Scorer(
            program=self.program,
            space=self.space,
            valset=self.valset,
            lm=self.lm,
            ledger=self.ledger,
            metric=opt.metric,
            adapter=opt.adapter,
            stage_metrics=opt.stage_metrics,
            num_threads=opt.num_threads,
            max_errors=opt.max_errors,
            prices=opt.price_table(),
            progress=opt.progress,
        )

    def remember(
        self,
        key: str,
        config: Config,
        scored: Scored,
        *,
        variant: str | None = None,
        pruned: bool = False,
        reported: bool = False,
    ) -> ScoredConfig:
        """Keep a fresh evaluation's scores and measures under ``key``; the first one sets :attr:`calls_per_example`.

        ``pruned``: racing dropped it after ``scored.n`` examples; ``reported``: its
        per-example scores were already reported to the trial.
        """
        self.scores[key] = (scored.score, scored.stage_metrics)
        self.measures[key] = scored.measures
        if scored.example_scores:
            self.example_scores[key] = scored.example_scores
        if pruned:
            self.pruned[key] = scored.n
        if not self.calls_per_example and scored.n and not pruned:
            self.calls_per_example = scored.lm_calls / scored.n
        return ScoredConfig(
            config,
            scored.n,
            scored.score,
            scored.stage_metrics,
            repeated=False,
            variant=variant,
            measures=scored.measures,
            example_scores=scored.example_scores,
            pruned=pruned,
            reported=reported,
        )

    def evaluate_many(
        self,
        configs: Sequence[Config],
        *,
        examples: Sequence[dspy.Example] | None = None,
        check_budget: bool = True,
        trials: Sequence[optuna.trial.Trial | None] | None = None,
    ) -> list[ScoredConfig | StopSearch]:
        """Score several configurations at once; one outcome per configuration, in order.

        With a :attr:`executor` (a study on a shared storage), the new configurations are handed
        to ``stageopt worker`` processes together and this process works on them too; without
        one they are scored here one after another. A configuration the budget cannot pay for
        (counting the ones before it) gets a :class:`StopSearch` instead of a score, as does every
        one after the budget ran out. Repeats (scored before, or earlier in ``configs``) are free.
        ``trials``: one per configuration (or None) to race on when scored here (see
        :meth:`evaluate_config`).
        """
        examples = list(examples if examples is not None else self.valset)
        if self.executor is None:
            outcomes: list[ScoredConfig | StopSearch] = []
            for config, trial in zip(configs, trials or [None] * len(configs), strict=True):
                try:
                    outcomes.append(
                        self.evaluate_config(config, examples=examples, check_budget=check_budget, trial=trial)
                    )
                except StopSearch as stop:
                    outcomes.append(stop)
            return outcomes
        return self.executor.evaluate_many(self, list(configs), len(examples), check_budget=check_budget)

    def run_trials(self, requests: Sequence[TrialRequest]) -> list[TrialRecord]:
        """Score several configurations at once (:meth:`evaluate_many`) and record them in order.

        Each request's trial is asked now when it has none. Raises :class:`StopSearch` after
        recording the ones that were scored when the budget could not pay for the others
        (their trials fail).
        """
        asked = [(r, r.trial if r.trial is not None else self.study.ask()) for r in requests]
        raced = self.races(None, None, None)
        outcomes = self.evaluate_many([r.config for r, _ in asked], trials=[t if raced else None for _, t in asked])
        records: list[TrialRecord] = []
        stop: StopSearch | None = None
        for (request, trial), outcome in zip(asked, outcomes, strict=True):
            if isinstance(outcome, StopSearch):
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                stop = stop or outcome
                continue
            records.append(
                self.record_trial(trial, outcome, phase=request.phase, stage=request.stage, round=request.round)
            )
        if stop is not None:
            raise stop
        return records

    def calls_needed(self, n_examples: int) -> int:
        """Logical LM calls an evaluation on ``n_examples`` is expected to need (at least 1)."""
        return int(self.calls_per_example * n_examples) if self.calls_per_example else 1

    def record_trial(
        self,
        trial: optuna.trial.Trial,
        scored: ScoredConfig,
        *,
        phase: str,
        stage: str | None = None,
        round: int | None = None,
        objective: Callable[[TrialRecord], float] | None = None,
    ) -> TrialRecord:
        """Tell ``trial`` the result of :meth:`evaluate_config` and add it to :attr:`records`.

        Call from the thread that drives the study, in a deterministic order. The record's
        ``lm_calls``/``tokens``/``wall_s`` are the run's usage at this moment; its
        ``objectives`` are what the evaluation cost per example, checked against the
        optimizer's limits (``feasible``, ``violations``; the constraint values go to Optuna).
        The value told is ``objective(record)``, else the optimizer's
        :meth:`~stageopt.strategies.BaseStageOptimizer.trial_values` (the score, or one value
        per objective for a multi-objective study).

        Args:
            trial: The Optuna trial ``scored`` was asked for.
            scored: What :meth:`evaluate_config` returned.
            phase, stage, round, objective: As for :meth:`run_trial`.
        """
        usage = self.ledger.usage()
        limits, measures = self.optimizer.limits, scored.measures
        violations: list[str] = []
        constraints: dict[str, float] | None = None
        if limits is not None and limits.active and measures is not None:
            violations = limits.violations(measures, self.space.names())
            constraints = limits.constraints(measures, self.space.names())
        record = TrialRecord(
            trial=trial.number,
            phase=phase,
            stage=stage,
            round=round,
            params=scored.config,
            fidelity=scored.fidelity,
            score=scored.score,
            stage_metrics=scored.stage_metrics,
            lm_calls=usage.lm_calls,
            tokens=usage.tokens,
            wall_s=round_s(usage.wall_s),
            repeated=scored.repeated,
            variant=scored.variant,
            objectives=measures.to_dict() if measures is not None else None,
            feasible=not violations,
            violations=violations,
            pruned=scored.pruned,
        )
        for name, value in record.to_dict().items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("usage", usage.to_dict())
        trial.set_user_attr("calls_per_example", self.calls_per_example)
        if constraints is not None:
            set_constraints(trial, constraints)
        if not scored.reported and len(self.study.directions) == 1:
            # Per-example scores as intermediate values: what racing pairs a later candidate with.
            for index, value in enumerate(scored.example_scores):
                trial.report(value, index)
        if scored.pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, objective(record) if objective is not None else self.optimizer.trial_values(record))
        self.records.append(record)
        if self.bar is not None:
            best = self.best
            self.bar.n = min(usage.lm_calls, self.bar.total or usage.lm_calls)
            self.bar.set_postfix(
                trial=record.trial, score=f"{record.score:.3f}", best=f"{best.score:.3f}" if best else "none feasible"
            )
        logger.info(
            "trial %d (%s %s) score %.4f%s%s, %d calls so far",
            record.trial,
            phase,
            stage or "",
            record.score,
            f" on {record.fidelity} of {self.full_fidelity} examples (pruned)" if record.pruned else "",
            "" if record.feasible else f" (infeasible: {'; '.join(record.violations)})",
            usage.lm_calls,
        )
        return record


@dataclass(frozen=True)
class ScoredConfig:
    """A configuration scored by :meth:`RunState.evaluate_config`, not yet recorded as a trial.

    Attributes:
        config: The configuration.
        fidelity: Number of validation examples it was scored on.
        score: Mean validation score.
        stage_metrics: Task-defined stage metric means.
        repeated: True when the score was known (no calls were spent).
        variant: The cheaper way it was run, None: as is.
        measures: What the evaluation cost per example (None: not measured, e.g. a score
            restored from a run that did not measure).
        example_scores: Per-example scores in validation order (empty: not known).
        pruned: Racing dropped it after ``fidelity`` examples.
        reported: The per-example scores were reported to the trial already (while racing).
    """

    config: Config
    fidelity: int
    score: float
    stage_metrics: dict[str, float]
    repeated: bool
    variant: str | None = None
    measures: TrialMeasures | None = None
    example_scores: tuple[float, ...] = ()
    pruned: bool = False
    reported: bool = False


def _check_variant(variant: str | None, transform: Callable[[dspy.Module], dspy.Module] | None) -> None:
    if (variant is None) != (transform is None):
        raise ConfigurationError("`variant` and `transform` go together: name every transform")


def round_s(seconds: float) -> float:
    """Seconds rounded to milliseconds."""
    return round(seconds, 3)


@dataclass(frozen=True)
class TrialRequest:
    """A configuration :meth:`RunState.run_trials` is to score and record as a trial.

    Attributes:
        config: The configuration.
        phase, stage, round: Stored with the trial (as for :meth:`RunState.run_trial`).
        trial: The Optuna trial to tell (None: a new one is asked).
    """

    config: Config
    phase: str
    stage: str | None = None
    round: int | None = None
    trial: optuna.trial.Trial | None = None


@dataclass(frozen=True)
class Scored:
    """One evaluation of a configuration: its scores, its cost per example and the calls it made.

    ``example_scores`` are the per-example scores in order (empty when only the mean came back,
    e.g. from a ``stageopt worker``).
    """

    score: float
    stage_metrics: dict[str, float]
    measures: TrialMeasures
    lm_calls: int
    n: int
    example_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class Scorer:
    """What scoring a configuration needs, the same in a run and in a ``stageopt worker``.

    Attributes:
        program: The original program (configurations are applied to a copy).
        space: The candidate pools configurations index into.
        valset: Validation examples; an evaluation on ``n`` examples takes the first ``n``.
        lm: The (metered) task LM; ``ledger`` is what it charges.
        metric, adapter, stage_metrics, num_threads, max_errors, progress: As for
            :func:`~stageopt.evaluation.evaluate`.
        prices: Prices by model name for the measured cost per example.
    """

    program: dspy.Module
    space: SearchSpace
    valset: list[dspy.Example]
    lm: dspy.BaseLM
    ledger: BudgetLedger
    metric: Callable[..., float]
    adapter: dspy.Adapter | None
    stage_metrics: dict[str, Callable[..., float]]
    num_threads: int
    max_errors: int | None
    prices: dict[str, ModelPrice]
    progress: bool = False

    def score(
        self,
        config: Config,
        n: int,
        *,
        transform: Callable[[dspy.Module], dspy.Module] | None = None,
        desc: str = "trial",
    ) -> Scored:
        """Evaluate ``config`` on the first ``n`` validation examples.

        Raises:
            BudgetExhaustedError: when the budget ran out before or during the evaluation.
            EvaluationError: when more examples failed than ``max_errors`` allows.
        """
        return self.summarise([self.run(config, 0, n, transform=transform, desc=desc)])

    def run(
        self,
        config: Config,
        start: int,
        stop: int,
        *,
        transform: Callable[[dspy.Module], dspy.Module] | None = None,
        desc: str = "trial",
    ) -> EvaluationReport:
        """Evaluate ``config`` on validation examples ``start`` to ``stop`` (a slice of a race).

        ``max_errors`` applies to this slice. Raises as :meth:`score`.
        """
        program = self.space.apply(self.program, config)
        if transform is not None:
            program = transform(program)
        return evaluate(
            program,
            self.valset[start:stop],
            self.metric,
            lm=self.lm,
            adapter=self.adapter,
            stage_metrics=self.stage_metrics,
            ledger=self.ledger,
            num_threads=self.num_threads,
            max_errors=self.max_errors,
            progress=self.progress,
            desc=desc,
        )

    def summarise(self, reports: Sequence[EvaluationReport]) -> Scored:
        """One :class:`Scored` for consecutive slices' reports (their examples in order)."""
        examples = [e for report in reports for e in report.examples]
        scores = tuple(float(e.score) for e in examples)
        if len(reports) == 1:
            stage_metrics = dict(reports[0].stage_metrics)
        else:
            stage_metrics = {}
            for name in self.stage_metrics:
                values = [e.stage_metrics[name] for e in examples if name in e.stage_metrics]
                stage_metrics[name] = statistics.fmean(values) if values else 0.0
        return Scored(
            statistics.fmean(scores) if scores else 0.0,
            stage_metrics,
            measure(examples, self.prices),
            sum(report.usage.lm_calls for report in reports),
            len(examples),
            scores,
        )

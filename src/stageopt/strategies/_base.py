"""Shared machinery of every strategy: data split, proposals, budget, trials, resume, result.

A strategy subclasses :class:`BaseStageOptimizer` and implements :meth:`_search`, which calls
:meth:`RunState.run_trial` for each configuration it wants scored. Everything a run needs to
resume lives in the Optuna storage: the candidate pools and usage in the study's user
attributes, each trial's configuration, score and cumulative usage in its user attributes.
"""

from __future__ import annotations

import abc
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import dspy
import optuna
from dspy.teleprompt.teleprompt import Teleprompter

from stageopt._errors import BudgetExhaustedError, ConfigurationError
from stageopt.distributed import RunLease, SharedBudgetLedger, check_shared, is_shared_storage, mask_url, open_storage
from stageopt.evaluation import Budget, BudgetLedger, ExampleResult, MeteredLM, ModelPrice, Usage, evaluate
from stageopt.proposers import (
    BaseDemoProposer,
    BaseInstructionProposer,
    BootstrapDemoProposer,
    LMInstructionProposer,
    ProposalContext,
)
from stageopt.strategies._checks import check_metric
from stageopt.strategies._confirm import check_choice, hold_for_confirmation, split_examples
from stageopt.strategies._constraints import Limits, TrialMeasures, constraints_func, limits_note
from stageopt.strategies._racing import Racing, racing_note, resolve_racing
from stageopt.strategies._result import OptimizationResult, TrialRecord
from stageopt.strategies._space import SearchSpace, config_key, validate_models, validate_settings
from stageopt.strategies._state import RunState, StopSearch
from stageopt.strategies._warmstart import WarmStart, plan_warm_start, resolve_warm_start, run_warm_start

logger = logging.getLogger(__name__)

ExampleMetric = Callable[[dspy.Example, dspy.Prediction], float]

#: An Optuna study direction.
Direction = Literal["minimize", "maximize"]


class BaseStageOptimizer(Teleprompter, abc.ABC):
    """Base of every stageopt optimizer: a DSPy ``Teleprompter`` driving Optuna by ask/tell.

    Args:
        metric: DSPy metric ``metric(example, prediction, trace=None) -> float``.
        budget: A :class:`Budget`, or an int for a budget of logical LM calls.
        lm: Task LM (default: DSPy's configured LM).
        prompt_lm: LM that proposes instructions (default: the task LM).
        adapter: Adapter the program runs with (default: DSPy's configured adapter).
        stage_metrics: Task-defined per-stage metrics, by stage name.
        demo_proposer: Where demo sets come from (default: :class:`BootstrapDemoProposer`).
        instruction_proposer: Where instructions come from (default: :class:`LMInstructionProposer`).
        bootstrap_size: Training examples run to collect traces for proposals.
        val_size: Validation examples each trial is scored on (a seeded sample).
        confirm_size: Held-out examples (from the validation pool, never searched on) the chosen
            program and the original are compared on before the choice is returned; at most half
            the pool. 0 or None: no confirmation (the validation winner is returned as it is).
        confidence: Level of the one-sided lower bound of the paired gain on the confirmation
            examples; the choice is returned only when that bound is above 0, otherwise the
            original program, with status ``no_significant_gain`` (see :mod:`~stageopt.strategies._confirm`).
        racing: How candidates scored on the whole validation set are raced: slice by slice,
            dropped once Optuna's ``WilcoxonPruner`` finds them worse than the best trial on the
            same examples (a :class:`~stageopt.strategies.Racing`; True: its defaults; False:
            every candidate scored on every example). Applies to validation sets larger than
            ``min_examples``; see :mod:`~stageopt.strategies._racing`.
        seed: Seed of the sampler, data split and proposers.
        sampler: Optuna sampler (default ``TPESampler(multivariate=True, group=True, seed=seed)``).
        storage: Optuna storage URL or object (default: SQLite in ``run_dir``, else in memory).
        study_name: Optuna study name (default: the strategy name).
        run_dir: Folder for the SQLite study (created when missing).
        num_threads: Examples evaluated in parallel.
        max_errors: Failing examples tolerated per evaluation.
        threshold: Score at which a trace counts as a success for bootstrapping.
        progress: Show progress bars.
        settings: Setting knobs to search per stage besides instructions and demos, each a list
            of choices, e.g. ``{"temperature": [0.0, 0.7], "module": ["predict", "cot"]}``; knobs
            ``temperature``, ``n_demos``, ``module``, ``model`` (see :mod:`~stageopt.strategies._space`).
            Each stage's original setting is always choice 0. A resumed run keeps its stored choices.
        models: LMs by name for the ``model`` knob (its choices are these names); calls are metered.
        limits: What the returned program may cost per example (tokens, dollars, p95 latency,
            prompt size per stage; see :class:`~stageopt.strategies.Limits`). Trials that break
            a limit are recorded as infeasible and never returned; a run where none is feasible
            ends with status ``infeasible`` and returns the original program.
        warm_start: Seed the search with the best configurations of an earlier run: a
            :class:`~stageopt.strategies.WarmStart`, or ``"RUN_DIR_OR_STORAGE_URL[::STUDY]"``.
            They are re-expressed in this run's pools (stages matched by name and signature)
            and scored right after the baseline (see :mod:`~stageopt.strategies._warmstart`).
        parallel_trials: Trials a strategy may have scored at once. With a shared ``storage``
            (a PostgreSQL URL), every evaluation becomes a job of the study's queue that
            ``stageopt worker`` processes (and this one) take, and the budget is kept in the
            database; above 1 it needs such a storage. See :mod:`stageopt.distributed`.
        worker_context: JSON data stored with the study for the workers (the CLI stores how to
            rebuild the task and LMs; API users rebuild them themselves).
    """

    strategy_name = "base"

    #: Early-stopping settings a strategy may have, reported in ``notes["stopping"]``.
    STOPPING_SETTINGS = ("patience", "stage_patience", "min_delta", "max_rounds", "n_trials", "n_generations")

    def __init__(
        self,
        metric: Callable[..., float],
        *,
        budget: Budget | int,
        lm: dspy.BaseLM | None = None,
        prompt_lm: dspy.BaseLM | None = None,
        adapter: dspy.Adapter | None = None,
        stage_metrics: Mapping[str, ExampleMetric] | None = None,
        demo_proposer: BaseDemoProposer | None = None,
        instruction_proposer: BaseInstructionProposer | None = None,
        bootstrap_size: int = 16,
        val_size: int | None = 20,
        confirm_size: int | None = 20,
        confidence: float = 0.9,
        racing: Racing | bool = True,
        seed: int = 0,
        sampler: optuna.samplers.BaseSampler | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str | None = None,
        run_dir: str | Path | None = None,
        num_threads: int = 1,
        max_errors: int | None = None,
        threshold: float = 0.5,
        progress: bool = False,
        settings: Mapping[str, Sequence[Any]] | None = None,
        models: Mapping[str, dspy.BaseLM] | None = None,
        limits: Limits | None = None,
        warm_start: WarmStart | str | Path | None = None,
        parallel_trials: int = 1,
        worker_context: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_metric(metric)
        self.metric = metric
        if isinstance(budget, bool) or not isinstance(budget, Budget | int):
            raise TypeError(f"`budget` must be a Budget or an int of LM calls, got {budget!r}")
        self.budget = budget if isinstance(budget, Budget) else Budget(lm_calls=budget)
        self.lm = lm
        self.prompt_lm = prompt_lm
        self.adapter = adapter
        self.stage_metrics = dict(stage_metrics or {})
        self.demo_proposer = demo_proposer or BootstrapDemoProposer()
        self.instruction_proposer = instruction_proposer or LMInstructionProposer()
        for name, value in (("bootstrap_size", bootstrap_size), ("num_threads", num_threads)):
            if value < 1:
                raise ConfigurationError(f"`{name}` must be >= 1, got {name}={value}")
        if val_size is not None and val_size < 1:
            raise ConfigurationError(f"`val_size` must be >= 1 or None, got {val_size=}")
        if confirm_size is not None and (isinstance(confirm_size, bool) or confirm_size < 0):
            raise ConfigurationError(f"`confirm_size` must be >= 0 or None, got {confirm_size=}")
        if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 <= confidence < 1.0:
            raise ConfigurationError(f"`confidence` must be a number in [0.5, 1), got {confidence=}")
        self.bootstrap_size = bootstrap_size
        self.val_size = val_size
        self.confirm_size = confirm_size or 0
        self.confidence = float(confidence)
        self.racing = resolve_racing(racing)
        self.seed = seed
        self.sampler = sampler
        self.storage = storage
        self.study_name = study_name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.num_threads = num_threads
        self.max_errors = max_errors
        self.threshold = threshold
        self.progress = progress
        self.models = validate_models(models)
        self.settings = validate_settings(settings, self.models)
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"`limits` must be a stageopt.strategies.Limits or None, got {limits!r}")
        self.limits = limits
        self.warm_start = resolve_warm_start(warm_start)
        if isinstance(parallel_trials, bool) or not isinstance(parallel_trials, int) or parallel_trials < 1:
            raise ConfigurationError(f"`parallel_trials` must be an int >= 1, got {parallel_trials=}")
        if parallel_trials > 1:
            check_shared(_storage_url(storage), what=f"parallel_trials={parallel_trials}")
        self.parallel_trials = parallel_trials
        self.worker_context = dict(worker_context or {})
        self.result: OptimizationResult | None = None

    # ---- the one method strategies implement ----------------------------------------------

    @abc.abstractmethod
    def _search(self, state: RunState) -> tuple[str, str | None]:
        """Called once per :meth:`compile`, after the baseline trial, to run the search.

        Scores configurations with ``state.run_trial``; on resume, ``state.records`` already
        holds the finished trials and the search must continue without redoing them. Returns
        ``(status, reason)``; raising :class:`StopSearch` ends the run with that status.
        """

    # ---- DSPy's contract -------------------------------------------------------------------

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Optimize a copy of ``student``; the result is in :attr:`result` afterwards.

        On a shared storage, raises :class:`~stageopt.RunInProgressError` while another run of the study is live.
        """
        if not trainset:
            raise ConfigurationError("`trainset` is empty: give at least one training example")
        program = student.deepcopy()
        self.check_stages(program)
        task_lm = self.lm or dspy.settings.lm
        if task_lm is None:
            raise ConfigurationError("no LM: pass lm= to the optimizer or configure one with dspy.context")
        boot, val, confirmset = self.split_confirm(trainset, valset)
        study = self.open_study()
        from stageopt.distributed._worker import HEARTBEAT_S

        url = _storage_url(self.storage)
        if url is None or not is_shared_storage(url):
            return self._run(program, study, boot, val, task_lm, None, confirmset)
        jobs_storage = open_storage(url, heartbeat_interval=HEARTBEAT_S)
        # One live run per shared study: a second one is refused here, before anything is proposed or scored.
        with RunLease.open(url, study.study_name, strategy=self.strategy_name, heartbeat_s=HEARTBEAT_S):
            return self._run(program, study, boot, val, task_lm, jobs_storage, confirmset)

    def _run(
        self,
        program: dspy.Module,
        study: optuna.Study,
        boot: list[dspy.Example],
        val: list[dspy.Example],
        task_lm: dspy.BaseLM,
        jobs_storage: optuna.storages.RDBStorage | None,
        confirmset: list[dspy.Example] | None = None,
    ) -> dspy.Module:
        """The rest of :meth:`compile`, once the study is open (and leased, on a shared storage)."""
        ledger: BudgetLedger
        if jobs_storage is not None:
            ledger = SharedBudgetLedger(jobs_storage, key=study.study_name, budget=self.budget)
        else:
            ledger = BudgetLedger(self.budget, spent=self.stored_usage(study))
        lm = MeteredLM(task_lm, ledger)
        space = self.load_or_propose(program, study, boot, lm, ledger)
        state = RunState(self, program, space, study, ledger, val, lm, confirmset=list(confirmset or []))
        if jobs_storage is not None:
            state.executor = self.open_queue(state, jobs_storage)
        self.restore(state)
        plan_warm_start(state, self.warm_start)
        if self.progress:
            from tqdm.auto import tqdm

            state.bar = tqdm(total=self.budget.lm_calls, desc=f"{self.strategy_name} (LM calls)", unit="call")
            state.bar.n = ledger.usage().lm_calls
        status, reason = "completed", None
        try:
            if not state.trials_in(phase="baseline"):
                state.run_trial(space.default_config(), phase="baseline", trial=self.baseline_trial(state))
            hold_for_confirmation(state)
            run_warm_start(state)
            status, reason = self._search(state)
        except StopSearch as stop:
            status, reason = stop.status, stop.reason
        finally:
            if state.bar is not None:
                state.bar.close()
            if state.executor is not None:
                state.executor.queue.finish()
        return self.finish(state, status, reason)

    def open_queue(self, state: RunState, storage: optuna.storages.BaseStorage) -> Any:
        """The job queue of a study on a shared storage, with the spec workers rebuild from.

        Called by :meth:`compile` after the candidates are proposed (or loaded): a worker
        started earlier waits for the spec, then takes jobs.
        """
        from stageopt.distributed._queue import JobQueue
        from stageopt.distributed._worker import DistributedExecutor, make_spec

        queue = JobQueue(storage, state.study.study_name)
        queue.set_spec(make_spec(state, self.worker_context))
        url = mask_url(str(_storage_url(self.storage)))
        logger.info("study %r on %s: evaluations go to its job queue %r", state.study.study_name, url, queue.name)
        return DistributedExecutor(queue)

    def check_stages(self, program: dspy.Module) -> None:
        """Refuse stage metrics for stages the program does not have."""
        names = [name for name, _ in program.named_predictors()]
        if not names:
            raise ConfigurationError("the program has no stages: named_predictors() is empty")
        unknown = [s for s in self.stage_metrics if s not in names]
        if unknown:
            raise ConfigurationError(f"stage_metrics names unknown stage(s) {unknown}; the stages are {names}")
        if self.limits is not None:
            self.limits.check_stages(names)

    def split(
        self, trainset: list[dspy.Example], valset: list[dspy.Example] | None
    ) -> tuple[list[dspy.Example], list[dspy.Example]]:
        """Examples to bootstrap from and examples to validate on (disjoint when derived)."""
        boot, val, _ = self.split_confirm(trainset, valset)
        return boot, val

    def split_confirm(
        self, trainset: list[dspy.Example], valset: list[dspy.Example] | None
    ) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
        """Bootstrap, validation and confirmation examples.

        The validation pool is ``valset``, or the training examples left after the bootstrap
        ones. ``confirm_size`` of it (at most half) are set aside for confirmation, chosen by
        the seed; validation is then sampled from the rest (``val_size``).
        """
        return split_examples(
            trainset,
            valset,
            seed=self.seed,
            bootstrap_size=self.bootstrap_size,
            val_size=self.val_size,
            confirm_size=self.confirm_size,
        )

    def default_sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler used when none is given: multivariate TPE, seeded (strategies may override).

        With limits it is constrained: it reads each trial's constraint values (see
        :mod:`~stageopt.strategies._constraints`).
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                multivariate=True,
                group=True,
                seed=self.seed,
                n_startup_trials=4,
                constraints_func=constraints_func(self.limits),
                constant_liar=self.parallel_trials > 1,  # trials asked together differ
            )

    def directions(self) -> list[Direction]:
        """The study's optimization directions: one ``"maximize"`` (the score) unless overridden."""
        return ["maximize"]

    def trial_values(self, record: TrialRecord) -> float | list[float]:
        """What Optuna is told for ``record`` when the strategy gives no objective: its score."""
        return record.score

    def price_table(self) -> dict[str, ModelPrice]:
        """Prices for measured costs: the limits' prices, under the names calls report.

        A price given for a name of ``models`` also prices that LM's own model name.
        """
        prices = dict(self.limits.prices) if self.limits is not None else {}
        for name, lm in self.models.items():
            model = getattr(lm, "model", None)
            if name in prices and isinstance(model, str):
                prices.setdefault(model, prices[name])
        return prices

    def baseline_trial(self, state: RunState) -> optuna.trial.Trial | None:
        """The Optuna trial the baseline is told as (None, the default: a new one without parameters).

        Called once, before the baseline trial, when the study has none. A strategy whose
        sampler needs every trial to carry the whole search space's parameters (NSGA-II infers
        its search space from the intersection of the trials') returns a trial of the original
        configuration's parameters.
        """
        return None

    def select(self, state: RunState) -> TrialRecord | None:
        """The trial whose configuration :meth:`compile` returns: the best feasible one.

        Called once by :meth:`finish`; None: no trial is feasible (the original program is returned).
        """
        return state.best

    def open_study(self) -> optuna.Study:
        """Create or load the study (SQLite in ``run_dir`` by default)."""
        storage = self.storage
        if isinstance(storage, str) and is_shared_storage(storage):
            storage = open_storage(storage, heartbeat_interval=None)
        if storage is None and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            storage = f"sqlite:///{(self.run_dir / 'optuna.db').resolve()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = self.sampler or self.default_sampler()
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            return optuna.create_study(
                storage=storage,
                study_name=self.study_name or self.strategy_name,
                directions=self.directions(),
                sampler=sampler,
                pruner=self.racing.pruner() if self.racing is not None else None,
                load_if_exists=True,
            )

    @staticmethod
    def stored_usage(study: optuna.Study) -> Usage:
        """What earlier runs of this study spent (for resume)."""
        latest: dict[str, Any] = dict(study.user_attrs.get("usage_after_proposals", {}))
        checkpoint = study.user_attrs.get("usage_latest")
        if checkpoint and checkpoint.get("lm_calls", 0) >= latest.get("lm_calls", 0):
            latest = dict(checkpoint)
        for trial in study.get_trials(deepcopy=False, states=_FINISHED):
            usage = trial.user_attrs.get("usage")
            if usage and usage.get("lm_calls", 0) >= latest.get("lm_calls", 0):
                latest = usage
        return Usage(**latest) if latest else Usage()

    def load_or_propose(
        self,
        program: dspy.Module,
        study: optuna.Study,
        boot: list[dspy.Example],
        lm: MeteredLM,
        ledger: BudgetLedger,
    ) -> SearchSpace:
        """The candidate pools: from the study when resuming, else proposed now and stored."""
        models = {name: MeteredLM(model, ledger) for name, model in self.models.items()}
        if "space" in study.user_attrs:
            return SearchSpace.from_dict(study.user_attrs["space"], models=models)
        space = SearchSpace.initial(program, settings=self.settings, models=models)
        notes = self.propose(program, space, study, boot, lm, ledger)
        study.set_user_attr("space", space.to_dict())
        study.set_user_attr("proposal_notes", _jsonable(notes))
        study.set_user_attr("usage_after_proposals", ledger.usage().to_dict())
        return space

    def propose(
        self,
        program: dspy.Module,
        space: SearchSpace,
        study: optuna.Study,
        boot: list[dspy.Example],
        lm: MeteredLM,
        ledger: BudgetLedger,
    ) -> dict[str, Any]:
        """Add proposed demo sets and instructions to ``space`` (a new run only); return the proposal notes.

        The default bootstraps traces on ``boot`` and asks the demo and instruction proposers;
        a strategy that learns something else from the traces overrides this (``study`` is there
        for what it stores beside the space).
        """
        prompt_lm = MeteredLM(self.prompt_lm, ledger) if self.prompt_lm is not None else lm
        notes: dict[str, Any] = {}
        try:
            traces = self.bootstrap_traces(program, boot, lm, ledger)
            context = ProposalContext(
                lm=lm,
                prompt_lm=prompt_lm,
                adapter=self.adapter,
                ledger=ledger,
                traces=traces,
                trainset=boot,
                seed=self.seed,
                threshold=self.threshold,
                notes=notes,
            )
            with dspy.context(lm=lm, **({"adapter": self.adapter} if self.adapter else {})):
                demos = self.demo_proposer.propose(program, context)
                instructions = self.instruction_proposer.propose(program, context)
        except BudgetExhaustedError as exc:
            raise ConfigurationError(
                f"the budget ({self.budget.to_dict()}) ran out while proposing candidates: {exc}; "
                "raise the budget or lower bootstrap_size"
            ) from exc
        for name, candidates in space.stages.items():
            candidates.demo_sets.extend(demos.get(name, []))
            candidates.instructions.extend(instructions.get(name, []))
        return notes

    def bootstrap_traces(
        self,
        program: dspy.Module,
        boot: list[dspy.Example],
        lm: MeteredLM,
        ledger: BudgetLedger,
        *,
        adapter: dspy.Adapter | None = None,
    ) -> list[ExampleResult]:
        """Run ``program`` on the bootstrap examples with traces kept (what proposals learn from).

        Every example may fail (``max_errors=len(boot)``); raises
        :class:`~stageopt.BudgetExhaustedError` when the budget runs out.
        """
        return evaluate(
            program,
            boot,
            self.metric,
            lm=lm,
            adapter=adapter or self.adapter,
            stage_metrics=self.stage_metrics,
            ledger=ledger,
            num_threads=self.num_threads,
            max_errors=len(boot),
            progress=self.progress,
            desc="bootstrap",
            capture_traces=True,
        ).examples

    def restore(self, state: RunState) -> None:
        """Load finished trials into ``state`` and fail trials a killed run left running."""
        for trial in state.study.get_trials(deepcopy=False):
            if trial.state == optuna.trial.TrialState.RUNNING:
                state.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            elif trial.state in _FINISHED and "phase" in trial.user_attrs:
                attrs = trial.user_attrs
                known = set(TrialRecord.__dataclass_fields__)
                record = TrialRecord(**{k: v for k, v in attrs.items() if k in known})
                state.records.append(record)
                # A pruned trial stands for its configuration on the whole validation set.
                size = state.full_fidelity if record.pruned else record.fidelity
                key = f"{config_key(record.params)}@{size}" + (f"#{record.variant}" if record.variant else "")
                state.scores[key] = (record.score, record.stage_metrics)
                if record.pruned:
                    state.pruned[key] = record.fidelity
                if trial.intermediate_values:
                    state.example_scores[key] = tuple(v for _, v in sorted(trial.intermediate_values.items()))
                if record.objectives is not None:
                    state.measures[key] = TrialMeasures.from_dict(record.objectives)
                state.calls_per_example = attrs.get("calls_per_example", state.calls_per_example)
        if state.records:
            logger.info("resuming: %d finished trials found in the study", len(state.records))

    def finish(self, state: RunState, status: str, reason: str | None) -> dspy.Module:
        """Build :attr:`result` and return the best program found on validation."""
        state.checkpoint_usage()
        baseline = next(iter(state.trials_in(phase="baseline")), None)
        best = self.select(state)
        if best is None and state.records and self.limits is not None and self.limits.active:
            status, reason = "infeasible", self.infeasible_reason(state, status, reason)
            logger.warning("%s", reason)
        confirmation = self.confirmation(state, best, baseline)
        search_status, search_reason = status, reason
        if confirmation is not None and not confirmation.get("confirmed") and best is not baseline:
            status, reason, best = "no_significant_gain", confirmation["reason"], baseline
            logger.warning("no significant gain: %s", reason)
        best_config = best.params if best is not None else state.space.default_config()
        self.result = OptimizationResult(
            strategy=self.strategy_name,
            seed=self.seed,
            budget=self.budget.to_dict(),
            usage=state.ledger.usage().to_dict(),
            baseline={
                "score": baseline.score if baseline else None,
                "stage_metrics": baseline.stage_metrics if baseline else {},
                "n": len(state.valset),
                "objectives": baseline.objectives if baseline else None,
                "feasible": baseline.feasible if baseline else None,
            },
            best={
                "score": best.score if best else None,
                "stage_metrics": best.stage_metrics if best else {},
                "params": state.space.describe(best_config),
                "trial": best.trial if best else None,
                "objectives": best.objectives if best else None,
                "feasible": best is not None,
            },
            history=[r.to_dict() for r in sorted(state.records, key=lambda r: r.trial)],
            status=status,
            stop_reason=reason,
            confirmation=confirmation,
            candidates={
                name: {"instructions": len(c.instructions), "demo_sets": len(c.demo_sets)}
                for name, c in state.space.stages.items()
            },
            notes={
                **(
                    {"limits": limits_note(self.limits, state.records, state.full_fidelity)}
                    if self.limits is not None
                    else {}
                ),
                "proposals": state.study.user_attrs.get("proposal_notes", {}),
                **{k: v for k, v in state.notes.items() if k != "stopping_checks"},
                "racing": racing_note(self.racing, state.records, state.full_fidelity),
                "stopping": self.stopping_note(state, search_status, search_reason),
                **(
                    {"distributed": {"parallel_trials": self.parallel_trials, **state.executor.queue.summary()}}
                    if state.executor is not None
                    else {}
                ),
            },
        )
        # The returned program runs on the caller's LMs, not on this run's metered copies.
        return state.space.apply(state.program, best_config, models=self.models)

    def confirmation(
        self, state: RunState, best: TrialRecord | None, baseline: TrialRecord | None
    ) -> dict[str, Any] | None:
        """What confirming ``best`` against ``baseline`` on the held-out examples found (see :func:`check_choice`).

        Called once by :meth:`finish`; a strategy that returns something else than its best
        validation trial may override it.
        """
        return check_choice(state, best, baseline)

    def infeasible_reason(self, state: RunState, status: str, reason: str | None) -> str:
        """Why a run with limits found nothing to return: the limits, the nearest miss, how it ended."""
        full = [r for r in state.records if r.fidelity == state.full_fidelity and r.variant is None]
        nearest = min(full or state.records, key=lambda r: (len(r.violations), -r.score, r.trial))
        return (
            f"no configuration met the limits ({len(full)} scored on the full validation set); "
            f"the nearest, trial {nearest.trial}, broke: {'; '.join(nearest.violations) or 'nothing measured'}. "
            f"The search ended {status}" + (f" ({reason})" if reason else "") + ". The original program is returned: "
            "relax the limits, or widen the search space (e.g. fewer demos, shorter instructions)"
        )

    def stopping_note(self, state: RunState, status: str, reason: str | None) -> dict[str, Any]:
        """Where and why the run stopped: ``notes["stopping"]`` of the result.

        ``after_trial`` is the last trial before the decision (``lm_calls`` the calls spent
        then); ``settings`` the strategy's early-stopping settings; ``checks`` the checks the
        strategy recorded in ``state.notes["stopping_checks"]``, when it records them.
        """
        last = max(state.records, key=lambda r: r.trial, default=None)
        note: dict[str, Any] = {
            "status": status,
            "reason": reason,
            "after_trial": last.trial if last else None,
            "lm_calls": last.lm_calls if last else None,
            "settings": {k: getattr(self, k) for k in self.STOPPING_SETTINGS if hasattr(self, k)},
        }
        if "stopping_checks" in state.notes:
            note["checks"] = list(state.notes["stopping_checks"])
        return _jsonable(note)


_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _storage_url(storage: str | optuna.storages.BaseStorage | None) -> str | None:
    """The URL of a storage given as a URL or an ``RDBStorage`` (None for other storages)."""
    if storage is None or isinstance(storage, str):
        return storage
    url = getattr(storage, "url", None)
    return url if isinstance(url, str) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)

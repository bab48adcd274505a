"""The differentiable path: per-stage soft prompts or LoRA adapters trained with torch toward end-to-end success.

:class:`SoftPrompt` runs the program on the bootstrap examples with the run's LM, keeps each
chosen stage's (prompt, target) pairs from traces whose final answer scored well (and gold
labels, for stages whose outputs are labels), and trains, per stage, ``n`` virtual-token
embeddings (prompt tuning) or a LoRA adapter of a torch copy of the model
(:mod:`stageopt.lm._torch`). After every epoch the whole program, its trained stages on
:class:`~stageopt.lm.TorchLM`, is scored on the validation set and recorded as a trial (phase
``train``, round = epoch, ``objectives`` holding ``train_loss`` and ``lr``), so the history, the
report and the convergence diagnostics show the curves. Early stopping watches the validation
score; the best epoch's parameters are kept.

Budget: every training forward pass is one logical LM call and its tokens; validation calls
go through the usual meter. Wall time is in the usage as for every strategy.

End to end (experimental, ``end_to_end=True``): for consecutive trained stages where one's
output is inserted verbatim in the next one's prompt, the final stage's loss also reaches the
upstream state through straight-through Gumbel-softmax samples of the upstream output
(:func:`~stageopt.strategies._softprompt_train.chain_loss`). Retrieval between stages (HotpotQA's
``query2`` -> ``answer``) is a hard boundary: no chain crosses it, and ``notes["softprompt"]``
lists such boundaries. A stage with no target of its own (no trace succeeded and its output is
no label, e.g. GSM8K's ``plan``) is trained in this mode through its chains alone
(``notes["softprompt"]["chain_only"]``); the stage-wise mode leaves it as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy
import optuna

from stageopt._errors import BudgetExhaustedError, ConfigurationError
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM, evaluate
from stageopt.lm._adapter import SmallLMAdapter
from stageopt.lm._torch import LoraState, SoftPromptState, StageState, TorchModel, load_torch_model, require_torch
from stageopt.lm._torch_io import attach
from stageopt.lm._torch_lm import TorchLM
from stageopt.strategies._base import BaseStageOptimizer
from stageopt.strategies._constraints import TrialMeasures, measure
from stageopt.strategies._softprompt_schedule import TrainingSchedule
from stageopt.strategies._softprompt_train import (
    TARGET_SOURCES,
    PairSet,
    Trainer,
    epoch_items,
    fits,
    train_epoch,
    training_pairs,
)
from stageopt.strategies._space import SearchSpace
from stageopt.strategies._state import RunState, ScoredConfig, StopSearch

logger = logging.getLogger(__name__)

#: The phase of the per-epoch trials.
TRAIN_PHASE = "train"

#: Study attribute holding the training pairs (JSON), written once after bootstrapping.
PAIRS_ATTR = "softprompt.pairs"

#: Learning rate by method when none is given.
DEFAULT_LR = {"prompt": 3e-2, "lora": 1e-3}


@dataclass(frozen=True)
class EpochMeasures(TrialMeasures):
    """An epoch's validation measures plus its training loss and learning rate (the record's ``objectives``)."""

    epoch: int = 0
    train_loss: float = 0.0
    lr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready measures with ``epoch``, ``train_loss`` and ``lr``."""
        return {**super().to_dict(), "epoch": self.epoch, "train_loss": self.train_loss, "lr": self.lr}


class SoftPrompt(BaseStageOptimizer):
    """Learn a soft prompt or LoRA adapter per stage with torch optimizers (see the module docstring).

    Args:
        metric: DSPy metric.
        budget: Logical LM calls (training forward passes count one each) or a Budget.
        stages: Stages to train (default: all).
        method: ``prompt`` (``n_virtual_tokens`` learned embeddings) or ``lora`` (a ``peft`` adapter).
        n_virtual_tokens: Virtual tokens per stage for ``prompt``; they start as the embeddings of
            the stage's instruction tokens (random tokens when it has none).
        lora_r: LoRA rank for ``lora``.
        model: Torch model (embedded name or local Hugging Face folder; default: the run's
            embedded model).
        end_to_end: Also train through chains of stages (experimental; see the module docstring).
        gumbel_tau: Gumbel-softmax temperature of the end-to-end mode.
        targets: Training targets: ``both`` (default), ``bootstrapped`` (successful traces'
            own outputs only) or ``labeled`` (gold labels only).
        schedule: How training runs and stops (optimizer, learning rate, epochs, batch size,
            clipping, patience): a :class:`~stageopt.strategies.TrainingSchedule`, a mapping of
            some of its fields (``{"epochs": 5, "lr": 0.01}``; CLI: ``--option schedule.epochs=5``),
            or None for the defaults. A schedule without ``lr`` gets the method's default rate
            (3e-2 for ``prompt``, 1e-3 for ``lora``).
        **kwargs: The settings of :class:`~stageopt.strategies.BaseStageOptimizer`; the adapter
            must be a :class:`~stageopt.lm.SmallLMAdapter` (training renders its layout).
    """

    strategy_name = "softprompt"

    #: The :class:`TrainingSchedule` fields that decide when training stops (the epochs, the patience
    #: on validation, the learning-rate schedule), reported in ``notes["stopping"]["settings"]``.
    STOPPING_SETTINGS = ("epochs", "patience", "min_delta", "lr", "warmup_ratio", "batch_size")

    def __init__(
        self,
        metric: Callable[..., float],
        *,
        budget: Budget | int,
        stages: Sequence[str] | None = None,
        method: str = "prompt",
        n_virtual_tokens: int = 8,
        lora_r: int = 4,
        model: str | None = None,
        end_to_end: bool = False,
        gumbel_tau: float = 1.0,
        targets: str = "both",
        schedule: TrainingSchedule | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        # Trained stages live outside the configuration space, so the held-out confirmation
        # (which rebuilds programs from configurations) cannot check them yet: none is held out.
        self.confirm_size = 0
        require_torch()
        if stages is not None and (
            isinstance(stages, str) or not stages or not all(isinstance(s, str) and s for s in stages)
        ):
            raise ConfigurationError(f"`stages` must be a non-empty list of stage names or None, got {stages!r}")
        if method not in DEFAULT_LR:
            raise ConfigurationError(f"`method` must be 'prompt' or 'lora', got {method=}")
        for name, value in (("n_virtual_tokens", n_virtual_tokens), ("lora_r", lora_r)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"`{name}` must be an int >= 1, got {name}={value!r}")
        if not gumbel_tau > 0:
            raise ConfigurationError(f"`gumbel_tau` must be positive, got {gumbel_tau=}")
        if targets not in TARGET_SOURCES:
            raise ConfigurationError(f"`targets` must be one of {TARGET_SOURCES}, got {targets=}")
        if schedule is None:
            schedule = TrainingSchedule()
        elif isinstance(schedule, Mapping):
            schedule = TrainingSchedule.from_dict(schedule)
        elif not isinstance(schedule, TrainingSchedule):
            raise ConfigurationError(
                f"`schedule` must be a TrainingSchedule, a mapping of its fields or None, got {schedule!r}"
            )
        if self.parallel_trials != 1:
            raise ConfigurationError("softprompt trains in this process: `parallel_trials` must be 1")
        self.stages = list(stages) if stages is not None else None
        self.method = method
        self.n_virtual_tokens = n_virtual_tokens
        self.lora_r = lora_r
        #: The training schedule, its ``lr`` resolved (never None): what training uses and records.
        self.schedule = schedule.with_default_lr(DEFAULT_LR[method])
        self.model = model
        self.end_to_end = bool(end_to_end)
        self.gumbel_tau = gumbel_tau
        self.targets = targets
        self._best: tuple[int, dict[str, Any]] | None = None
        self._base: TorchModel | None = None
        self._max_tokens = 128

    # ---- checks and data --------------------------------------------------------------------

    def check_stages(self, program: dspy.Module) -> None:
        """Also refuse unknown ``stages`` and an adapter whose layout training cannot render."""
        super().check_stages(program)
        names = [name for name, _ in program.named_predictors()]
        unknown = [s for s in self.stages or [] if s not in names]
        if unknown:
            raise ConfigurationError(f"`stages` names unknown stage(s) {unknown}; the stages are {names}")
        adapter = self.adapter or dspy.settings.adapter
        if not isinstance(adapter, SmallLMAdapter):
            raise ConfigurationError(
                "softprompt trains on the prompts of stageopt's SmallLMAdapter: pass adapter=SmallLMAdapter() "
                f"(CLI: --adapter small); got {type(adapter).__name__ if adapter else 'none'}"
            )

    def trained_stages(self, program: dspy.Module) -> list[str]:
        """The stages to train, in program order."""
        names = [name for name, _ in program.named_predictors()]
        return [n for n in names if self.stages is None or n in self.stages]

    def propose(
        self,
        program: dspy.Module,
        space: SearchSpace,
        study: optuna.Study,
        boot: list[dspy.Example],
        lm: MeteredLM,
        ledger: BudgetLedger,
    ) -> dict[str, Any]:
        """Bootstrap traces on ``boot`` and store the training pairs; the space stays the program as it is."""
        adapter = self.adapter or dspy.settings.adapter
        assert isinstance(adapter, SmallLMAdapter)  # check_stages ran first
        try:
            traces = self.bootstrap_traces(program, boot, lm, ledger, adapter=adapter)
        except BudgetExhaustedError as exc:
            raise ConfigurationError(
                f"the budget ({self.budget.to_dict()}) ran out while bootstrapping: {exc}; "
                "raise the budget or lower bootstrap_size"
            ) from exc
        found = training_pairs(
            program,
            traces,
            boot,
            adapter,
            stages=self.trained_stages(program),
            threshold=self.threshold,
            targets=self.targets,
        )
        study.set_user_attr(PAIRS_ATTR, found.to_dict())
        return {"softprompt": found.summary()}

    # ---- training ---------------------------------------------------------------------------

    def model_name(self, state: RunState) -> str:
        """The torch model: ``model``, else the embedded model the run's LM runs."""
        if self.model is not None:
            return self.model
        inner = state.lm.inner if isinstance(state.lm, MeteredLM) else state.lm
        engine = getattr(inner, "engine", None)
        for name in (
            getattr(getattr(engine, "spec", None), "name", None),
            getattr(getattr(engine, "base", None), "name", None),
        ):
            if isinstance(name, str):
                return name
        raise ConfigurationError(
            f"softprompt needs a torch model: the run's LM {getattr(inner, 'model', inner)!r} is not an embedded "
            "model; pass model='gemma3-270m' or a local Hugging Face folder (CLI: --option model=...)"
        )

    def new_state(self, base: TorchModel, predictor: dspy.Predict) -> StageState:
        """A fresh trainable state for one stage."""
        if self.method == "lora":
            return LoraState(base, r=self.lora_r)
        instruction = predictor.signature.instructions or ""
        return SoftPromptState.initial(base, self.n_virtual_tokens, text=instruction, seed=self.seed)

    def _search(self, state: RunState) -> tuple[str, str | None]:
        import torch

        if state.executor is not None:
            raise ConfigurationError("softprompt trains in this process; it cannot use a shared job queue (storage)")
        if state.trials_in(phase=TRAIN_PHASE):
            raise ConfigurationError(
                "a softprompt run cannot be resumed (the learned tensors of unfinished runs are not kept); "
                "start a new run directory"
            )
        self._best = None
        found = PairSet.from_dict(state.study.user_attrs.get(PAIRS_ATTR) or {})
        note: dict[str, Any] = {
            "method": self.method,
            "model": self.model_name(state),
            **found.summary(),
            "epochs": [],
            "end_to_end": self.end_to_end,
            "schedule": self.schedule.to_dict(),
        }
        state.notes["softprompt"] = note
        base = self._base = load_torch_model(note["model"])
        predictors = dict(state.program.named_predictors())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            states: dict[str, StageState] = {}
            pairs = {}
            for stage in self.trained_stages(state.program):
                n_virtual = self.n_virtual_tokens if self.method == "prompt" else 0
                usable = [p for p in found.pairs.get(stage, []) if fits(base, p, n_virtual)]
                if not usable:
                    logger.warning("stage %r has no training pair that fits; it is not trained", stage)
                    continue
                pairs[stage] = usable
                states[stage] = self.new_state(base, predictors[stage])
            chains: list[Any] = []
            if self.end_to_end:
                # A stage without targets of its own (no trace succeeded, its output is no label) is
                # still trained when its output feeds a trained stage: the chain loss is its only signal.
                wanted = self.trained_stages(state.program)
                for chain in found.chains:
                    if chain.downstream in states and chain.upstream not in states and chain.upstream in wanted:
                        states[chain.upstream] = self.new_state(base, predictors[chain.upstream])
                        note.setdefault("chain_only", []).append(chain.upstream)
                chains = [c for c in found.chains if c.upstream in states and c.downstream in states]
            note["trained"] = [s for s in self.trained_stages(state.program) if s in states]
            if not states:
                return "completed", "no training pairs: no trace scored >= threshold and no stage output is a label"
            rng = random.Random(self.seed)
            plan = self.schedule
            assert plan.lr is not None  # resolved in __init__
            steps = len(epoch_items(pairs, chains, batch_size=plan.batch_size, rng=random.Random(0)))
            trainer = Trainer(
                [p for s in states.values() for p in s.parameters()],
                optimizer=plan.optimizer,
                lr=plan.lr,
                weight_decay=plan.weight_decay,
                total_steps=max(2, plan.epochs * steps),
                warmup_ratio=plan.warmup_ratio,
                grad_clip=plan.grad_clip,
            )
            lms = {stage: self.stage_lm(state, base, s) for stage, s in states.items()}
            return self._epochs(state, base, states, lms, pairs, chains, trainer, rng)

    def _epochs(
        self,
        state: RunState,
        base: TorchModel,
        states: dict[str, StageState],
        lms: dict[str, TorchLM],
        pairs: dict[str, Any],
        chains: list[Any],
        trainer: Trainer,
        rng: random.Random,
    ) -> tuple[str, str | None]:
        ledger, plan = state.ledger, self.schedule

        def charge(prompt_tokens: int, target_tokens: int) -> None:
            ledger.reserve()
            ledger.record(prompt_tokens=prompt_tokens, completion_tokens=target_tokens, cached=False)

        best_score, watched, since = -math.inf, -math.inf, 0
        checks: list[dict[str, Any]] = state.notes.setdefault("stopping_checks", [])
        for epoch in range(1, plan.epochs + 1):
            start, lr = time.perf_counter(), trainer.lr
            items = epoch_items(pairs, chains, batch_size=plan.batch_size, rng=rng)
            try:
                stats = train_epoch(base, states, items, trainer, charge, tau=self.gumbel_tau)
            except BudgetExhaustedError as exc:
                raise StopSearch("budget_exhausted", f"{exc} (training epoch {epoch})") from exc
            train_s = time.perf_counter() - start
            record, report_s = self._validate(state, lms, epoch, stats.mean_loss, lr)
            state.notes["softprompt"]["epochs"].append(
                {
                    "epoch": epoch,
                    "trial": record.trial,
                    "train_loss": stats.losses,
                    "mean_loss": stats.mean_loss,
                    "val_score": record.score,
                    "lr": lr,
                    "steps": stats.steps,
                    "forward_passes": stats.forward_passes,
                    "max_grad_norm": stats.max_grad_norm,
                    "train_s": round(train_s, 3),
                    "wall_s": round(train_s + report_s, 3),
                }
            )
            if record.score > best_score:
                best_score = record.score
                self._best = (record.trial, {stage: s.state_dict() for stage, s in states.items()})
            improved = record.score > watched + plan.min_delta
            watched, since = (record.score, 0) if improved else (watched, since + 1)
            checks.append({"epoch": epoch, "score": record.score, "improved": improved, "epochs_without": since})
            if plan.patience is not None and since >= plan.patience:
                return "early_stopped", f"no validation improvement in {since} epoch(s) (patience={plan.patience})"
        return "completed", None

    def _validate(
        self, state: RunState, lms: dict[str, TorchLM], epoch: int, loss: float, lr: float
    ) -> tuple[Any, float]:
        """Score the program with the trained stages on the validation set; record the epoch's trial."""
        reason = state.ledger.exhausted_reason(calls_needed=state.calls_needed(len(state.valset)))
        if reason is not None:
            raise StopSearch("budget_exhausted", f"{reason} (validation after epoch {epoch})")
        config = state.space.default_config()
        program = state.space.apply(state.program, config)
        attach(program, lms)
        start = time.perf_counter()
        try:
            report = evaluate(
                program,
                state.valset,
                self.metric,
                lm=state.lm,
                adapter=self.adapter,
                stage_metrics=self.stage_metrics,
                ledger=state.ledger,
                num_threads=self.num_threads,
                max_errors=self.max_errors,
                progress=self.progress,
                desc=f"epoch {epoch}",
            )
        except BudgetExhaustedError as exc:
            raise StopSearch("budget_exhausted", f"{exc} (validation after epoch {epoch})") from exc
        elapsed = time.perf_counter() - start
        measured = measure(report.examples, self.price_table())
        measures = EpochMeasures(
            **{f.name: getattr(measured, f.name) for f in dataclasses.fields(TrialMeasures)},
            epoch=epoch,
            train_loss=loss,
            lr=lr,
        )
        scored = ScoredConfig(
            config=config,
            fidelity=len(state.valset),
            score=report.score,
            stage_metrics=dict(report.stage_metrics),
            repeated=False,
            measures=measures,
        )
        trial = state.study.ask()
        trial.set_user_attr("softprompt", {"epoch": epoch, "train_loss": loss, "lr": lr})
        return state.record_trial(trial, scored, phase=TRAIN_PHASE, round=epoch), elapsed

    # ---- the result -------------------------------------------------------------------------

    def stopping_note(self, state: RunState, status: str, reason: str | None) -> dict[str, Any]:
        """The base note, its ``settings`` read from :attr:`schedule` (``lr`` the rate training used)."""
        note = super().stopping_note(state, status, reason)
        note["settings"] = {name: getattr(self.schedule, name) for name in self.STOPPING_SETTINGS}
        return note

    def finish(self, state: RunState, status: str, reason: str | None) -> dspy.Module:
        """The best validation program: its trained stages on TorchLMs holding the best epoch's parameters."""
        best = self.select(state)
        chosen = self._best if best is not None and self._best is not None and self._best[0] == best.trial else None
        if "softprompt" in state.notes:
            state.notes["softprompt"]["returned"] = (
                f"epoch {best.round} (trial {best.trial}): trained stages on TorchLM"
                if chosen is not None and best is not None
                else "the program as it was: no epoch beat it on validation"
            )
        program = super().finish(state, status, reason)
        if chosen is not None:
            attach(program, self.restore_lms(chosen[1]))
        return program

    @property
    def best_parameters(self) -> dict[str, dict[str, Any]] | None:
        """The best epoch's tensors by stage (detached copies), after :meth:`compile`; None before any epoch.

        Kept even when the returned program is the original one (no epoch beat it), e.g. to study it
        with :meth:`restore_lms`.
        """
        return self._best[1] if self._best is not None else None

    def restore_lms(self, tensors: dict[str, dict[str, Any]]) -> dict[str, TorchLM]:
        """Fresh TorchLMs holding saved per-stage tensors (new adapters on the shared base model)."""
        assert self._base is not None
        base = self._base
        lms = {}
        for stage, sd in tensors.items():
            new: StageState
            if self.method == "lora":
                new = LoraState(base, r=self.lora_r)
                new.load_state_dict(sd)
            else:
                new = SoftPromptState(base, sd["soft_prompt"])
            lms[stage] = TorchLM(base, state=new, seed=self.seed, max_tokens=self._max_tokens)
        return lms

    def stage_lm(self, state: RunState, base: TorchModel, stage_state: StageState) -> TorchLM:
        """A TorchLM for a trained stage, with the run's LM's ``max_tokens`` (default 128)."""
        inner = state.lm.inner if isinstance(state.lm, MeteredLM) else state.lm
        self._max_tokens = int((getattr(inner, "kwargs", None) or {}).get("max_tokens") or 128)
        return TorchLM(base, state=stage_state, seed=self.seed, max_tokens=self._max_tokens)

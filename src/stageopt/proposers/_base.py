"""Where candidates come from: the proposer contracts and the context they are called with."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from stageopt.evaluation import BudgetLedger, ExampleResult

Demo = dict[str, Any]


@dataclass
class ProposalContext:
    """What proposers may use. Every LM here is metered against ``ledger``.

    Attributes:
        lm: The task LM.
        prompt_lm: The LM that writes instructions (may differ from the task LM).
        adapter: The adapter stages run with.
        ledger: The run's budget ledger.
        traces: Runs of the unoptimized program on training examples (inputs, outputs and
            stage metrics per stage), collected once and shared by all proposers.
        trainset: The training examples the traces come from.
        seed: Seed for every random choice a proposer makes.
        threshold: Score at or above which a trace (or a stage, by its stage metric) succeeded.
    """

    lm: dspy.BaseLM
    prompt_lm: dspy.BaseLM
    adapter: dspy.Adapter | None
    ledger: BudgetLedger
    traces: Sequence[ExampleResult]
    trainset: Sequence[dspy.Example]
    seed: int = 0
    threshold: float = 0.5
    notes: dict[str, Any] = field(default_factory=dict)


class BaseDemoProposer(abc.ABC):
    """Proposes candidate demo sets per stage."""

    @abc.abstractmethod
    def propose(self, program: dspy.Module, context: ProposalContext) -> Mapping[str, list[list[Demo]]]:
        """Called once per run, after the traces are collected and before the search starts.

        Returns new demo sets by stage name (the stage's original demos are kept as choice 0
        by the caller). May spend budget through ``context``'s LMs.
        """


class BaseInstructionProposer(abc.ABC):
    """Proposes candidate instructions per stage."""

    @abc.abstractmethod
    def propose(self, program: dspy.Module, context: ProposalContext) -> Mapping[str, list[str]]:
        """Called once per run, after the traces are collected and before the search starts.

        Returns new, validated instructions by stage name (the original instruction is kept as
        choice 0 by the caller). Must never return an instruction that failed validation.
        """

"""Where candidate demos and instructions come from."""

from stageopt.proposers._base import BaseDemoProposer, BaseInstructionProposer, ProposalContext
from stageopt.proposers._bootstrap import BootstrapDemoProposer
from stageopt.proposers._instruction import LMInstructionProposer, validate_instruction
from stageopt.proposers._mutation import MutationInstructionProposer

__all__ = [
    "BaseDemoProposer",
    "BaseInstructionProposer",
    "BootstrapDemoProposer",
    "LMInstructionProposer",
    "MutationInstructionProposer",
    "ProposalContext",
    "validate_instruction",
]

"""A simulated multi-stage environment with a known optimum, to compare optimizers cheaply.

SIMULATION: the testbed LM is a script that answers from a hidden quality function, so results
measure search efficiency (regret, LM calls to get near the optimum), not language-model quality.
"""

from stageopt.testbed._bench import (
    DSPY_OPTIMIZERS,
    SIMULATION_NOTE,
    BenchRun,
    known_strategies,
    resolve_strategies,
    run_one,
    summarize,
)
from stageopt.testbed._lm import CallObserver, Execution, StageCall, TestbedEngine, TestbedLM
from stageopt.testbed._program import TestbedProgram, exact_match, make_examples
from stageopt.testbed._prompt import Prompt, parse_prompt
from stageopt.testbed._testbed import Testbed
from stageopt.testbed._world import (
    DECOY_BASE,
    MAX_STAGES,
    InstructionProfile,
    Optimum,
    QualityWeights,
    StageChoice,
    World,
    format_value,
    parse_value,
)

__all__ = [
    "DECOY_BASE",
    "DSPY_OPTIMIZERS",
    "MAX_STAGES",
    "SIMULATION_NOTE",
    "BenchRun",
    "CallObserver",
    "Execution",
    "InstructionProfile",
    "Optimum",
    "Prompt",
    "QualityWeights",
    "StageCall",
    "StageChoice",
    "Testbed",
    "TestbedEngine",
    "TestbedLM",
    "TestbedProgram",
    "World",
    "exact_match",
    "format_value",
    "known_strategies",
    "make_examples",
    "parse_prompt",
    "parse_value",
    "resolve_strategies",
    "run_one",
    "summarize",
]

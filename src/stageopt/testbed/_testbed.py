"""The testbed: a simulated multi-stage task whose optimum is known exactly (a SIMULATION).

It measures how efficiently an optimizer *searches* (regret against a known optimum, LM calls
to get near it), not the quality of any language model: the "LM" is a script.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import dspy

from stageopt._errors import ConfigurationError
from stageopt.strategies._space import SearchSpace
from stageopt.testbed._lm import CallObserver, TestbedLM
from stageopt.testbed._program import TestbedProgram, exact_match, make_examples
from stageopt.testbed._world import DECOY_BASE, Optimum, QualityWeights, StageChoice, World


class Testbed:
    """A K-stage DSPy program, its data and metric, a scripted LM, and the exact true score.

    Args:
        n_stages: Number of stages (default 3: ``query -> clue -> lead -> verdict``).
        seed: Seed of the hidden world (qualities, styles, utilities, draws).
        n_train: Training examples (ids ``0..n_train-1``; the only valid demos).
        n_val: Validation examples (the next ids).
        pool_size: Generated instructions per stage besides the original.
        weights: Weights of the hidden quality function.

    The optimum (:meth:`optimum`) is over the whole declared universe: every stage's original and
    pool instructions, with any demo set of training examples. Instruction texts outside the
    universe are aliases of pool entries with lower quality and invalid demos only lower a
    stage's chance, so the true score of any program is at most the optimum (regret >= 0).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        n_stages: int = 3,
        *,
        seed: int = 0,
        n_train: int = 16,
        n_val: int = 20,
        pool_size: int = 6,
        weights: QualityWeights | None = None,
    ) -> None:
        if n_train < 2 or n_val < 1:
            raise ConfigurationError(f"the testbed needs n_train >= 2 and n_val >= 1, got {n_train=}, {n_val=}")
        if n_train + n_val > DECOY_BASE:
            raise ConfigurationError(f"n_train + n_val must be at most {DECOY_BASE}, got {n_train + n_val}")
        self.world = World(n_stages, seed=seed, train_ids=range(n_train), pool_size=pool_size, weights=weights)
        self.n_stages = n_stages
        self.seed = seed
        self.trainset = make_examples(self.world, range(n_train))
        self.valset = make_examples(self.world, range(n_train, n_train + n_val))

    @staticmethod
    def metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        """Exact match of the final ``verdict``."""
        return exact_match(example, prediction, trace)

    def program(self) -> TestbedProgram:
        """A fresh, unoptimized testbed program (original instructions, no demos)."""
        return TestbedProgram(self.world)

    def lm(self, observer: CallObserver | None = None) -> TestbedLM:
        """A testbed LM on this world (DSPy's cache off)."""
        return TestbedLM(self.world, observer=observer)

    def choices(self, program: dspy.Module) -> list[StageChoice]:
        """Each stage's instruction and demos, in stage order."""
        predictors = [p for _, p in program.named_predictors()]
        if len(predictors) != self.n_stages:
            raise ConfigurationError(f"expected a {self.n_stages}-stage testbed program, got {len(predictors)} stages")
        return [StageChoice(p.signature.instructions, tuple(dict(d.items()) for d in p.demos)) for p in predictors]

    def true_score(self, program: dspy.Module) -> float:
        """The exact expected exact-match score of ``program`` (no sampling)."""
        return self.world.score(self.choices(program))

    @cached_property
    def _optimum(self) -> Optimum:
        return self.world.optimum()

    def optimum(self) -> Optimum:
        """The best expected score over the whole universe, and a configuration that reaches it."""
        return self._optimum

    def space_optimum(self, space: SearchSpace) -> float:
        """The best expected score among the configurations of a run's candidate pools.

        Setting knobs do not change the simulated score, except ``n_demos``, which keeps a prefix
        of the chosen demo set: its choices are enumerated too.
        """
        options = []
        for candidates in space.stages.values():
            limits = candidates.settings.get("n_demos", [None])
            options.append(
                [
                    StageChoice(text, tuple(demos[:limit]))
                    for text, demos, limit in itertools.product(candidates.instructions, candidates.demo_sets, limits)
                ]
            )
        return self.world.best_chain(options)[0]

"""The search space shared by every strategy: per-stage instruction and demo-set choices.

A configuration is ``{stage: {"instruction": i, "demos": j}}`` with indices into the stage's
candidate pools, so configurations (and Optuna trial parameters) are small JSON values; the
pools themselves are stored once per run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError

Config = dict[str, dict[str, int]]
Demo = dict[str, Any]

#: The choices of one stage that strategies search over.
KNOBS = ("instruction", "demos")


@dataclass
class StageCandidates:
    """Candidate pools of one stage. Index 0 is always the stage's original setting."""

    instructions: list[str]
    demo_sets: list[list[Demo]] = field(default_factory=lambda: [[]])

    def size(self, knob: str) -> int:
        """Number of choices of ``knob``."""
        return len(self.instructions) if knob == "instruction" else len(self.demo_sets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready pools."""
        return {"instructions": list(self.instructions), "demo_sets": [list(s) for s in self.demo_sets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageCandidates:
        """Inverse of :meth:`to_dict`."""
        return cls(list(data["instructions"]), [list(s) for s in data["demo_sets"]])


@dataclass
class SearchSpace:
    """Candidate pools for every stage of a program, in ``named_predictors()`` order."""

    stages: dict[str, StageCandidates]

    @classmethod
    def initial(cls, program: dspy.Module) -> SearchSpace:
        """A space holding only each stage's current instruction and demos."""
        stages = {}
        for name, predictor in program.named_predictors():
            demos = [_demo_dict(d) for d in predictor.demos]
            stages[name] = StageCandidates([predictor.signature.instructions], [demos])
        return cls(stages)

    def names(self) -> list[str]:
        """Stage names in program order."""
        return list(self.stages)

    def default_config(self) -> Config:
        """The original program: index 0 of every pool."""
        return {name: dict.fromkeys(KNOBS, 0) for name in self.stages}

    def distributions(self, stage: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of one stage's knobs (parameters named ``stage.knob``)."""
        candidates = self.stages[stage]
        return {
            param_name(stage, knob): optuna.distributions.CategoricalDistribution(list(range(candidates.size(knob))))
            for knob in KNOBS
        }

    def all_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Distributions of every stage's knobs."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for stage in self.stages:
            out.update(self.distributions(stage))
        return out

    def stage_configs(self, stage: str) -> Iterator[dict[str, int]]:
        """Every choice of one stage (for grid search and small spaces)."""
        c = self.stages[stage]
        for i in range(c.size("instruction")):
            for j in range(c.size("demos")):
                yield {"instruction": i, "demos": j}

    def validate_stages(self, names: list[str]) -> None:
        """Raise a clear error for stage names the program does not have."""
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise ConfigurationError(f"unknown stage name(s) {unknown}; the program's stages are {self.names()}")

    def apply(self, program: dspy.Module, config: Config) -> dspy.Module:
        """Return a copy of ``program`` with ``config``'s instruction and demos on each stage."""
        self.validate_stages(list(config))
        new = program.deepcopy()
        for name, predictor in new.named_predictors():
            if name not in config:
                continue
            candidates = self.stages[name]
            choice = config[name]
            predictor.signature = predictor.signature.with_instructions(candidates.instructions[choice["instruction"]])
            predictor.demos = [dspy.Example(**d) for d in candidates.demo_sets[choice["demos"]]]
        return new

    def describe(self, config: Config) -> dict[str, dict[str, Any]]:
        """Human-readable parameters of ``config``: the instruction text and the demo count."""
        out = {}
        for name, choice in config.items():
            c = self.stages[name]
            out[name] = {
                **choice,
                "instruction_text": c.instructions[choice["instruction"]],
                "n_demos": len(c.demo_sets[choice["demos"]]),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready space."""
        return {name: c.to_dict() for name, c in self.stages.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Inverse of :meth:`to_dict`."""
        return cls({name: StageCandidates.from_dict(c) for name, c in data.items()})


def param_name(stage: str, knob: str) -> str:
    """The Optuna parameter name of one knob of one stage."""
    return f"{stage}.{knob}"


def config_from_params(params: Mapping[str, Any], base: Config) -> Config:
    """``base`` with the knobs named in Optuna ``params`` replaced."""
    config = {stage: dict(choice) for stage, choice in base.items()}
    for key, value in params.items():
        stage, _, knob = key.rpartition(".")
        config.setdefault(stage, dict.fromkeys(KNOBS, 0))[knob] = int(value)
    return config


def config_key(config: Config) -> str:
    """A canonical string for a configuration (to recognise repeats)."""
    return ";".join(f"{s}:{c['instruction']}/{c['demos']}" for s, c in sorted(config.items()))


def _demo_dict(demo: Any) -> Demo:
    if isinstance(demo, dspy.Example):
        return {k: v for k, v in demo.items() if not k.startswith("dspy_")}
    return dict(demo)

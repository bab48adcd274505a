"""The search space shared by every strategy: per-stage candidate pools and setting choices.

A configuration is ``{stage: {"instruction": i, "demos": j, ...}}`` with indices into the
stage's choices, so configurations (and Optuna trial parameters, named ``stage.knob``) are small
JSON values; the choices themselves are stored once per run. Index 0 of every knob is the
stage's original setting, so :meth:`SearchSpace.default_config` is the unoptimized program.

Every stage has the ``instruction`` and ``demos`` pools. A run may also enable *setting knobs*
(the optimizer's ``settings=``); a knob that is not enabled is absent from configurations,
configuration keys and stored spaces, and a knob at index 0 leaves the stage as it was:

* ``temperature``: the stage's sampling temperature (``None``: the stage's own, usually unset).
* ``n_demos``: use at most this many demos of the chosen demo set (``None``: all of them).
* ``module``: ``"predict"`` (plain ``dspy.Predict``) or ``"cot"`` (chain of thought: a
  ``reasoning`` output field prepended to the stage's signature, as ``dspy.ChainOfThought``
  does, so the predictor object and its stage name stay the same).
* ``model``: the name of the LM the stage runs on (``None``: the run's LM); names resolve
  through the ``models`` mapping given to the optimizer and never enter stored results.

A run may also search the program's *structure* (``settings={"structure": [knob, ...]}``, see
:mod:`~stageopt.strategies._structure`): program-level knobs such as the number of retrieval
hops, held in configurations under the key :data:`STRUCTURE` (``{"@structure": {"hops": 1}}``,
indices like every knob; absent means index 0, the program as it is). A stage that a structure
does not run keeps index 0 of its knobs in configurations that :meth:`SearchSpace.suggest` makes,
and the sampler is not asked for them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError
from stageopt.strategies._structure import STRUCTURE, StructuredProgram, StructureSpace

Config = dict[str, dict[str, int]]
Demo = dict[str, Any]

#: The candidate pools every stage has.
KNOBS = ("instruction", "demos")

#: Optional per-stage settings a run may enable, in the order they appear in configurations.
SETTING_KNOBS = ("temperature", "n_demos", "module", "model")

#: The ``settings`` key that enables structure knobs (a list of knob names, ``["*"]``: all).
STRUCTURE_SETTING = "structure"

#: Choices of the ``module`` knob.
MODULES = ("predict", "cot")

#: The output field chain of thought adds (DSPy's name).
REASONING = "reasoning"


@dataclass
class StageCandidates:
    """Choices of one stage. Index 0 of every knob is always the stage's original setting.

    Attributes:
        instructions: Candidate instructions.
        demo_sets: Candidate demo sets.
        settings: Choices of each enabled setting knob (absent: not searched).
    """

    instructions: list[str]
    demo_sets: list[list[Demo]] = field(default_factory=lambda: [[]])
    settings: dict[str, list[Any]] = field(default_factory=dict)

    def knobs(self) -> list[str]:
        """The knobs of this stage: the two pools, then the enabled settings."""
        return [*KNOBS, *(k for k in SETTING_KNOBS if k in self.settings)]

    def size(self, knob: str) -> int:
        """Number of choices of ``knob``."""
        if knob == "instruction":
            return len(self.instructions)
        if knob == "demos":
            return len(self.demo_sets)
        if knob in self.settings:
            return len(self.settings[knob])
        raise ConfigurationError(f"unknown knob {knob!r}; this stage's knobs are {self.knobs()}")

    def value(self, knob: str, index: int) -> Any:
        """The setting chosen by ``index`` of an enabled setting knob (index 0 when not enabled: None)."""
        if knob not in self.settings:
            if index != 0:
                raise ConfigurationError(f"knob {knob!r} is not enabled for this stage, got index {index}")
            return None
        return self.settings[knob][_checked(knob, index, len(self.settings[knob]))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready choices (``settings`` only when some are enabled)."""
        data: dict[str, Any] = {
            "instructions": list(self.instructions),
            "demo_sets": [list(s) for s in self.demo_sets],
        }
        if self.settings:
            data["settings"] = {k: list(v) for k, v in self.settings.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageCandidates:
        """Inverse of :meth:`to_dict`."""
        settings = {k: list(v) for k, v in data.get("settings", {}).items()}
        return cls(list(data["instructions"]), [list(s) for s in data["demo_sets"]], settings)


@dataclass
class SearchSpace:
    """Choices for every stage of a program, in ``named_predictors()`` order.

    Attributes:
        stages: The choices of each stage.
        models: LMs by name, for the ``model`` knob (held at run time, never serialised).
        structure: The program-level structure knobs searched, None: the structure is fixed.
    """

    stages: dict[str, StageCandidates]
    models: dict[str, dspy.BaseLM] = field(default_factory=dict, repr=False, compare=False)
    structure: StructureSpace | None = None

    @classmethod
    def initial(
        cls,
        program: dspy.Module,
        *,
        settings: Mapping[str, Any] | None = None,
        models: Mapping[str, dspy.BaseLM] | None = None,
    ) -> SearchSpace:
        """A space holding each stage's current instruction and demos, plus ``settings`` choices.

        Each enabled setting knob gets the stage's original setting as choice 0, then the values
        of ``settings[knob]`` that differ from it (see :func:`validate_settings`). With
        ``settings["structure"]``, the program's structure knobs (its current shape as choice 0).
        """
        models = validate_models(models)
        choices = validate_settings(settings, models)
        knobs = choices.pop(STRUCTURE_SETTING, None)
        stages = {}
        for name, predictor in program.named_predictors():
            demos = [_demo_dict(d) for d in predictor.demos]
            stage_settings = {}
            for knob, values in choices.items():
                original = _original(knob, predictor)
                stage_settings[knob] = [original, *(v for v in values if v != original)]
            stages[name] = StageCandidates([predictor.signature.instructions], [demos], stage_settings)
        structure = StructureSpace.of(program, knobs, list(stages)) if knobs else None
        return cls(stages, dict(models), structure)

    def names(self) -> list[str]:
        """Stage names in program order."""
        return list(self.stages)

    def default_config(self) -> Config:
        """The original program: index 0 of every knob."""
        return {name: dict.fromkeys(c.knobs(), 0) for name, c in self.stages.items()}

    def distributions(self, stage: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of one stage's knobs (parameters named ``stage.knob``).

        ``stage`` may be :data:`STRUCTURE` when the space has structure knobs.
        """
        if stage == STRUCTURE and self.structure is not None:
            sizes = {knob: len(values) for knob, values in self.structure.choices.items()}
        else:
            candidates = self.stages[stage]
            sizes = {knob: candidates.size(knob) for knob in candidates.knobs()}
        return {
            param_name(stage, knob): optuna.distributions.CategoricalDistribution(list(range(size)))
            for knob, size in sizes.items()
        }

    def all_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Distributions of every knob: the structure's first, then every stage's (unconditional)."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for stage in [STRUCTURE] * (self.structure is not None) + list(self.stages):
            out.update(self.distributions(stage))
        return out

    def suggest(self, trial: optuna.trial.BaseTrial) -> Config:
        """Ask ``trial`` for a whole-program configuration, define-by-run.

        The structure knobs are asked first; then each stage's knobs, only for the stages that
        structure runs (a conditional space: TPE with ``group=True`` models each set of
        parameters that occur together). A stage that does not run keeps index 0. Without
        structure knobs this asks the same parameters, in the same order, as
        ``study.ask(all_distributions())``.
        """
        config: Config = {}
        if self.structure is not None:
            config[STRUCTURE] = {
                knob: int(trial.suggest_categorical(param_name(STRUCTURE, knob), list(range(len(values)))))
                for knob, values in self.structure.choices.items()
            }
        for stage, candidates in self.stages.items():
            if not self.runs(stage, config):
                config[stage] = dict.fromkeys(candidates.knobs(), 0)
                continue
            config[stage] = {
                knob: int(trial.suggest_categorical(param_name(stage, knob), list(range(candidates.size(knob)))))
                for knob in candidates.knobs()
            }
        return config

    def runs(self, stage: str, config: Config) -> bool:
        """Whether ``stage`` runs in the program shape ``config`` chooses (always, without structure)."""
        if self.structure is None:
            return True
        return self.structure.runs(stage, config.get(STRUCTURE, {}))

    def normalize(self, config: Config) -> Config:
        """A copy of ``config`` whose stages that do not run are at index 0 (the same program)."""
        out = {stage: dict(choice) for stage, choice in config.items()}
        for stage in self.stages:
            if stage in out and not self.runs(stage, config):
                out[stage] = dict.fromkeys(out[stage], 0)
        return out

    def stage_configs(self, stage: str) -> Iterator[dict[str, int]]:
        """Every choice of one stage (for grid search and small spaces), the original first."""
        c = self.stages[stage]
        knobs = c.knobs()
        for indices in itertools.product(*(range(c.size(k)) for k in knobs)):
            yield dict(zip(knobs, indices, strict=True))

    def validate_stages(self, names: list[str]) -> None:
        """Raise a clear error for stage names the program does not have."""
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise ConfigurationError(f"unknown stage name(s) {unknown}; the program's stages are {self.names()}")

    def add_instruction(self, stage: str, text: str) -> int:
        """Add ``text`` to ``stage``'s instruction pool; returns its index (the old one for a repeat).

        Called during a search (e.g. with an instruction from
        :class:`~stageopt.proposers.MutationInstructionProposer`). Repeats are recognised after
        whitespace normalisation. Two duties fall on the caller: persist the grown space
        (``state.study.set_user_attr("space", state.space.to_dict())``) before scoring a
        configuration that uses it, so a resumed run can rebuild it; and score such
        configurations with ``run_trial(config)`` rather than through :meth:`distributions`,
        because Optuna's categorical distributions cannot grow within a study.
        """
        self.validate_stages([stage])
        normal = " ".join(text.split())
        if not normal:
            raise ConfigurationError(f"cannot add an empty instruction to stage {stage!r}")
        pool = self.stages[stage].instructions
        for index, existing in enumerate(pool):
            if " ".join(existing.split()) == normal:
                return index
        pool.append(text.strip())
        return len(pool) - 1

    def apply(
        self, program: dspy.Module, config: Config, *, models: Mapping[str, dspy.BaseLM] | None = None
    ) -> dspy.Module:
        """Return a copy of ``program`` with ``config``'s choices on each stage.

        Args:
            program: The original program (not modified).
            config: The choices by stage; a stage or setting knob it leaves out keeps index 0.
                Its :data:`STRUCTURE` entry, when the space has one, picks the program's shape
                (``program.with_structure(...)``; stage names stay the same).
            models: LMs by name for the ``model`` knob (default: :attr:`models`).
        """
        self.validate_stages([s for s in config if s != STRUCTURE])
        models = self.models if models is None else models
        new = self._shaped(program, config.get(STRUCTURE))
        for name, predictor in new.named_predictors():
            if name not in config:
                continue
            c = self.stages[name]
            choice = config[name]
            if (module := c.value("module", choice.get("module", 0))) is not None:
                predictor.signature = _with_module(predictor.signature, module)
            instruction = c.instructions[_checked("instruction", choice["instruction"], c.size("instruction"))]
            predictor.signature = predictor.signature.with_instructions(instruction)
            demos = c.demo_sets[_checked("demos", choice["demos"], c.size("demos"))]
            limit = c.value("n_demos", choice.get("n_demos", 0))
            predictor.demos = [dspy.Example(**d) for d in demos[:limit]]
            if (temperature := c.value("temperature", choice.get("temperature", 0))) is not None:
                predictor.config = {**predictor.config, "temperature": temperature}
            if (model := c.value("model", choice.get("model", 0))) is not None:
                if model not in models:
                    raise ConfigurationError(
                        f"stage {name!r} is set to model {model!r}, but no LM of that name was given: "
                        f"pass models={{{model!r}: <dspy.BaseLM>, ...}} to the optimizer (given: {sorted(models)})"
                    )
                predictor.lm = models[model]
        return new

    def _shaped(self, program: dspy.Module, choice: Mapping[str, int] | None) -> dspy.Module:
        """A copy of ``program`` in the shape ``choice`` picks (a plain copy for index 0)."""
        if self.structure is None:
            if choice:
                raise ConfigurationError(
                    f"the configuration sets structure knobs {sorted(choice)}, but this space searches no "
                    "structure (enable it with settings={'structure': [...]})"
                )
            return program.deepcopy()
        if not choice or not any(choice.values()):
            return program.deepcopy()
        values = self.structure.values(choice)
        stages = [n for n, _ in program.named_predictors()]
        if not isinstance(program, StructuredProgram):
            raise ConfigurationError(
                f"the configuration picks a structure ({values}), but {type(program).__name__} declares no "
                "structure knobs; apply it to the program the space was built from"
            )
        shaped = program.with_structure(**values)
        names = [n for n, _ in shaped.named_predictors()]
        if names != stages:
            raise ConfigurationError(
                f"{type(program).__name__}.with_structure({values}) changed the stage names to {names}; "
                "structure variants must keep every stage (an unused stage simply is not called)"
            )
        return shaped

    def describe(self, config: Config) -> dict[str, dict[str, Any]]:
        """Human-readable parameters of ``config``.

        The pools appear by index plus ``instruction_text`` and ``n_demos`` (the number of demos
        the stage gets); enabled setting knobs appear by value. With structure knobs, the entry
        :data:`STRUCTURE` gives their values (those a configuration leaves out at index 0) and
        ``runs: false`` marks a stage that structure does not run.
        """
        out: dict[str, dict[str, Any]] = {}
        if self.structure is not None:
            out[STRUCTURE] = self.structure.values(config.get(STRUCTURE, {}))
        for name, choice in config.items():
            if name == STRUCTURE:
                continue
            c = self.stages[name]
            limit = c.value("n_demos", choice.get("n_demos", 0))
            described = {
                **choice,
                "instruction_text": c.instructions[choice["instruction"]],
                "n_demos": len(c.demo_sets[choice["demos"]][:limit]),
            }
            for knob in SETTING_KNOBS:
                if knob in c.settings and knob != "n_demos":
                    described[knob] = c.value(knob, choice.get(knob, 0))
            if not self.runs(name, config):
                described["runs"] = False
            out[name] = described
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready space (without :attr:`models`); the structure, if any, under :data:`STRUCTURE`."""
        data: dict[str, Any] = {name: c.to_dict() for name, c in self.stages.items()}
        if self.structure is not None:
            data[STRUCTURE] = self.structure.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, models: Mapping[str, dspy.BaseLM] | None = None) -> SearchSpace:
        """Inverse of :meth:`to_dict`; ``models`` supplies the LMs of the ``model`` knob."""
        structure = StructureSpace.from_dict(data[STRUCTURE]) if STRUCTURE in data else None
        stages = {name: StageCandidates.from_dict(c) for name, c in data.items() if name != STRUCTURE}
        return cls(stages, dict(models or {}), structure)


def validate_models(models: Mapping[str, dspy.BaseLM] | None) -> dict[str, dspy.BaseLM]:
    """Check a ``models`` mapping (LM name -> ``dspy.BaseLM``) and return it as a dict."""
    if models is None:
        return {}
    if not isinstance(models, Mapping):
        raise TypeError(f"`models` must map LM names to dspy.BaseLM objects, got {models!r}")
    for name, lm in models.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"`models` keys must be non-empty strings, got {name!r}")
        if not isinstance(lm, dspy.BaseLM):
            raise TypeError(f"`models[{name!r}]` must be a dspy.BaseLM, got {type(lm).__name__}")
    return dict(models)


def validate_settings(
    settings: Mapping[str, Any] | None, models: Mapping[str, dspy.BaseLM] | None = None
) -> dict[str, list[Any]]:
    """Check the setting knobs a run searches and return their choices (repeats dropped).

    Args:
        settings: Choices by knob, e.g. ``{"temperature": [0.0, 0.7], "module": ["predict", "cot"]}``.
            Allowed: ``temperature`` (numbers >= 0), ``n_demos`` (ints >= 0), ``module``
            (``"predict"``, ``"cot"``) and ``model`` (names in ``models``); ``None`` is allowed
            for ``temperature``, ``n_demos`` and ``model`` and means the stage's original setting.
            ``structure`` is not a stage knob: it names the program's structure knobs to search
            (``["*"]`` or ``True``: all; checked against the program when the space is built).
        models: LMs by name, required by the ``model`` knob.

    Raises:
        ConfigurationError: naming the bad knob or value and what is allowed.
    """
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ConfigurationError(f"`settings` must map knob names to lists of choices, got {settings!r}")
    unknown = [k for k in settings if k not in (*SETTING_KNOBS, STRUCTURE_SETTING)]
    if unknown:
        allowed = ", ".join((*SETTING_KNOBS, STRUCTURE_SETTING))
        raise ConfigurationError(f"unknown setting knob(s) {unknown}; allowed: {allowed}")
    out: dict[str, list[Any]] = {}
    for knob in SETTING_KNOBS:
        if knob not in settings:
            continue
        values = settings[knob]
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise ConfigurationError(f"`settings[{knob!r}]` must be a non-empty list of choices, got {values!r}")
        for value in values:
            _check_setting(knob, value, models or {})
        out[knob] = list(dict.fromkeys(values))
    if STRUCTURE_SETTING in settings:
        out[STRUCTURE_SETTING] = _structure_knobs(settings[STRUCTURE_SETTING])
    return out


def _structure_knobs(value: Any) -> list[str]:
    if value is True:
        return ["*"]
    names = isinstance(value, Sequence) and not isinstance(value, str | bytes) and bool(value)
    if not names or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(
            f"`settings['structure']` must be a non-empty list of structure knob names (or True for all), got {value!r}"
        )
    return list(dict.fromkeys(value))


def _check_setting(knob: str, value: Any, models: Mapping[str, dspy.BaseLM]) -> None:
    if value is None and knob != "module":
        return
    if knob == "temperature":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ConfigurationError(f"`settings['temperature']` values must be numbers >= 0 or None, got {value!r}")
    elif knob == "n_demos":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigurationError(f"`settings['n_demos']` values must be ints >= 0 or None (all), got {value!r}")
    elif knob == "module":
        if value not in MODULES:
            raise ConfigurationError(f"`settings['module']` values must be one of {list(MODULES)}, got {value!r}")
    elif knob == "model" and (not isinstance(value, str) or value not in models):
        raise ConfigurationError(
            f"`settings['model']` names {value!r}, which `models` does not have; "
            f"known models: {sorted(models)} (pass models={{name: dspy.BaseLM}} to the optimizer)"
        )


def _original(knob: str, predictor: dspy.Predict) -> Any:
    """A stage's own setting of ``knob`` (choice 0)."""
    if knob == "temperature":
        return predictor.config.get("temperature")
    if knob == "module":
        return "cot" if REASONING in predictor.signature.output_fields else "predict"
    return None  # n_demos: all of the chosen set; model: the stage's own LM


def _with_module(signature: type[dspy.Signature], module: str) -> type[dspy.Signature]:
    """``signature`` as a plain predictor's or as chain of thought's (``reasoning`` first)."""
    has_reasoning = REASONING in signature.output_fields
    if module == "cot" and not has_reasoning:
        return signature.prepend(name=REASONING, field=dspy.OutputField(desc="${reasoning}"), type_=str)
    if module == "predict" and has_reasoning:
        return signature.delete(REASONING)
    return signature


def _checked(knob: str, index: int, size: int) -> int:
    if not 0 <= index < size:
        raise ConfigurationError(f"choice {index} of knob {knob!r} is out of range: it has {size} choices")
    return index


def param_name(stage: str, knob: str) -> str:
    """The Optuna parameter name of one knob of one stage."""
    return f"{stage}.{knob}"


def config_from_params(params: Mapping[str, Any], base: Config) -> Config:
    """``base`` with the knobs named in Optuna ``params`` (``stage.knob``) replaced."""
    config = {stage: dict(choice) for stage, choice in base.items()}
    for key, value in params.items():
        stage, _, knob = key.rpartition(".")
        config.setdefault(stage, {} if stage == STRUCTURE else dict.fromkeys(KNOBS, 0))[knob] = int(value)
    return config


def config_key(config: Config) -> str:
    """A canonical string for a configuration (to recognise repeats).

    Setting knobs at index 0 (the original setting) are left out, so a configuration means the
    same key whether or not its run enabled setting knobs; so are structure knobs at index 0.
    """
    parts = []
    for stage, c in sorted(config.items()):
        if stage == STRUCTURE:
            if any(c.values()):
                parts.append(f"{stage}:" + "/".join(f"{k}={v}" for k, v in sorted(c.items()) if v))
            continue
        settings = "".join(f"/{k}={c[k]}" for k in SETTING_KNOBS if c.get(k))
        parts.append(f"{stage}:{c['instruction']}/{c['demos']}{settings}")
    return ";".join(parts)


def _demo_dict(demo: Any) -> Demo:
    if isinstance(demo, dspy.Example):
        return {k: v for k, v in demo.items() if not k.startswith("dspy_")}
    return dict(demo)

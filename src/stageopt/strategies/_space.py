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

Config = dict[str, dict[str, int]]
Demo = dict[str, Any]

#: The candidate pools every stage has.
KNOBS = ("instruction", "demos")

#: Optional per-stage settings a run may enable, in the order they appear in configurations.
SETTING_KNOBS = ("temperature", "n_demos", "module", "model")

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
    """

    stages: dict[str, StageCandidates]
    models: dict[str, dspy.BaseLM] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def initial(
        cls,
        program: dspy.Module,
        *,
        settings: Mapping[str, Sequence[Any]] | None = None,
        models: Mapping[str, dspy.BaseLM] | None = None,
    ) -> SearchSpace:
        """A space holding each stage's current instruction and demos, plus ``settings`` choices.

        Each enabled setting knob gets the stage's original setting as choice 0, then the values
        of ``settings[knob]`` that differ from it (see :func:`validate_settings`).
        """
        models = validate_models(models)
        choices = validate_settings(settings, models)
        stages = {}
        for name, predictor in program.named_predictors():
            demos = [_demo_dict(d) for d in predictor.demos]
            stage_settings = {}
            for knob, values in choices.items():
                original = _original(knob, predictor)
                stage_settings[knob] = [original, *(v for v in values if v != original)]
            stages[name] = StageCandidates([predictor.signature.instructions], [demos], stage_settings)
        return cls(stages, dict(models))

    def names(self) -> list[str]:
        """Stage names in program order."""
        return list(self.stages)

    def default_config(self) -> Config:
        """The original program: index 0 of every knob."""
        return {name: dict.fromkeys(c.knobs(), 0) for name, c in self.stages.items()}

    def distributions(self, stage: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of one stage's knobs (parameters named ``stage.knob``)."""
        candidates = self.stages[stage]
        return {
            param_name(stage, knob): optuna.distributions.CategoricalDistribution(list(range(candidates.size(knob))))
            for knob in candidates.knobs()
        }

    def all_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Distributions of every stage's knobs."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for stage in self.stages:
            out.update(self.distributions(stage))
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
            models: LMs by name for the ``model`` knob (default: :attr:`models`).
        """
        self.validate_stages(list(config))
        models = self.models if models is None else models
        new = program.deepcopy()
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

    def describe(self, config: Config) -> dict[str, dict[str, Any]]:
        """Human-readable parameters of ``config``.

        The pools appear by index plus ``instruction_text`` and ``n_demos`` (the number of demos
        the stage gets); enabled setting knobs appear by value.
        """
        out = {}
        for name, choice in config.items():
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
            out[name] = described
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready space (without :attr:`models`)."""
        return {name: c.to_dict() for name, c in self.stages.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, models: Mapping[str, dspy.BaseLM] | None = None) -> SearchSpace:
        """Inverse of :meth:`to_dict`; ``models`` supplies the LMs of the ``model`` knob."""
        return cls({name: StageCandidates.from_dict(c) for name, c in data.items()}, dict(models or {}))


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
    settings: Mapping[str, Sequence[Any]] | None, models: Mapping[str, dspy.BaseLM] | None = None
) -> dict[str, list[Any]]:
    """Check the setting knobs a run searches and return their choices (repeats dropped).

    Args:
        settings: Choices by knob, e.g. ``{"temperature": [0.0, 0.7], "module": ["predict", "cot"]}``.
            Allowed: ``temperature`` (numbers >= 0), ``n_demos`` (ints >= 0), ``module``
            (``"predict"``, ``"cot"``) and ``model`` (names in ``models``); ``None`` is allowed
            for ``temperature``, ``n_demos`` and ``model`` and means the stage's original setting.
        models: LMs by name, required by the ``model`` knob.

    Raises:
        ConfigurationError: naming the bad knob or value and what is allowed.
    """
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ConfigurationError(f"`settings` must map knob names to lists of choices, got {settings!r}")
    unknown = [k for k in settings if k not in SETTING_KNOBS]
    if unknown:
        raise ConfigurationError(f"unknown setting knob(s) {unknown}; allowed: {', '.join(SETTING_KNOBS)}")
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
    return out


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
        config.setdefault(stage, dict.fromkeys(KNOBS, 0))[knob] = int(value)
    return config


def config_key(config: Config) -> str:
    """A canonical string for a configuration (to recognise repeats).

    Setting knobs at index 0 (the original setting) are left out, so a configuration means the
    same key whether or not its run enabled setting knobs.
    """
    parts = []
    for stage, c in sorted(config.items()):
        settings = "".join(f"/{k}={c[k]}" for k in SETTING_KNOBS if c.get(k))
        parts.append(f"{stage}:{c['instruction']}/{c['demos']}{settings}")
    return ";".join(parts)


def _demo_dict(demo: Any) -> Demo:
    if isinstance(demo, dspy.Example):
        return {k: v for k, v in demo.items() if not k.startswith("dspy_")}
    return dict(demo)

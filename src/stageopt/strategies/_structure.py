"""Program structure: knobs over a program's shape, searched beside each stage's prompt.

A structure knob changes what a program *does* rather than what one stage is told: the number
of retrieval hops, the passages per hop, whether a verification stage runs. A program declares
its knobs by implementing :class:`StructuredProgram` (most simply by inheriting
:class:`StructureKnobs`); a search enables them with ``settings={"structure": [...]}`` (see
:func:`~stageopt.strategies._space.validate_settings`).

Stage names never change between variants, so configurations, candidate pools and demos carry
over: a stage a variant does not run (hop 2 of a one-hop program, verify when verification is
off) is simply unused. :meth:`StructuredProgram.stage_conditions` says when each conditional
stage runs, so a sampler is asked for a stage's knobs only when the stage exists (Optuna's
define-by-run, conditional search spaces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import dspy

from stageopt._errors import ConfigurationError

#: The key of the structure choices in configurations and stored spaces, and the prefix of their
#: Optuna parameters (``@structure.hops``); not a valid attribute name, so never a stage name.
STRUCTURE = "@structure"


@runtime_checkable
class StructuredProgram(Protocol):
    """A program that declares knobs over its own shape.

    Contract: :meth:`with_structure` returns a new program whose ``named_predictors()`` names are
    those of ``self``; the program it was called on is not modified. Values are JSON scalars
    (ints, floats, strings, booleans), so configurations and results stay JSON.
    """

    def structure_space(self) -> Mapping[str, Sequence[Any]]:
        """The choices of each structure knob, this program's current choice first.

        Called once when a search space is built (and never on resume: the space is stored).
        """
        ...

    def stage_conditions(self) -> Mapping[str, Mapping[str, Sequence[Any]]]:
        """When each conditional stage runs: ``{stage: {knob: values}}``.

        A stage listed here runs only when every listed knob takes one of its values; a stage
        not listed always runs. Called with :meth:`structure_space`.
        """
        ...

    def with_structure(self, **choices: Any) -> dspy.Module:
        """A copy of this program with the given knobs set (others as they are).

        Called for every configuration scored with a structure other than the current one.

        Raises:
            ConfigurationError: for a knob the program does not have or a value it refuses.
        """
        ...


class StructureKnobs:
    """:class:`StructuredProgram` for a ``dspy.Module`` whose shape lies in instance attributes.

    Set :attr:`STRUCTURE` (knob name -> choices; each knob is an attribute the program's
    ``forward`` reads) and :attr:`STAGE_CONDITIONS`, and list this class before ``dspy.Module``::

        class MyProgram(StructureKnobs, dspy.Module):
            STRUCTURE = {"hops": (2, 1)}
            STAGE_CONDITIONS = {"query2": {"hops": (2,)}}

    The structure is saved with the program's state (``program.save``) and restored by
    ``program.load``, so a saved optimized program keeps the shape it was optimized with.
    """

    #: Structure knobs and their choices (the current value is put first when it is one of them).
    STRUCTURE: ClassVar[Mapping[str, Sequence[Any]]] = {}
    #: Stages that run only for some knob values: ``{stage: {knob: values}}``.
    STAGE_CONDITIONS: ClassVar[Mapping[str, Mapping[str, Sequence[Any]]]] = {}

    def structure(self) -> dict[str, Any]:
        """The current value of every structure knob."""
        return {knob: getattr(self, knob) for knob in self.STRUCTURE}

    def structure_space(self) -> dict[str, list[Any]]:
        """Each knob's choices, the current value first."""
        current = self.structure()
        return {knob: _current_first(current[knob], choices) for knob, choices in self.STRUCTURE.items()}

    def stage_conditions(self) -> dict[str, dict[str, list[Any]]]:
        """:attr:`STAGE_CONDITIONS` as plain lists."""
        return {stage: {k: list(v) for k, v in cond.items()} for stage, cond in self.STAGE_CONDITIONS.items()}

    def with_structure(self, **choices: Any) -> Any:
        """A deep copy with ``choices`` set; each value must be a declared choice or the current value."""
        space = self.structure_space()
        for knob, value in choices.items():
            if knob not in space:
                raise ConfigurationError(
                    f"{type(self).__name__} has no structure knob {knob!r}; its knobs: {sorted(space)}"
                )
            if value not in space[knob]:
                raise ConfigurationError(
                    f"structure knob {knob!r} of {type(self).__name__} takes one of {space[knob]}, got {value!r}"
                )
        new = self.deepcopy()  # type: ignore[attr-defined]
        for knob, value in choices.items():
            setattr(new, knob, value)
        return new

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        """DSPy's state of every stage plus the structure (under :data:`STRUCTURE`)."""
        state: dict[str, Any] = super().dump_state(json_mode=json_mode)  # type: ignore[misc]
        state[STRUCTURE] = self.structure()
        return state

    def load_state(self, state: dict[str, Any], **kwargs: Any) -> Any:
        """DSPy's ``load_state``, then the saved structure (absent in older files: kept as is)."""
        result = super().load_state(state, **kwargs)  # type: ignore[misc]
        saved = state.get(STRUCTURE) or {}
        unknown = [k for k in saved if k not in self.STRUCTURE]
        if unknown:
            raise ConfigurationError(
                f"the saved program sets structure knob(s) {unknown} that {type(self).__name__} does not have; "
                f"its knobs: {sorted(self.STRUCTURE)}"
            )
        for knob, value in saved.items():
            setattr(self, knob, value)
        return result


def _current_first(current: Any, choices: Sequence[Any]) -> list[Any]:
    return [current, *(c for c in choices if c != current)]


@dataclass
class StructureSpace:
    """The structure choices a search varies, and when each conditional stage runs.

    Attributes:
        choices: Each knob's choices, the program's current value first (index 0).
        conditions: ``{stage: {knob: values}}``: a stage runs only when each listed knob takes
            one of its values (restricted to the searched knobs).
    """

    choices: dict[str, list[Any]]
    conditions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, program: dspy.Module, knobs: Sequence[str], stages: Sequence[str]) -> StructureSpace:
        """The space of ``knobs`` of ``program`` (all of them for ``["*"]``).

        Raises:
            ConfigurationError: when the program declares no structure, or a knob or a
                conditioned stage is unknown, or a knob has fewer than two choices.
        """
        if not isinstance(program, StructuredProgram):
            raise ConfigurationError(
                f"{type(program).__name__} declares no structure knobs: give it structure_space(), "
                "stage_conditions() and with_structure() (e.g. inherit stageopt.strategies.StructureKnobs), "
                "or do not search structure"
            )
        declared = {k: list(v) for k, v in program.structure_space().items()}
        if not declared:
            raise ConfigurationError(f"{type(program).__name__} has no structure knobs: structure_space() is empty")
        wanted = list(declared) if list(knobs) == ["*"] else list(dict.fromkeys(knobs))
        unknown = [k for k in wanted if k not in declared]
        if unknown:
            raise ConfigurationError(
                f"{type(program).__name__} has no structure knob(s) {unknown}; its knobs: {sorted(declared)}"
            )
        for knob in wanted:
            values = declared[knob]
            if len(values) < 2 or len(set(map(repr, values))) != len(values):
                raise ConfigurationError(
                    f"structure knob {knob!r} of {type(program).__name__} needs two or more distinct choices, "
                    f"got {values}"
                )
            for value in values:
                if not (value is None or isinstance(value, str | int | float | bool)):
                    raise ConfigurationError(
                        f"structure knob {knob!r} has a choice that is not a JSON scalar: {value!r}"
                    )
        conditions: dict[str, dict[str, list[Any]]] = {}
        for stage, condition in program.stage_conditions().items():
            if stage not in stages:
                raise ConfigurationError(
                    f"stage_conditions() of {type(program).__name__} names unknown stage {stage!r}; "
                    f"the stages are {list(stages)}"
                )
            kept = {k: list(v) for k, v in condition.items() if k in wanted}
            if kept:
                conditions[stage] = kept
        return cls({k: declared[k] for k in wanted}, conditions)

    def values(self, choice: Mapping[str, int]) -> dict[str, Any]:
        """The knob values of a structure choice (indices; a knob left out is index 0)."""
        out = {}
        for knob, values in self.choices.items():
            index = choice.get(knob, 0)
            if not 0 <= index < len(values):
                raise ConfigurationError(
                    f"choice {index} of structure knob {knob!r} is out of range: it has {len(values)} choices"
                )
            out[knob] = values[index]
        unknown = [k for k in choice if k not in self.choices]
        if unknown:
            raise ConfigurationError(f"unknown structure knob(s) {unknown}; searched: {sorted(self.choices)}")
        return out

    def runs(self, stage: str, choice: Mapping[str, int]) -> bool:
        """Whether ``stage`` runs under a structure choice (indices)."""
        condition = self.conditions.get(stage)
        if not condition:
            return True
        values = self.values(choice)
        return all(values[knob] in allowed for knob, allowed in condition.items())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready space."""
        return {
            "choices": {k: list(v) for k, v in self.choices.items()},
            "conditions": {s: {k: list(v) for k, v in c.items()} for s, c in self.conditions.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StructureSpace:
        """Inverse of :meth:`to_dict`."""
        return cls(
            {k: list(v) for k, v in data["choices"].items()},
            {s: {k: list(v) for k, v in c.items()} for s, c in data.get("conditions", {}).items()},
        )

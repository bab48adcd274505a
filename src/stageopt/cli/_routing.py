"""``optimize --models`` and ``--search-structure``; saving and loading programs whose stages are routed.

``--models gemma3-270m,smollm2-135m`` searches each stage's model among these names (embedded
short names or LiteLLM strings); each LM is built once per run and shared by every stage routed
to it, and the ``--lm`` model is reused when it is listed. ``--search-structure`` searches the
task program's structure knobs (e.g. HotpotQA's hops and passages per hop, GSM8K's verification
stage) and each stage's module type (plain or chain of thought).

A routed program is saved with its stages' LMs replaced by their names (``program.json`` key
:data:`ROUTING`), so ``stageopt eval --program`` rebuilds the LMs by name instead of importing
LM classes from the file. Stages that run on a :class:`~stageopt.lm.TorchLM` with a learned soft
prompt or adapter (``--strategy softprompt``) are saved the same way: their tensors go to a
safetensors file beside ``program.json``, described under the key ``@torch``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stageopt._errors import ConfigurationError

if TYPE_CHECKING:  # building the parser must not import DSPy
    import dspy

#: The ``program.json`` key mapping routed stages to model names.
ROUTING = "@routing"

#: Strategies that sample whole-program configurations, and so can vary the structure.
STRUCTURE_STRATEGIES = ("joint", "random", "grid", "hierarchical", "multifidelity", "pareto")

#: Module types searched per stage with ``--search-structure``.
MODULE_CHOICES = ("predict", "cot")

#: Builds an LM from a model name (``stageopt.lm.resolve_lm`` with the run's options).
Resolve = Callable[[str], "dspy.BaseLM"]


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--models`` and ``--search-structure`` flags of ``stageopt optimize``."""
    parser.add_argument(
        "--models",
        default=None,
        metavar="NAME,NAME",
        help="search each stage's model among these (embedded names or LiteLLM strings, comma-separated); "
        "a stage left on choice 0 runs on --lm",
    )
    parser.add_argument(
        "--search-structure",
        action="store_true",
        help="also search the program's structure (task knobs such as hops, passages per hop, verification) "
        f"and each stage's module type (plain or chain of thought); strategies: {', '.join(STRUCTURE_STRATEGIES)}",
    )


def model_names(text: str | None) -> list[str]:
    """The names of a ``--models`` value, in order, without repeats.

    Raises:
        ConfigurationError: for an empty list or an empty name.
    """
    if text is None:
        return []
    names = [name.strip() for name in text.split(",")]
    if not names or any(not name for name in names):
        raise ConfigurationError(f"--models {text!r}: give comma-separated model names, e.g. gemma3-270m,smollm2-135m")
    return list(dict.fromkeys(names))


def build_models(names: Sequence[str], *, lm_name: str, lm: dspy.BaseLM, resolve: Resolve) -> dict[str, dspy.BaseLM]:
    """One LM per name, built once: the run's ``lm`` for its own name, ``resolve(name)`` for others."""
    return {name: lm if name == lm_name else resolve(name) for name in names}


def search_settings(args: argparse.Namespace, strategy: str) -> tuple[dict[str, Any], list[str]]:
    """The optimizer's ``settings`` for ``--models`` and ``--search-structure``, and the model names.

    The ``model`` knob's choices are the listed names other than ``--lm`` (choice 0, the stage's
    own LM, is ``--lm``).

    Raises:
        ConfigurationError: when ``--models`` lists only ``--lm``, or ``--search-structure`` is
            given for a strategy that searches stage by stage.
    """
    names = model_names(getattr(args, "models", None))
    settings: dict[str, Any] = {}
    if names:
        others = [n for n in names if n != args.lm]
        if not others:
            raise ConfigurationError(
                f"--models lists only --lm ({args.lm}); add another model to route stages to, e.g. "
                f"--models {args.lm},smollm2-135m"
            )
        settings["model"] = others
    if getattr(args, "search_structure", False):
        if strategy not in STRUCTURE_STRATEGIES:
            raise ConfigurationError(
                f"--search-structure needs a strategy that samples whole programs ({', '.join(STRUCTURE_STRATEGIES)}); "
                f"{strategy!r} searches stage by stage"
            )
        settings["structure"] = ["*"]
        settings["module"] = list(MODULE_CHOICES)
    return settings, names


def routing_of(program: dspy.Module, models: Mapping[str, dspy.BaseLM], *, skip: Sequence[str] = ()) -> dict[str, str]:
    """``{stage: model name}`` of the stages whose LM is one of ``models`` (by identity).

    Stages in ``skip`` are saved otherwise (e.g. those on a TorchLM) and left out.
    """
    by_id = {id(lm): name for name, lm in models.items()}
    out = {}
    for stage, predictor in program.named_predictors():
        if predictor.lm is not None and stage not in skip:
            name = by_id.get(id(predictor.lm))
            if name is None:
                raise ConfigurationError(
                    f"stage {stage!r} runs on an LM that is not among the run's models {sorted(models)}; "
                    "cannot save it by name"
                )
            out[stage] = name
    return out


def save_program(program: dspy.Module, path: Path, models: Mapping[str, dspy.BaseLM]) -> None:
    """Save ``program`` as DSPy does, its stages' LMs replaced by their names under :data:`ROUTING`.

    Stages on a TorchLM keep their learned tensors in a safetensors file beside ``path``.
    """
    from stageopt.lm._torch_io import PROGRAM_KEY, STATE_FILE, save_torch_stages, torch_stages

    trained = torch_stages(program)
    routing = routing_of(program, models, skip=list(trained))
    routed = [(p, p.lm) for _, p in program.named_predictors() if p.lm is not None]
    try:
        for predictor, _ in routed:
            predictor.lm = None
        program.save(str(path))
    finally:
        for predictor, lm in routed:
            predictor.lm = lm
    if routing or trained:
        state = json.loads(path.read_text())
        if routing:
            state[ROUTING] = routing
        if trained:
            state[PROGRAM_KEY] = save_torch_stages(trained, path.parent / STATE_FILE)
        path.write_text(json.dumps(state, indent=2) + "\n")


def load_program(program: dspy.Module, path: Path, *, lm_name: str, lm: dspy.BaseLM, resolve: Resolve) -> None:
    """Load ``path`` into ``program`` and route its stages as saved (each model built once).

    Raises:
        ConfigurationError: when the file cannot be read or names a stage the program lacks.
    """
    from stageopt.lm._torch_io import PROGRAM_KEY, attach, load_torch_stages

    try:
        saved = json.loads(path.read_text())
        routing = saved.get(ROUTING) or {}
        program.load(str(path))
    except Exception as exc:
        raise ConfigurationError(f"cannot load --program {path}: {exc}") from exc
    if saved.get(PROGRAM_KEY):
        attach(program, load_torch_stages(saved[PROGRAM_KEY], path.parent))
    stages = dict(program.named_predictors())
    unknown = [s for s in routing if s not in stages]
    if unknown:
        raise ConfigurationError(f"--program {path} routes unknown stage(s) {unknown}; the stages are {list(stages)}")
    models = build_models(sorted(set(routing.values())), lm_name=lm_name, lm=lm, resolve=resolve)
    for stage, name in routing.items():
        stages[stage].lm = models[name]

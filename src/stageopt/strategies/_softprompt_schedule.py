"""The training schedule of :class:`~stageopt.strategies.SoftPrompt`: optimizer, learning rate, epochs, stopping.

:class:`TrainingSchedule` groups the settings that decide how the torch training runs and when
it stops, so the strategy's constructor keeps the settings that decide *what* is trained. It
is a frozen value: validated when built, JSON-ready with :meth:`~TrainingSchedule.to_dict`,
and rebuilt from a mapping (a CLI ``--option schedule='{"epochs": 5}'``) with
:meth:`~TrainingSchedule.from_dict`, which refuses keys it does not know.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.strategies._checks import check_early_stopping

#: The torch optimizers a schedule may name.
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainingSchedule:
    """How :class:`~stageopt.strategies.SoftPrompt` trains: optimizer, schedule, clipping and early stopping.

    Every field has the default SoftPrompt used before the schedule had a name of its own.

    Args:
        optimizer: ``adamw`` (``torch.optim.AdamW``) or ``sgd`` (``torch.optim.SGD``, momentum 0.9).
        lr: Peak learning rate; None: the method's default (3e-2 for ``prompt``, 1e-3 for
            ``lora``), filled in by :meth:`with_default_lr`.
        weight_decay: Weight decay (decoupled for AdamW, L2 for SGD).
        warmup_ratio: Share of the steps with linear warmup before the cosine decay, in [0, 1).
        epochs: Maximum epochs.
        batch_size: Pairs per step (one stage per step).
        grad_clip: Maximum global gradient norm (None: no clipping).
        patience: Epochs without a validation improvement above ``min_delta`` before stopping
            (None: run every epoch).
        min_delta: Smallest validation improvement that resets the patience.

    Raises:
        ConfigurationError: for a value out of range or of the wrong type; the message names
            the field and the value.
    """

    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 3
    batch_size: int = 4
    grad_clip: float | None = 1.0
    patience: int | None = 2
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        optimizer = self.optimizer
        if optimizer not in OPTIMIZERS:
            raise ConfigurationError(f"`optimizer` must be 'adamw' or 'sgd', got {optimizer=}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigurationError(f"`{name}` must be an int >= 1, got {name}={value!r}")
        lr, grad_clip = self.lr, self.grad_clip
        if lr is not None and not (_is_number(lr) and lr > 0):
            raise ConfigurationError(f"`lr` must be positive or None, got {lr=}")
        weight_decay, warmup_ratio = self.weight_decay, self.warmup_ratio
        if not (_is_number(weight_decay) and _is_number(warmup_ratio)) or weight_decay < 0 or not 0 <= warmup_ratio < 1:
            raise ConfigurationError(
                f"need weight_decay >= 0 and 0 <= warmup_ratio < 1, got {weight_decay=}, {warmup_ratio=}"
            )
        if grad_clip is not None and not (_is_number(grad_clip) and grad_clip > 0):
            raise ConfigurationError(f"`grad_clip` must be positive or None, got {grad_clip=}")
        patience, min_delta = self.patience, self.min_delta
        if patience is not None and not _is_int(patience):
            raise ConfigurationError(f"`patience` must be >= 1 or None (no early stopping), got {patience=}")
        if not _is_number(min_delta):
            raise ConfigurationError(f"`min_delta` must be >= 0, got {min_delta=}")
        check_early_stopping(patience, min_delta)
        for name in ("lr", "weight_decay", "warmup_ratio", "grad_clip", "min_delta"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    def with_default_lr(self, lr: float) -> TrainingSchedule:
        """This schedule with ``lr`` filled in when it is None (the method's default rate)."""
        return self if self.lr is not None else dataclasses.replace(self, lr=lr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready schedule, one key per field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingSchedule:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises:
            ConfigurationError: for a key that is no field (the message lists the fields), or a
                bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"a training schedule must be a mapping of its fields, got {data!r}; e.g. {{'epochs': 5}}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigurationError(
                f"unknown training schedule setting(s) {', '.join(unknown)}; the settings are {', '.join(known)}"
            )
        return cls(**{str(k): v for k, v in data.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

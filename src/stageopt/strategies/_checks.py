"""Checks of settings every strategy shares, with errors that say what to pass instead."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import dspy

from stageopt._errors import ConfigurationError


def check_metric(metric: Callable[..., float]) -> None:
    """Raise a clear error unless ``metric(example, prediction)`` is a valid call."""
    if not callable(metric):
        raise TypeError(f"`metric` must be callable, got {metric!r}")
    try:
        inspect.signature(metric).bind(dspy.Example(), dspy.Prediction())
    except TypeError as exc:
        raise TypeError(f"`metric` must accept (example, prediction, trace=None) like a DSPy metric: {exc}") from exc
    except ValueError:  # builtins without a signature: accept
        pass


def check_early_stopping(patience: int | None, min_delta: float) -> None:
    """Raise a clear error for bad early-stopping settings (shared by the strategies)."""
    if patience is not None and patience < 1:
        raise ConfigurationError(f"`patience` must be >= 1 or None (no early stopping), got {patience=}")
    if min_delta < 0:
        raise ConfigurationError(f"`min_delta` must be >= 0, got {min_delta=}")

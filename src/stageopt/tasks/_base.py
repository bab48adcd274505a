"""The contract every benchmark task fulfils: data, program, metric and stage metrics."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import dspy

#: A stage metric scores one stage of one example, from the example and the final prediction
#: (the program exposes what the stage produced, e.g. the titles a query retrieved). 0.0-1.0.
StageMetric = Callable[[dspy.Example, dspy.Prediction], float]


class BaseTask(abc.ABC):
    """A benchmark task: where its data lives, the program that solves it and how it is scored.

    Subclasses set :attr:`name` (and :attr:`metric_name`) and implement the abstract methods.
    Instances are cheap and hold settings only (e.g. passages per hop); data is read when :meth:`load` is called.
    """

    name: ClassVar[str]
    #: What :meth:`metric` measures, as tables label it (e.g. ``"F1"``, ``"pass@1"``). An
    #: :meth:`extra_metrics` entry of the same name (case-insensitive) is the same number.
    metric_name: ClassVar[str] = "score"

    @abc.abstractmethod
    def load(self, split: str, *, n: int | None = None) -> list[dspy.Example]:
        """Read ``split`` (``"train"`` or ``"dev"``, or a path to a JSONL file), first ``n`` rows.

        Called by the CLI and benchmarks before any LM call. Returns examples whose inputs are
        set (``with_inputs``). Raises :class:`stageopt.DataError` naming file, line and field for
        a malformed row.
        """

    @abc.abstractmethod
    def program(self) -> dspy.Module:
        """Return a fresh, unoptimized program whose stages are its ``named_predictors()``."""

    def single_stage_program(self) -> dspy.Module | None:
        """A fresh one-stage baseline solving the task in a single LM call, or None (the default).

        ``stageopt compare`` scores it (unoptimized) beside the multi-stage program, to show what
        the stages are worth; a task without a natural single-stage form returns None and the row
        is marked unavailable.
        """
        return None

    @abc.abstractmethod
    def metric(self, example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        """The end-to-end score of one prediction, 0.0-1.0 (DSPy metric signature)."""

    def stage_metrics(self) -> Mapping[str, StageMetric]:
        """Per-stage metrics keyed by stage name (a ``named_predictors()`` name). Default: none."""
        return {}

    def extra_metrics(self) -> Mapping[str, Callable[[dspy.Example, dspy.Prediction], float]]:
        """Further end-to-end metrics reported beside :meth:`metric` (e.g. EM next to F1)."""
        return {}

"""The contract every benchmark task fulfils: data, program, metric and stage metrics."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import dspy

#: A stage metric scores one stage of one example, from the example and the final prediction
#: (the program exposes what the stage produced, e.g. the titles a query retrieved). 0.0-1.0.
StageMetric = Callable[[dspy.Example, dspy.Prediction], float]


@dataclass(frozen=True)
class OracleProgram:
    """A variant of a program whose upstream stages are replaced by gold intermediates.

    Scored end to end with the task's metric, it bounds what the downstream stage could reach
    with a perfect upstream.

    Attributes:
        description: What the variant measures, as tables print it
            (e.g. ``"answer stage given the gold supporting paragraphs"``).
        program: The variant; it holds copies of the downstream stages of the program it came
            from (same ``named_predictors()`` names) and never the program itself.
        gold_inputs: Example fields besides the task's inputs that the variant reads (gold
            labels such as ``gold_titles``); the caller adds them to each example's inputs.
    """

    description: str
    program: dspy.Module
    gold_inputs: tuple[str, ...] = ()


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

    def oracle_programs(self, program: dspy.Module) -> Mapping[str, OracleProgram]:
        """Variants of ``program`` fed gold intermediates, keyed by the downstream stage they isolate.

        Called by :func:`stageopt.diagnostics.diagnose` with the program it diagnoses; ``program``
        is not modified. A task whose data carry gold intermediates (HotpotQA's supporting
        paragraphs) returns one variant per stage it can isolate; a program whose stages do not
        fit gets none. Default: none.
        """
        return {}

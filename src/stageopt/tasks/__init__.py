"""Benchmark tasks: data, program, metric and stage metrics."""

from __future__ import annotations

from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.tasks._base import BaseTask, OracleProgram, StageMetric
from stageopt.tasks._data import DATA_DIR_ENV, data_dir
from stageopt.tasks.gsm8k import GSM8KTask
from stageopt.tasks.hotpotqa import HotpotQATask
from stageopt.tasks.humaneval import HumanEvalTask
from stageopt.tasks.mbpp import MBPPTask

TASKS: dict[str, type[BaseTask]] = {
    "hotpotqa": HotpotQATask,
    "gsm8k": GSM8KTask,
    "mbpp": MBPPTask,
    "humaneval": HumanEvalTask,
}


def get_task(name: str, **settings: Any) -> BaseTask:
    """Build the task registered as ``name``; raises listing the known names."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ConfigurationError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
    return cls(**settings)


__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "BaseTask",
    "GSM8KTask",
    "HotpotQATask",
    "HumanEvalTask",
    "MBPPTask",
    "OracleProgram",
    "StageMetric",
    "data_dir",
    "get_task",
]

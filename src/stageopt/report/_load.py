"""Reading a run directory: ``result.json`` (required) and whatever else the run left there.

A run directory of ``stageopt optimize`` holds ``result.json``, ``program.json`` and ``optuna.db``;
``stageopt demo`` adds ``before.json``/``after.json`` and ``stageopt diagnose --out`` adds
``diagnosis.json``. Only ``result.json`` is required: a missing optional file leaves its report
section with a hint, and an unreadable one becomes a note in the report (never a crash).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.strategies._result import OptimizationResult

logger = logging.getLogger(__name__)

#: The ``diagnosis.json`` schema this report reads (see ``stageopt.diagnostics``).
DIAGNOSIS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class StudyInfo:
    """What the report shows of one Optuna study in ``optuna.db``.

    Attributes:
        name: The study name.
        directions: ``"maximize"``/``"minimize"`` per objective (several: a multi-objective study).
        n_complete: Completed trials.
        n_trials: Trials in any state.
        values: Objective values of the completed trials, by trial number.
        pareto: Numbers of the trials on the Pareto front (multi-objective studies only).
        metric_names: The objectives' names when the study has them (``study.set_metric_names``).
    """

    name: str
    directions: tuple[str, ...]
    n_complete: int
    n_trials: int
    values: dict[int, tuple[float, ...]] = field(default_factory=dict)
    pareto: tuple[int, ...] = ()
    metric_names: tuple[str, ...] = ()

    @property
    def multi_objective(self) -> bool:
        """Whether the study has several objectives."""
        return len(self.directions) > 1


@dataclass(frozen=True)
class RunData:
    """One run directory, read.

    Attributes:
        path: The run directory.
        label: A short name for tables and legends (unique among the runs of one report).
        result: ``result.json``.
        program: ``program.json`` as saved by DSPy (None: absent).
        before: ``before.json``, an ``EvaluationReport`` dict (None: absent).
        after: ``after.json``, likewise.
        diagnosis: ``diagnosis.json``, a ``Diagnosis`` dict (None: absent).
        studies: The Optuna studies in ``optuna.db`` (empty: absent).
        notes: Problems met reading the optional files, shown in the report.
    """

    path: Path
    label: str
    result: OptimizationResult
    program: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    diagnosis: dict[str, Any] | None = None
    studies: tuple[StudyInfo, ...] = ()
    notes: tuple[str, ...] = ()


def load_run(path: str | Path, *, label: str | None = None) -> RunData:
    """Read the run directory ``path``.

    Args:
        path: A directory written by ``stageopt optimize`` (or ``demo``).
        label: Its name in the report (default: the directory name).

    Raises:
        ConfigurationError: when ``path`` is not a directory, or its ``result.json`` is missing,
            not JSON, or not an ``OptimizationResult`` of a supported schema (the message names the file).
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigurationError(f"{path} is not a directory; give a run directory written by `stageopt optimize`")
    result = _read_result(path / "result.json")
    notes: list[str] = []
    program = _optional_json(path / "program.json", notes, required_keys=())
    before = _optional_json(path / "before.json", notes, required_keys=("score", "stages"))
    after = _optional_json(path / "after.json", notes, required_keys=("score", "stages"))
    diagnosis = _optional_json(path / "diagnosis.json", notes, required_keys=("stages", "error_origins"))
    if diagnosis is not None and diagnosis.get("schema_version") != DIAGNOSIS_SCHEMA_VERSION:
        notes.append(
            f"{path / 'diagnosis.json'}: schema_version {diagnosis.get('schema_version')!r} is not supported "
            f"(this report reads {DIAGNOSIS_SCHEMA_VERSION}); rerun `stageopt diagnose ... --out {path}`"
        )
        diagnosis = None
    studies = _read_studies(path / "optuna.db", notes)
    for note in notes:
        logger.warning("%s", note)
    return RunData(
        path=path,
        label=label or path.resolve().name,
        result=result,
        program=program,
        before=before,
        after=after,
        diagnosis=diagnosis,
        studies=studies,
        notes=tuple(notes),
    )


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Read several run directories, labelled uniquely (parent folder added where names clash).

    Raises:
        ConfigurationError: for no paths, or as :func:`load_run`.
    """
    if not paths:
        raise ConfigurationError("no run directory given; pass one or more directories written by `stageopt optimize`")
    resolved = [Path(p).resolve() for p in paths]
    names = [p.name for p in resolved]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in resolved]
    counts = {label: labels.count(label) for label in labels}
    seen: dict[str, int] = {}
    for i, label in enumerate(list(labels)):  # still equal (same parent name): number them
        seen[label] = seen.get(label, 0) + 1
        if counts[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return [load_run(p, label=label) for p, label in zip(paths, labels, strict=True)]


def _read_result(file: Path) -> OptimizationResult:
    if not file.is_file():
        raise ConfigurationError(
            f"{file} does not exist; give a run directory written by `stageopt optimize` (it holds result.json)"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"{file} is not readable JSON ({exc}); rerun `stageopt optimize`") from exc
    missing = [k for k in ("strategy", "history", "baseline", "best") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConfigurationError(
            f"{file} is not a `stageopt optimize` result (no {', '.join(missing)}); "
            "give the run directory of `stageopt optimize`, not another command's output"
        )
    try:
        return OptimizationResult.from_dict(data)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{file}: {exc}") from exc
    except TypeError as exc:  # required fields missing
        raise ConfigurationError(f"{file} is not a complete `stageopt optimize` result: {exc}") from exc


def _optional_json(file: Path, notes: list[str], *, required_keys: tuple[str, ...]) -> dict[str, Any] | None:
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{file} could not be read and is left out: {exc}")
        return None
    if not isinstance(data, dict) or any(k not in data for k in required_keys):
        notes.append(f"{file} is not in the expected format (needs keys {', '.join(required_keys)}) and is left out")
        return None
    return data


def _read_studies(file: Path, notes: list[str]) -> tuple[StudyInfo, ...]:
    if not file.is_file():
        return ()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(f"sqlite:///{file.resolve()}", skip_table_creation=True)
            names = optuna.study.get_all_study_names(storage=storage)
            return tuple(_study_info(optuna.load_study(study_name=name, storage=storage)) for name in names)
    except Exception as exc:  # a foreign or newer database: the report goes on without it
        notes.append(f"{file} could not be read as an Optuna study and is left out: {type(exc).__name__}: {exc}")
        return ()


def _study_info(study: Any) -> StudyInfo:
    import optuna

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None]
    directions = tuple(d.name.lower() for d in study.directions)
    pareto: tuple[int, ...] = ()
    if len(directions) > 1 and complete:
        pareto = tuple(sorted(t.number for t in study.best_trials))
    return StudyInfo(
        name=study.study_name,
        directions=directions,
        n_complete=len(complete),
        n_trials=len(trials),
        values={t.number: tuple(float(v) for v in t.values) for t in complete},
        pareto=pareto,
        metric_names=tuple(getattr(study, "metric_names", None) or ()),
    )

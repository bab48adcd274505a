"""Locating and reading the shared JSONL datasets, with row validation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stageopt._errors import DataError

#: Environment variable that overrides where ``<task>/{train,dev}.jsonl`` are found.
DATA_DIR_ENV = "STAGEOPT_DATA_DIR"


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder that holds ``<task>/{train,dev}.jsonl``.

    Order: ``override``, then ``$STAGEOPT_DATA_DIR``, then ``../shared/data`` beside the
    repository root (found from the current directory and from this file's location).
    """
    if override is not None:
        return _existing(Path(override), "the --data-dir argument")
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return _existing(Path(env), f"${DATA_DIR_ENV}")
    candidates = [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]
    for base in candidates:
        guess = base.parent / "shared" / "data"
        if guess.is_dir():
            return guess
    raise DataError(
        "cannot find the shared datasets: looked for ../shared/data beside the repository; "
        f"set ${DATA_DIR_ENV} or pass --data-dir to the folder that holds <task>/train.jsonl"
    )


def _existing(path: Path, origin: str) -> Path:
    if not path.is_dir():
        raise DataError(f"data folder {path} (from {origin}) does not exist or is not a folder")
    return path


def resolve_split(task: str, split: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Map ``split`` (``train``/``dev`` or a path to a .jsonl file) to an existing file."""
    path = Path(split) if split.endswith(".jsonl") or os.sep in split else data_dir(root) / task / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"dataset file {path} not found; known splits are train and dev, or give a .jsonl path")
    return path


def read_jsonl(
    path: Path,
    fields: Mapping[str, type | tuple[type, ...]],
    *,
    n: int | None = None,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> list[dict[str, Any]]:
    """Read up to ``n`` rows of ``path``, checking each required field's presence and type.

    ``check`` may validate a row further: it returns what is wrong with it (e.g. "field
    'context' must hold ...") or None, and the message is raised with the file and line.

    Raises:
        DataError: naming the file, the 1-based line number and the field, for invalid JSON,
            a non-object row, a missing field or a field of the wrong type.
    """
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if n is not None and len(rows) >= n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove the line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field, kind in fields.items():
                if field not in row:
                    raise DataError(f"{path}:{lineno}: missing field {field!r}; every row needs {sorted(fields)}")
                if not isinstance(row[field], kind):
                    raise DataError(
                        f"{path}:{lineno}: field {field!r} should be {_kind_name(kind)}, "
                        f"got {type(row[field]).__name__}"
                    )
            problem = check(row) if check is not None else None
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows read; the file is empty")
    return rows


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)

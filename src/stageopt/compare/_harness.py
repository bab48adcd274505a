"""The comparison grid: every method x seed on one budget, scored, written after every cell.

A *cell* is one method on one seed. For each cell the harness runs the method on the task's
train split (:mod:`stageopt.compare._methods`), then scores the program it returns on the
evaluation sets, which selection never sees: the first ``n_eval`` examples of ``eval_split``
and, when given, every example of a ``test`` file. ``results.json`` is rewritten (atomically)
after every cell; a resumed comparison skips the cells it holds (cells that ended in an error
are run again).

Two rows need no optimization: ``unoptimized`` (the task's program as is) and ``single_stage``
(:meth:`~stageopt.tasks.BaseTask.single_stage_program`). The LM is deterministic (T=0), so
they are evaluated once and that evaluation stands for every seed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.compare._methods import MethodContext, MethodOutcome, methods
from stageopt.evaluation import EvaluationReport, Usage, evaluate
from stageopt.tasks import BaseTask

logger = logging.getLogger(__name__)

#: Version of ``results.json``.
RESULTS_SCHEMA_VERSION = 1

#: Rows that are evaluated without optimization, once for all seeds.
BASELINE_ROWS = ("unoptimized", "single_stage")


@dataclass(frozen=True)
class CompareConfig:
    """The settings of one comparison; those in :meth:`identity` must match to resume.

    Attributes:
        task: Task name (for the record).
        methods: Method names, in table order.
        seeds: Seeds; each method runs once per seed.
        budget_calls: Logical LM calls per cell (proposals and reflection included).
        val_size: Validation examples (from train) candidates are selected on.
        bootstrap_size: Training examples traced for demos.
        confirm_size: Held-out training examples stageopt's strategies confirm their choice on.
        racing: Whether stageopt's strategies race candidates on the validation set.
        eval_split: Split the final programs are scored on.
        n_eval: Examples of ``eval_split`` scored (0: none, only ``test``).
        test: Path of a JSONL file in the task's format, also scored, never used in selection.
        num_threads: Examples evaluated in parallel.
        lm: The task LM's name (for the record).
        adapter: The adapter's name (for the record).
    """

    task: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    budget_calls: int
    val_size: int = 10
    bootstrap_size: int = 8
    eval_split: str = "dev"
    n_eval: int = 20
    test: str | None = None
    num_threads: int = 1
    lm: str | None = None
    adapter: str | None = None
    confirm_size: int = 20
    racing: bool = True

    def __post_init__(self) -> None:
        checks = (
            ("confirm_size", self.confirm_size, 0),
            ("budget_calls", self.budget_calls, 1),
            ("val_size", self.val_size, 1),
            ("bootstrap_size", self.bootstrap_size, 1),
            ("n_eval", self.n_eval, 0),
            ("num_threads", self.num_threads, 1),
        )
        for name, value, low in checks:
            if value < low:
                raise ConfigurationError(f"`{name}` must be >= {low}, got {name}={value}")
        if not self.seeds:
            raise ConfigurationError("`seeds` is empty: give at least one seed")
        if not self.methods:
            raise ConfigurationError("`methods` is empty: give at least one method")
        if self.n_eval == 0 and self.test is None:
            raise ConfigurationError("nothing to score the final programs on: n_eval=0 and no test file")

    def identity(self) -> dict[str, Any]:
        """The settings every cell of one results.json shares (methods and seeds may grow)."""
        data = asdict(self)
        for key in ("methods", "seeds", "num_threads"):
            data.pop(key)
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        data = asdict(self)
        data["methods"], data["seeds"] = list(self.methods), list(self.seeds)
        return data


def cell_key(method: str, seed: int | None) -> str:
    """``method/seedN``, or ``method/all`` for the rows evaluated once for every seed."""
    return f"{method}/{'all' if seed is None else f'seed{seed}'}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that a reader (or an interrupted run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _usage(usage: Usage, wall_s: float) -> dict[str, Any]:
    return {**usage.to_dict(), "tokens": usage.tokens, "wall_s": round(wall_s, 3)}


def _scores(report: EvaluationReport) -> dict[str, Any]:
    return {
        "score": report.score,
        "ci95": list(report.ci95),
        "n": report.n,
        "errors": report.errors,
        "parse_rate": report.parse_rate,
        "stage_metrics": report.stage_metrics,
        "extra": report.extra,
        "usage": report.usage.to_dict(),
        "example_scores": [e.score for e in report.examples],
    }


class Comparison:
    """Runs the grid of a :class:`CompareConfig` into ``out`` (``results.json``, ``programs/``).

    Args:
        config: The comparison's settings.
        task: The task (its ``train`` split is the only data selection sees).
        lm: The task LM, shared by every method.
        adapter: The adapter programs run with.
        out: Output folder.
        resume: Continue the results.json in ``out``; without it an existing one is refused.
        progress: Called with a one-line message after each cell (the CLI prints it).
    """

    def __init__(
        self,
        config: CompareConfig,
        task: BaseTask,
        lm: dspy.BaseLM,
        adapter: dspy.Adapter | None,
        out: str | Path,
        *,
        resume: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        known = methods()
        unknown = [m for m in config.methods if m not in known]
        if unknown:
            raise ConfigurationError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
        self.config = config
        self.task = task
        self.lm = lm
        self.adapter = adapter
        self.out = Path(out)
        self.resume = resume
        self.progress = progress or (lambda _line: None)
        self.results = self._open()
        self.results["metric"] = task.metric_name

    @property
    def path(self) -> Path:
        """Where results.json lives."""
        return self.out / "results.json"

    def _open(self) -> dict[str, Any]:
        if self.path.exists() and not self.resume:
            raise ConfigurationError(
                f"{self.out} already holds a comparison; pass --resume to continue it or choose another --out"
            )
        if not self.resume or not self.path.exists():
            if self.resume:
                logger.warning("--resume: no results.json in %s; starting a new comparison", self.out)
            return {"schema_version": RESULTS_SCHEMA_VERSION, "settings": self.config.to_dict(), "cells": {}}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"cannot resume: {self.path} is not valid JSON ({exc})") from exc
        if data.get("schema_version") != RESULTS_SCHEMA_VERSION:
            raise ConfigurationError(
                f"cannot resume: {self.path} has schema_version {data.get('schema_version')!r}, "
                f"this stageopt writes {RESULTS_SCHEMA_VERSION}"
            )
        stored = {k: v for k, v in data.get("settings", {}).items() if k in self.config.identity()}
        differ = {k: (stored.get(k), v) for k, v in self.config.identity().items() if stored.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
            raise ConfigurationError(f"cannot resume {self.path} with other settings ({listed}); use another --out")
        old = data["settings"]
        data["settings"] = self.config.to_dict()
        data["settings"]["methods"] = list(dict.fromkeys([*old.get("methods", []), *self.config.methods]))
        data["settings"]["seeds"] = sorted({*old.get("seeds", []), *self.config.seeds})
        return data

    def done(self, key: str) -> bool:
        """Whether cell ``key`` finished (an error cell is not finished)."""
        cell = self.results["cells"].get(key)
        return cell is not None and cell.get("status") != "error"

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.results)

    def run(self, *, report: bool = True) -> dict[str, Any]:
        """Run every unfinished cell; returns the results (also in ``out/results.json``).

        With ``report``, ``table.md`` and ``convergence.png`` are written at the end (matplotlib
        is needed for the plot: ``pip install 'stageopt[bench]'``).
        """
        start = time.monotonic()
        trainset = self.task.load("train")
        eval_sets: dict[str, list[dspy.Example]] = {}
        if self.config.n_eval:
            eval_sets[self.config.eval_split] = self.task.load(self.config.eval_split, n=self.config.n_eval)
        if self.config.test is not None:
            eval_sets["test"] = self.task.load(self.config.test)
        self._save()
        todo = [
            *(cell_key(row, None) for row in BASELINE_ROWS),
            *(cell_key(m, s) for m in self.config.methods for s in self.config.seeds),
        ]
        pending = [k for k in todo if not self.done(k)]
        if len(pending) < len(todo):
            self.progress(f"resuming: {len(todo) - len(pending)} of {len(todo)} cells already done")
        for index, key in enumerate(pending, 1):
            method, _, seed_part = key.partition("/")
            seed = None if seed_part == "all" else int(seed_part.removeprefix("seed"))
            if seed is None:
                cell = self._baseline_cell(method, eval_sets)
            else:
                cell = self._method_cell(method, seed, trainset, eval_sets)
            self.results["cells"][key] = cell
            self.results["wall_s"] = round(self.results.get("wall_s", 0.0) + time.monotonic() - start, 1)
            start = time.monotonic()
            self._save()
            self.progress(f"[{index}/{len(pending)}] {key}: {_cell_line(cell)}")
        if report:
            from stageopt.compare._report import write_report

            write_report(self.results, self.out)
        return self.results

    def _evaluate(self, program: dspy.Module, eval_sets: dict[str, list[dspy.Example]]) -> dict[str, Any]:
        scores = {}
        for name, examples in eval_sets.items():
            report = evaluate(
                program,
                examples,
                self.task.metric,
                lm=self.lm,
                adapter=self.adapter,
                stage_metrics=self.task.stage_metrics(),
                extra_metrics=self.task.extra_metrics(),
                num_threads=self.config.num_threads,
                max_errors=len(examples),
                desc=name,
            )
            scores[name] = _scores(report)
        return scores

    def _baseline_cell(self, row: str, eval_sets: dict[str, list[dspy.Example]]) -> dict[str, Any]:
        program = self.task.program() if row == "unoptimized" else self.task.single_stage_program()
        cell: dict[str, Any] = {"method": row, "seed": None, "status": "completed", "usage": _usage(Usage(), 0.0)}
        if program is None:
            return {**cell, "status": "unavailable", "note": f"task {self.task.name!r} has no single-stage program"}
        cell["note"] = "no optimization; deterministic LM (T=0): one evaluation stands for every seed"
        cell["eval"] = self._evaluate(program, eval_sets)
        return cell

    def _method_cell(
        self, method: str, seed: int, trainset: list[dspy.Example], eval_sets: dict[str, list[dspy.Example]]
    ) -> dict[str, Any]:
        ctx = MethodContext(
            task=self.task,
            lm=self.lm,
            adapter=self.adapter,
            trainset=trainset,
            budget_calls=self.config.budget_calls,
            seed=seed,
            val_size=self.config.val_size,
            bootstrap_size=self.config.bootstrap_size,
            num_threads=self.config.num_threads,
            confirm_size=self.config.confirm_size,
            racing=self.config.racing,
        )
        cell: dict[str, Any] = {"method": method, "seed": seed}
        begin = time.perf_counter()
        try:
            outcome: MethodOutcome = methods()[method](ctx)
        except Exception as exc:
            logger.debug("%s seed %d failed", method, seed, exc_info=True)
            return {**cell, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
        wall = time.perf_counter() - begin
        programs = self.out / "programs"
        programs.mkdir(parents=True, exist_ok=True)
        program_path = programs / f"{method}-seed{seed}.json"
        outcome.program.save(str(program_path))
        cell.update(
            status=outcome.status,
            note=outcome.note,
            settings=outcome.settings,
            usage=_usage(outcome.usage, wall),
            validation={"best": outcome.val_score, "n": self.config.val_size},
            curve=[[calls, score] for calls, score in outcome.curve],
            program=str(program_path.relative_to(self.out)),
        )
        cell["eval"] = self._evaluate(outcome.program, eval_sets)
        return cell


def _cell_line(cell: dict[str, Any]) -> str:
    if cell.get("status") == "error":
        return f"error: {cell.get('error')}"
    parts = [str(cell.get("status"))]
    best = (cell.get("validation") or {}).get("best")
    if best is not None:
        parts.append(f"validation {best:.3f}")
    for name, scores in (cell.get("eval") or {}).items():
        parts.append(f"{name} score {scores['score']:.3f}")
    usage = cell.get("usage") or {}
    if usage.get("lm_calls"):
        parts.append(f"{usage['lm_calls']} LM calls, {usage['wall_s']:.0f} s")
    return ", ".join(parts)


def selected_rows(results: dict[str, Any]) -> Sequence[str]:
    """Row names in table order: the baselines, then the methods as listed in the settings."""
    return [*BASELINE_ROWS, *results["settings"]["methods"]]

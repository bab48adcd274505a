"""Shared by the code tasks: code extraction, the generate -> test -> refine program, scoring.

The program has two stages. ``generate`` writes code from the task prompt and the one visible
test; the code runs against the visible test in the sandbox; ``refine`` rewrites it from the
sandbox's error. When the visible test already passes, ``refine`` is skipped (no LM call: the
code passes through unchanged) because rewriting passing code can only lose; its stage metric
is still computed on the code it passes on. The final code is scored on all tests (hidden).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.sandbox import SandboxResult, run_tests
from stageopt.tasks._base import BaseTask, StageMetric

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_CODE_START = re.compile(r"^(def |class |import |from |@|async def )", re.M)
_KEEP = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign)


def extract_code(text: str) -> str:
    """The Python definitions in a model's answer: fences, prose and trailing calls removed.

    Takes the first fenced block if there is one, starts at the first ``def``/``class``/import,
    keeps the longest prefix that parses, and of it only imports, definitions and assignments
    (a base model often appends example calls, asserts or prints).
    """
    text = (text or "").replace("\r\n", "\n")
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start = _CODE_START.search(text)
    if start is None:
        return text.strip()
    lines = text[start.start() :].split("\n")
    for end in range(len(lines), 0, -1):
        source = "\n".join(lines[:end])
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        kept = []
        for node in tree.body:
            if isinstance(node, _KEEP):
                first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
                kept.append("\n".join(lines[first - 1 : node.end_lineno]))
        return "\n".join(kept).strip() if kept else source.strip()
    return "\n".join(lines).strip()


def complete_code(text: str, task: str, entry_point: str = "") -> str:
    """:func:`extract_code`, or, when ``entry_point`` is given and the answer does not define it,
    the answer read as the function's body continuing the signature and docstring in ``task``."""
    code = extract_code(text)
    if not entry_point or re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        return code
    start = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", task, re.M)
    if start is None:
        return code
    fenced = _FENCE.search(text or "")
    body = (fenced.group(1) if fenced else text or "").replace("\r\n", "\n").strip("\n")
    if body and not body[0].isspace():
        body = "\n".join(f"    {line}" if line.strip() else line for line in body.split("\n"))
    return extract_code(task[start.start() :].rstrip() + "\n" + body)


def function_name(test: str) -> str | None:
    """The function an ``assert f(...) == ...`` test calls, or None."""
    match = re.search(r"assert\s+\(?\s*(?:not\s+)?(?:\w+\()?\s*([A-Za-z_]\w*)\s*\(", test)
    return match.group(1) if match else None


class GenerateCode(dspy.Signature):
    """Write a Python function that solves the task and passes the test. Answer with code only."""

    task: str = dspy.InputField()
    test: str = dspy.InputField()
    code: str = dspy.OutputField()


class RefineCode(dspy.Signature):
    """The code fails the test with the error shown. Write a corrected Python function, code only."""

    task: str = dspy.InputField()
    test: str = dspy.InputField()
    previous_code: str = dspy.InputField()
    error: str = dspy.InputField()
    code: str = dspy.OutputField()


def check_sandbox_settings(timeout_s: float, memory_mb: int) -> None:
    """Raise :class:`ConfigurationError` for a non-positive timeout or under 64 MB of memory."""
    if not timeout_s > 0:
        raise ConfigurationError(f"`timeout_s` must be positive, got {timeout_s=}")
    if memory_mb < 64:
        raise ConfigurationError(f"`memory_mb` must be >= 64, got {memory_mb=}")


class SandboxSettings:
    """Limits for every sandbox run of a code task (each run is a fresh process)."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512) -> None:
        check_sandbox_settings(timeout_s, memory_mb)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def run(self, code: str, tests: list[str], setup: str = "") -> SandboxResult:
        return run_tests(code, tests, setup, timeout_s=self.timeout_s, memory_mb=self.memory_mb)


class GenerateTestRefine(dspy.Module):
    """Stages ``generate`` and ``refine``; the visible test runs in the sandbox between them.

    ``forward`` inputs: ``task`` (what the model is shown), ``test`` (the visible test, shown
    too), ``setup`` (run before the test, not shown) and ``preamble`` (code put before the
    model's code, e.g. HumanEval's imports; not shown). The prediction holds ``code`` (final),
    ``generated_code``, ``visible_after_generate``, ``visible_after_refine``, ``refined`` and
    ``visible_error`` (the sandbox error the refine stage saw, empty if it was skipped).
    """

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512) -> None:
        super().__init__()
        self.sandbox = SandboxSettings(timeout_s=timeout_s, memory_mb=memory_mb)
        self.generate = dspy.Predict(GenerateCode)
        self.refine = dspy.Predict(RefineCode)

    def forward(
        self, task: str, test: str, setup: str = "", preamble: str = "", entry_point: str = ""
    ) -> dspy.Prediction:
        generated = complete_code(self.generate(task=task, test=test).code, task, entry_point)
        first = self.sandbox.run(join_code(preamble, generated), [test], setup)
        code, after_refine, refined, error = generated, first.ok, False, ""
        if not first.ok:
            error = first.error or first.status
            answer = self.refine(task=task, test=test, previous_code=generated, error=error).code
            revised = complete_code(answer, task, entry_point)
            refined = True
            if revised:
                code = revised
                after_refine = self.sandbox.run(join_code(preamble, code), [test], setup).ok
        return dspy.Prediction(
            code=code,
            generated_code=generated,
            visible_after_generate=first.ok,
            visible_after_refine=after_refine,
            refined=refined,
            visible_error=error,
        )


def join_code(preamble: str, code: str) -> str:
    """``preamble`` then ``code``, each ending with a newline."""
    return f"{preamble.rstrip()}\n\n{code}\n" if preamble.strip() else f"{code}\n"


def code_stage_metrics() -> Mapping[str, StageMetric]:
    """Visible-test pass after ``generate`` and after ``refine`` (0.0 or 1.0 per example)."""
    return {
        "generate": lambda ex, pred: float(bool(pred.get("visible_after_generate"))),
        "refine": lambda ex, pred: float(bool(pred.get("visible_after_refine"))),
    }


def final_code(prediction: Any) -> str:
    """The prediction's final code ('' when absent)."""
    return str(prediction.get("code") or "") if prediction is not None else ""


class CodeTask(BaseTask):
    """What the code tasks share: sandbox limits, the generate/refine program, its stage metrics.

    Args:
        timeout_s: Wall-clock limit of each sandbox run (visible test, hidden tests).
        memory_mb: Memory limit of each sandbox run.
        data_dir: Folder holding ``<task>/{train,dev}.jsonl`` (default: see ``data_dir()``).
    """

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, data_dir: str | Path | None = None):
        check_sandbox_settings(timeout_s, memory_mb)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.data_dir = data_dir

    def program(self) -> dspy.Module:
        """A fresh :class:`GenerateTestRefine`."""
        return GenerateTestRefine(timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def sandbox(self) -> SandboxSettings:
        """The sandbox limits final code is checked with."""
        return SandboxSettings(timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def stage_metrics(self) -> Mapping[str, StageMetric]:
        """Visible-test pass rate after ``generate`` and after ``refine``."""
        return code_stage_metrics()

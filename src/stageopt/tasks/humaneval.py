"""HumanEval as code generation with refinement (same program as MBPP).

The model sees the prompt (signature and docstring) and one visible test: the first top-level
``assert`` of ``check(candidate)`` with ``candidate`` replaced by the entry point. The final
code must pass ``check(<entry_point>)`` (pass@1). An answer that does not define the entry
point is read as the function's body. Code before ``def <entry_point>`` in the prompt (imports,
helper functions) is put before the model's code.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import dspy

from stageopt.tasks._code import (
    CodeTask,
    final_code,
    join_code,
)
from stageopt.tasks._data import read_jsonl, resolve_split


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.Name(id=self.new, ctx=node.ctx) if node.id == self.old else node


def split_test(test: str, entry_point: str) -> tuple[str, str]:
    """``(visible_test, setup)`` from a HumanEval ``test`` module.

    The visible test is the first top-level ``assert`` in ``check`` calling the entry point
    directly; the setup holds the module's and ``check``'s imports (the assert may need them).
    Falls back to the whole ``check(entry_point)`` when there is no such assert.
    """
    tree = ast.parse(test)
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    visible = None
    if check is not None:
        imports += [n for n in check.body if isinstance(n, ast.Import | ast.ImportFrom)]
        param = check.args.args[0].arg if check.args.args else "candidate"
        for node in check.body:
            if isinstance(node, ast.Assert):
                visible = ast.unparse(_Rename(param, entry_point).visit(node))
                break
    setup = "\n".join(ast.unparse(n) for n in imports)
    if visible is None:
        return f"{test.strip()}\ncheck({entry_point})", setup
    return visible, setup


def _preamble(prompt: str, entry_point: str) -> str:
    match = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", prompt, re.M)
    return prompt[: match.start()].rstrip() if match else ""


def _check_row(row: dict[str, Any]) -> str | None:
    if not re.search(rf"def\s+{re.escape(row['entry_point'])}\s*\(", row["prompt"]):
        return f"field 'prompt' does not define the entry point {row['entry_point']!r}"
    try:
        ast.parse(row["test"])
    except SyntaxError as exc:
        return f"field 'test' is not valid Python ({exc.msg})"
    if "def check(" not in row["test"]:
        return "field 'test' must define check(candidate)"
    return None


class HumanEvalTask(CodeTask):
    """HumanEval from ``../shared/data/humaneval``.

    Args:
        timeout_s: Wall-clock limit of each sandbox run.
        memory_mb: Memory limit of each sandbox run.
        data_dir: Folder holding ``humaneval/{train,dev}.jsonl`` (default: see ``data_dir()``).
    """

    name = "humaneval"
    metric_name = "pass@1"

    def load(self, split: str, *, n: int | None = None) -> list[dspy.Example]:
        """Examples with inputs ``task``, ``test``, ``setup``, ``preamble`` and ``entry_point``."""
        path = resolve_split(self.name, split, self.data_dir)
        fields = {"id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str}
        rows = read_jsonl(path, fields, n=n, check=_check_row)
        examples = []
        for row in rows:
            entry = row["entry_point"]
            visible, setup = split_test(row["test"], entry)
            examples.append(
                dspy.Example(
                    id=row["id"],
                    task=row["prompt"],
                    test=visible,
                    setup=setup,
                    preamble=_preamble(row["prompt"], entry),
                    entry_point=entry,
                    check=row["test"],
                    reference=row["prompt"] + row["canonical_solution"],
                ).with_inputs("task", "test", "setup", "preamble", "entry_point")
            )
        return examples

    def metric(self, example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        """pass@1: 1.0 when the final code passes ``check(entry_point)``, else 0.0."""
        code = final_code(prediction)
        if not code.strip():
            return 0.0
        sandbox = self.sandbox()
        program = join_code(example.preamble, code)
        return float(sandbox.run(program, [f"check({example.entry_point})"], example.check).ok)

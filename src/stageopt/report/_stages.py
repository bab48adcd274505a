"""Each stage's final instruction and demos beside the unoptimized program's, and their diff."""

from __future__ import annotations

import difflib
import html
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stageopt.report._load import RunData

logger = logging.getLogger(__name__)

#: Demo keys that are DSPy's bookkeeping, not fields of the example.
_HIDDEN_DEMO_KEYS = frozenset({"augmented"})


@dataclass(frozen=True)
class StageChange:
    """One stage of a run: what the unoptimized program had and what the optimized one has.

    Attributes:
        name: The stage (a ``named_predictors()`` name).
        original_instruction: The unoptimized program's instruction (None: unknown).
        final_instruction: The optimized program's instruction (None: unknown).
        original_demos: The unoptimized program's demos, as field dicts (None: unknown).
        final_demos: The optimized program's demos (None: unknown).
        params: The chosen configuration of the stage (``result.best["params"]``).
    """

    name: str
    original_instruction: str | None
    final_instruction: str | None
    original_demos: tuple[dict[str, Any], ...] | None
    final_demos: tuple[dict[str, Any], ...] | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def instruction_changed(self) -> bool:
        """Whether both instructions are known and differ."""
        known = self.original_instruction is not None and self.final_instruction is not None
        return known and self.original_instruction != self.final_instruction


def stage_changes(run: RunData) -> tuple[list[StageChange], str]:
    """The stages of ``run``'s optimized program against the unoptimized program of its task.

    The optimized program is the task's program with ``program.json`` loaded into it (as
    ``stageopt eval --program`` does); when the run names no task or the task cannot load it,
    ``program.json`` is read as plain JSON and the original is unknown. Without ``program.json``
    the instructions come from ``result.json``'s best configuration and the demos are unknown.

    Returns:
        The stages in program order, and one sentence saying where the texts came from.
    """
    params: dict[str, dict[str, Any]] = dict(run.result.best.get("params") or {})
    task_name = run.result.task
    original: dict[str, tuple[str, tuple[dict[str, Any], ...]]] | None = None
    final: dict[str, tuple[str, tuple[dict[str, Any], ...]]] | None = None
    problem = ""
    if task_name:
        try:
            original, final = _from_task(task_name, run)
        except Exception as exc:  # the report goes on with what program.json says
            problem = f" (task {task_name!r} could not load it: {type(exc).__name__}: {exc})"
            logger.warning("%s: task program not used: %s", run.path, exc)
    if final is None and run.program is not None:
        final = _from_json(run.program)
        source = f"program.json read as JSON{problem}; the unoptimized program is unknown"
        if not task_name:
            source = "program.json read as JSON; result.json names no task, so the unoptimized program is unknown"
    elif final is None:
        source = "program.json is missing: instructions from result.json's best configuration, demos unknown"
    else:
        against = "against program.json" if run.program is not None else "(program.json is missing)"
        source = f"the unoptimized program of task {task_name} {against}"
    names = list(dict.fromkeys([*(original or {}), *(final or {}), *params]))
    changes = []
    for name in names:
        orig = (original or {}).get(name)
        fin = (final or {}).get(name)
        final_instruction = fin[0] if fin else params.get(name, {}).get("instruction_text")
        changes.append(
            StageChange(
                name=name,
                original_instruction=orig[0] if orig else None,
                final_instruction=final_instruction,
                original_demos=orig[1] if orig else None,
                final_demos=fin[1] if fin else None,
                params=dict(params.get(name, {})),
            )
        )
    return changes, source


def _from_task(
    task_name: str, run: RunData
) -> tuple[dict[str, tuple[str, tuple[dict[str, Any], ...]]], dict[str, tuple[str, tuple[dict[str, Any], ...]]] | None]:
    from stageopt.tasks import get_task

    task = get_task(task_name)
    original = {name: _predictor_state(p) for name, p in task.program().named_predictors()}
    if run.program is None:
        return original, None
    program = task.program()
    program.load(str(run.path / "program.json"))
    return original, {name: _predictor_state(p) for name, p in program.named_predictors()}


def _predictor_state(predictor: Any) -> tuple[str, tuple[dict[str, Any], ...]]:
    return str(predictor.signature.instructions), tuple(_demo_dict(d) for d in predictor.demos)


def _from_json(program: Mapping[str, Any]) -> dict[str, tuple[str, tuple[dict[str, Any], ...]]]:
    out = {}
    for name, state in program.items():
        if isinstance(state, dict) and isinstance(state.get("signature"), dict):
            demos = state.get("demos") or []
            out[name] = (str(state["signature"].get("instructions", "")), tuple(_demo_dict(d) for d in demos))
    return out


def _demo_dict(demo: Any) -> dict[str, Any]:
    if hasattr(demo, "toDict"):
        return dict(demo.toDict())
    return dict(demo) if isinstance(demo, Mapping) else {"demo": str(demo)}


def demos_text(demos: Iterable[dict[str, Any]] | None) -> str:
    """Demos as readable text: one block per demo, one ``field: value`` line per field."""
    if demos is None:
        return ""
    blocks = []
    for i, demo in enumerate(demos, 1):
        kind = " (bootstrapped)" if demo.get("augmented") else ""
        lines = [f"demo {i}{kind}"]
        for key, value in demo.items():
            if key not in _HIDDEN_DEMO_KEYS:
                lines.append(f"  {key}: {value}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


_TOKEN = re.compile(r"\s+|[^\s]+")


def diff_html(old: str, new: str) -> str:
    """A word-level diff of ``old`` to ``new`` as escaped HTML: ``<del>`` removed, ``<ins>`` added."""
    a, b = _TOKEN.findall(old), _TOKEN.findall(new)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape("".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(f"<del>{html.escape(''.join(a[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{html.escape(''.join(b[j1:j2]))}</ins>")
    return "".join(out)


def diff_text(old: str, new: str, *, old_name: str = "original", new_name: str = "optimized") -> str:
    """A unified line diff of ``old`` to ``new`` (for the Markdown summary); empty when equal."""
    lines = difflib.unified_diff(
        old.splitlines(), new.splitlines(), fromfile=old_name, tofile=new_name, lineterm="", n=1
    )
    return "\n".join(lines)

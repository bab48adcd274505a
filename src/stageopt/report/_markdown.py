"""The report's Markdown summary (``report.md``): the same tables and texts, plots left to the HTML page."""

from __future__ import annotations

from stageopt.report._content import ReportContent, RunSection, Table
from stageopt.report._stages import StageChange, demos_text, diff_text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    """A :class:`Table` as a pipe table with its caption in bold and its note in italics."""
    lines = [f"**{table.caption}**", ""]
    lines.append("| " + " | ".join(_cell(h) or " " for h in table.headers) + " |")
    lines.append("|" + "---|" * len(table.headers))
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines)


def render_markdown(content: ReportContent, *, html_name: str | None = None) -> str:
    """The whole summary; ``html_name`` is the HTML report's file name, linked for the plots."""
    parts = [f"# {content.title}", "", f"Generated {content.generated} by `stageopt report`."]
    if html_name:
        plots = "convergence, training curves, attribution, error origins, Pareto"
        parts.append(f"Plots ({plots}): [{html_name}]({html_name}).")
    parts += ["", table_markdown(content.summary)]
    parts += [_run_markdown(s) for s in content.runs]
    return "\n".join(parts).rstrip() + "\n"


def _run_markdown(s: RunSection) -> str:
    r = s.run.result
    parts = ["", f"## Run {s.index}: {s.run.label} — {r.strategy} on {r.task or 'an unnamed task'}", ""]
    parts += [f"> **note:** {note}" for note in s.run.notes]
    parts += ["", table_markdown(s.stage_table)]
    if s.training_table is not None:
        parts += ["", "### Training curves", "", table_markdown(s.training_table)]
    parts += ["", "### Where the errors come from", ""]
    parts += [f"- {hint}" for hint in s.diagnosis_hints]
    for table in s.diagnosis_tables:
        parts += ["", table_markdown(table)]
    parts += ["", "### Instructions and demos", "", f"From {s.changes_source}.", ""]
    parts += [_change_markdown(c) for c in s.changes]
    parts += ["", "### Optuna study", ""]
    parts += [f"- {study.line}." for study in s.studies] or ["- no optuna.db in this run directory"]
    for study in s.studies:
        if study.pareto_table is not None:
            parts += ["", table_markdown(study.pareto_table)]
    if s.dashboard_command:
        parts += ["", f"Browse it: `pip install optuna-dashboard`, then `{s.dashboard_command}`."]
    parts += ["", table_markdown(s.settings_table)]
    return "\n".join(parts)


def _change_markdown(change: StageChange) -> str:
    lines = [f"#### `{change.name}`", ""]
    if change.final_instruction is None:
        lines.append("Instruction unknown.")
    elif change.original_instruction is None or not change.instruction_changed:
        state = "" if change.original_instruction is None else " (unchanged)"
        lines += [f"Instruction{state}:", "", "```text", change.final_instruction, "```"]
    else:
        diff = diff_text(change.original_instruction, change.final_instruction)
        lines += ["Instruction (changed):", "", "```diff", diff, "```"]
    if change.final_demos is not None:
        n_old = "?" if change.original_demos is None else len(change.original_demos)
        lines += ["", f"Demos: {len(change.final_demos)} (original: {n_old})."]
        if change.final_demos:
            lines += ["", "```text", demos_text(change.final_demos), "```"]
    lines.append("")
    return "\n".join(lines)

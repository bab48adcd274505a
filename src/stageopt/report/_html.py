"""The report as one self-contained HTML page: inline CSS, plots as data URIs, no scripts, no links out."""

from __future__ import annotations

import html
import json
import re

from stageopt.report._content import ReportContent, RunSection, StudySection, Table
from stageopt.report._stages import StageChange, demos_text, diff_html

_CSS = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #1d1d1f; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 3px solid #2f6db5; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccd; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.5em; color: #2f4f7f; }
h4 { margin: 1em 0 .3em; font-family: monospace; font-size: 1.05em; }
.meta, .note, .source { color: #555; font-size: .9em; }
.warning { background: #fff4e0; border-left: 4px solid #e69b00; padding: .4em .8em; }
.hint { background: #eef4fb; border-left: 4px solid #2f6db5; padding: .4em .8em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
th, td { border: 1px solid #ccd; padding: .25em .6em; text-align: right; vertical-align: top; }
th { background: #e8eef7; }
td:first-child, th:first-child { text-align: left; font-weight: 600; }
tr:nth-child(even) td { background: #f7f9fc; }
img.plot { max-width: 100%; border: 1px solid #dde; margin: .5em 0; display: block; }
.diff { font-family: "DejaVu Sans Mono", monospace; font-size: .88em; white-space: pre-wrap; background: #fafafa;
        border: 1px solid #dde; padding: .5em; max-height: 24em; overflow: auto; }
del { background: #ffd7d5; color: #82071e; text-decoration: line-through; }
ins { background: #d1f5d3; color: #055d20; text-decoration: none; }
code { background: #f0f0f4; padding: 0 .25em; }
nav a { margin-right: 1em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _prose(text: str) -> str:
    """Escaped text with its `backquoted` spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def table_html(table: Table) -> str:
    """A :class:`Table` as an HTML ``<table>`` with its caption and note."""
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    out = (
        f'<table id="{_e(table.id)}"><caption>{_e(table.caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )
    if table.note:
        out += f'<p class="note">{_prose(table.note)}</p>'
    return out


def _img(uri: str | None, element_id: str, alt: str) -> str:
    if uri is None:
        return ""
    return f'<img class="plot" id="{_e(element_id)}" alt="{_e(alt)}" src="{uri}">'


def render_html(content: ReportContent) -> str:
    """The whole report page."""
    nav = " ".join(f'<a href="#run-{s.index}">{_e(s.index)}. {_e(s.run.label)}</a>' for s in content.runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(content.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(content.title)}</h1>",
        f'<p class="meta">Generated {_e(content.generated)} by <code>stageopt report</code>. Runs: {nav}</p>',
        '<section id="overview"><h2>Summary</h2>',
        table_html(content.summary),
        "<h2>Convergence</h2>",
    ]
    if content.convergence_png:
        parts.append(_img(content.convergence_png, "convergence-plot", "best-so-far validation score"))
        parts.append(
            '<p class="note">Best validation score so far against logical LM calls (left) and wall-clock '
            "seconds (right); only trials scored on the whole validation set, as the run selects on them.</p>"
        )
    else:
        parts.append('<p class="hint">No full-fidelity trial in the history: nothing to plot.</p>')
    parts.append("</section>")
    parts += [_run_html(section) for section in content.runs]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _run_html(s: RunSection) -> str:
    r = s.run.result
    parts = [
        f'<section id="run-{s.index}" class="run">',
        f"<h2>Run {s.index}: {_e(s.run.label)} — {_e(r.strategy)} on {_e(r.task or 'an unnamed task')}</h2>",
        f'<p class="meta">{_e(s.run.path)}</p>',
    ]
    parts += [f'<p class="warning">{_e(note)}</p>' for note in s.run.notes]
    parts += ["<h3>Before and after, per stage</h3>", table_html(s.stage_table)]
    if s.training_table is not None:
        parts.append("<h3>Training curves</h3>")
        parts.append(_img(s.training_png, f"training-plot-{s.index}", "training loss and validation score per epoch"))
        parts.append(table_html(s.training_table))
    parts.append("<h3>Where the errors come from</h3>")
    parts += [f'<p class="hint">{_prose(hint)}</p>' for hint in s.diagnosis_hints]
    parts.append(_img(s.origins_png, f"origins-plot-{s.index}", "error origins by stage"))
    parts.append(_img(s.attribution_png, f"attribution-plot-{s.index}", "stage attribution"))
    parts += [table_html(t) for t in s.diagnosis_tables]
    parts += [
        "<h3>Instructions and demos: optimized against the original</h3>",
        f'<p class="source">From {_prose(s.changes_source)}.</p>',
    ]
    parts += [_change_html(change, s.index) for change in s.changes]
    parts.append("<h3>Optuna study</h3>")
    if not s.studies:
        parts.append('<p class="hint">No optuna.db in this run directory.</p>')
    parts += [_study_html(study, s.index, i) for i, study in enumerate(s.studies, 1)]
    if s.dashboard_command:
        parts.append(
            f'<p class="note">Browse the trials interactively: <code>pip install optuna-dashboard</code>, then '
            f"<code>{_e(s.dashboard_command)}</code>.</p>"
        )
    parts += ["<h3>Settings and spend</h3>", table_html(s.settings_table)]
    if r.notes:
        notes = json.dumps(r.notes, indent=2, sort_keys=True, default=str)
        parts.append(
            f'<details><summary>Run notes (result.json)</summary><pre class="diff">{_e(notes)}</pre></details>'
        )
    parts.append("</section>")
    return "\n".join(parts)


def _change_html(change: StageChange, index: int) -> str:
    chosen = ", ".join(f"{k}={v}" for k, v in change.params.items() if k != "instruction_text")
    parts = [f'<div class="stage" id="stage-{index}-{_e(change.name)}"><h4>{_e(change.name)}</h4>']
    if chosen:
        parts.append(f'<p class="note">chosen: {_e(chosen)}</p>')
    if change.final_instruction is None:
        parts.append('<p class="note">instruction unknown</p>')
    elif change.original_instruction is None:
        parts.append(f'<p>Instruction:</p><div class="diff">{_e(change.final_instruction)}</div>')
    else:
        verdict = "changed" if change.instruction_changed else "unchanged"
        diff = diff_html(change.original_instruction, change.final_instruction)
        parts.append(f'<p>Instruction ({verdict}):</p><div class="diff instruction-diff">{diff}</div>')
    if change.final_demos is None:
        parts.append('<p class="note">demos unknown (no program.json)</p>')
    else:
        n_old = len(change.original_demos) if change.original_demos is not None else None
        counts = f"{len(change.final_demos)}" + (f" (original: {n_old})" if n_old is not None else "")
        if change.original_demos is None and change.final_demos:
            text = _e(demos_text(change.final_demos))
            parts.append(f'<p>Demos: {_e(counts)}</p><div class="diff">{text}</div>')
        elif change.final_demos or change.original_demos:
            diff = diff_html(demos_text(change.original_demos), demos_text(change.final_demos))
            parts.append(f'<p>Demos: {_e(counts)}</p><div class="diff demo-diff">{diff}</div>')
        else:
            parts.append(f"<p>Demos: {_e(counts)}</p>")
    parts.append("</div>")
    return "\n".join(parts)


def _study_html(study: StudySection, index: int, number: int) -> str:
    parts = [f"<p>{_e(study.line)}.</p>"]
    parts.append(_img(study.pareto_png, f"pareto-plot-{index}-{number}", "Pareto front"))
    if study.pareto_table is not None:
        parts.append(table_html(study.pareto_table))
    return "\n".join(parts)

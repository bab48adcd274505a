"""What a report says, independent of its format: tables, plots and notes built from run directories.

:func:`build_content` reads nothing itself; it turns :class:`~stageopt.report.RunData` into
:class:`ReportContent`, which the HTML and Markdown renderers lay out.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stageopt.diagnostics import best_so_far
from stageopt.report import _plots
from stageopt.report._load import RunData, StudyInfo
from stageopt.report._stages import StageChange, stage_changes

#: What a table shows for a number that does not exist (an en dash).
MISSING = "\N{EN DASH}"

#: Keys of a stage's chosen configuration that the "chosen" column shows in its own words.
_POOL_KEYS = ("instruction", "demos", "instruction_text", "n_demos")


@dataclass(frozen=True)
class Table:
    """A table with formatted cells.

    Attributes:
        id: The HTML id (unique in the report).
        caption: One line above the table.
        headers: Column headers.
        rows: Cells as text.
        note: A sentence below the table (how to read it).
    """

    id: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass(frozen=True)
class StudySection:
    """One Optuna study of a run: its line, and for several objectives the Pareto plot and front."""

    info: StudyInfo
    line: str
    pareto_png: str | None = None
    pareto_table: Table | None = None


@dataclass(frozen=True)
class RunSection:
    """Everything the report shows about one run directory."""

    run: RunData
    index: int
    metric: str
    stage_table: Table
    settings_table: Table
    diagnosis_tables: list[Table] = field(default_factory=list)
    diagnosis_hints: list[str] = field(default_factory=list)
    attribution_png: str | None = None
    origins_png: str | None = None
    studies: list[StudySection] = field(default_factory=list)
    dashboard_command: str | None = None
    changes: list[StageChange] = field(default_factory=list)
    changes_source: str = ""
    training_table: Table | None = None
    training_png: str | None = None


@dataclass(frozen=True)
class ReportContent:
    """A whole report: a summary over the runs, the convergence plot and one section per run."""

    title: str
    generated: str
    metric: str
    summary: Table
    convergence_png: str | None
    runs: list[RunSection]


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, None as an en dash, the rest as text."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _delta(before: Any, after: Any) -> str:
    if isinstance(before, int | float) and isinstance(after, int | float):
        return f"{after - before:+.3f}"
    return MISSING


def _pct(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, int | float) else MISSING


def metric_name(run: RunData) -> str:
    """The name of the run's end-to-end metric (the task's, else the diagnosis's, else ``score``)."""
    if run.result.task:
        from stageopt.tasks import TASKS

        if run.result.task in TASKS:
            return TASKS[run.result.task].metric_name
    if run.diagnosis and run.diagnosis.get("metric"):
        return str(run.diagnosis["metric"])
    return "score"


def build_content(runs: Sequence[RunData]) -> ReportContent:
    """The report of ``runs`` (one run: its report; several: a comparison with a column each)."""
    metrics = list(dict.fromkeys(metric_name(r) for r in runs))
    metric = metrics[0] if len(metrics) == 1 else "score"
    sections = [_run_section(run, i, metric_name(run)) for i, run in enumerate(runs, 1)]
    curves = {run.label: best_so_far(run.result.history) for run in runs}
    if len(runs) == 1:
        r = runs[0].result
        title = f"stageopt report: {r.strategy} on {r.task or 'an unnamed task'} ({runs[0].label})"
    else:
        title = f"stageopt report: {len(runs)} runs compared"
    return ReportContent(
        title=title,
        generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        metric=metric,
        summary=_summary_table(runs, sections),
        convergence_png=_plots.convergence_png(curves, metric=metric),
        runs=sections,
    )


def _held_out(confirmation: Mapping[str, Any] | None) -> str | None:
    """``+0.120 [+0.010, +0.230], n=30: confirmed`` from a result's ``confirmation``."""
    if not confirmation:
        return None
    verdict = "confirmed" if confirmation.get("confirmed") else "not confirmed: original returned"
    gain = confirmation.get("gain")
    if not gain:
        return f"not measured ({verdict})"
    lo, hi = gain["ci95"]
    return f"{gain['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}], n={gain['n']}: {verdict}"


def _racing(note: Mapping[str, Any] | None) -> str:
    if not note or not note.get("settings"):
        return "off"
    total = note["example_evaluations"] + note["example_evaluations_saved"]
    return (
        f"{note['pruned_trials']} of {note['trials']} / {note['example_evaluations_saved']} of {total} "
        f"({note['saved_share']:.0%})"
    )


def _summary_table(runs: Sequence[RunData], sections: Sequence[RunSection]) -> Table:
    rows: list[list[str]] = []

    def row(name: str, values: Sequence[Any]) -> None:
        rows.append([name, *(fmt(v) for v in values)])

    results = [r.result for r in runs]
    row("strategy", [r.strategy for r in results])
    row("task", [r.task for r in results])
    row("end-to-end metric", [s.metric for s in sections])
    row("seed", [r.seed for r in results])
    row("status", [f"{r.status} ({r.stop_reason})" if r.stop_reason else r.status for r in results])
    row("validation examples", [r.baseline.get("n") for r in results])
    row("baseline validation score", [r.baseline.get("score") for r in results])
    row("best validation score", [r.best.get("score") for r in results])
    row("improvement (validation)", [_delta(r.baseline.get("score"), r.best.get("score")) for r in results])
    if any(r.confirmation for r in results):
        row("held-out gain (paired 95 % CI, n)", [_held_out(r.confirmation) for r in results])
    if any(r.before and r.after for r in runs):
        row("dev score before", [r.before.get("score") if r.before else None for r in runs])
        row("dev score after", [r.after.get("score") if r.after else None for r in runs])
    row("trials recorded", [len(r.history) for r in results])
    row("full-fidelity trials", [sum(p.counted for p in best_so_far(r.history)) for r in results])
    if any((r.notes.get("racing") or {}).get("settings") for r in results):
        row("racing: dropped early / example-evaluations saved", [_racing(r.notes.get("racing")) for r in results])
    row("Optuna trials (complete)", [sum(s.n_complete for s in r.studies) if r.studies else None for r in runs])
    row(
        "logical LM calls (spent / budget)",
        [f"{r.usage.get('lm_calls', MISSING)} / {fmt(r.budget.get('lm_calls'))}" for r in results],
    )
    row("tokens", [r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0) for r in results])
    rows.append(["wall seconds", *(fmt(r.usage.get("wall_s"), 1) for r in results)])
    row("diagnosis.json", [r.diagnosis is not None for r in runs])
    return Table(
        id="summary",
        caption="Summary" + (" (one column per run)" if len(runs) > 1 else ""),
        headers=["", *(r.label for r in runs)],
        rows=rows,
        note="Validation scores are those the search selected on (train examples only); "
        "dev scores come from before.json/after.json when the run has them.",
    )


def _round(value: Any) -> Any:
    """Counts that are means (tokens, characters) as whole numbers."""
    return round(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _run_section(run: RunData, index: int, metric: str) -> RunSection:
    changes, source = stage_changes(run)
    order = [c.name for c in changes]
    tables, hints = _diagnosis_tables(run, index)
    diagnosis = run.diagnosis or {}
    pareto = run.result.notes.get("pareto") if isinstance(run.result.notes.get("pareto"), Mapping) else None
    studies = [_study_section(s, index, j, pareto) for j, s in enumerate(run.studies, 1)]
    db = run.path / "optuna.db"
    epochs = _training_epochs(run)
    return RunSection(
        run=run,
        index=index,
        metric=metric,
        stage_table=_stage_table(run, index, metric, order),
        settings_table=_settings_table(run, index),
        diagnosis_tables=tables,
        diagnosis_hints=hints,
        attribution_png=_plots.attribution_png(diagnosis["attribution"]) if diagnosis.get("attribution") else None,
        origins_png=_plots.origins_png(diagnosis["error_origins"]) if diagnosis.get("error_origins") else None,
        studies=studies,
        dashboard_command=f"optuna-dashboard sqlite:///{db.resolve()}" if db.is_file() else None,
        changes=changes,
        changes_source=source,
        training_table=_training_table(run, epochs, index, metric) if epochs else None,
        training_png=_plots.training_png(epochs, metric=metric) if epochs else None,
    )


def _training_epochs(run: RunData) -> list[Mapping[str, Any]]:
    """The per-epoch records of a gradient-trained run (``notes["softprompt"]["epochs"]``), else none."""
    note = run.result.notes.get("softprompt")
    epochs = note.get("epochs") if isinstance(note, Mapping) else None
    return [e for e in epochs if isinstance(e, Mapping)] if isinstance(epochs, list) else []


def _training_table(run: RunData, epochs: Sequence[Mapping[str, Any]], index: int, metric: str) -> Table:
    """One row per epoch: the loss of each trained stage and chain, the validation score, lr, passes, time."""
    keys = list(dict.fromkeys(k for e in epochs for k in (e.get("train_loss") or {})))
    rows = []
    for e in epochs:
        losses = e.get("train_loss") or {}
        rows.append(
            [
                fmt(e.get("epoch")),
                *(fmt(losses.get(k), 4) for k in keys),
                fmt(e.get("mean_loss"), 4),
                fmt(e.get("val_score")),
                f"{e['lr']:.3g}" if isinstance(e.get("lr"), int | float) else MISSING,
                fmt(e.get("forward_passes")),
                fmt(e.get("train_s"), 1),
            ]
        )
    note = run.result.notes["softprompt"]
    returned = note.get("returned") if isinstance(note, Mapping) else None
    return Table(
        id=f"training-{index}",
        caption="Training, per epoch",
        headers=[
            "epoch",
            *(f"loss {k}" for k in keys),
            "mean loss",
            f"validation {metric}",
            "lr",
            "forward passes",
            "train s",
        ],
        rows=rows,
        note="Loss: mean cross-entropy of the epoch's steps, per trained stage and per chain (end-to-end mode); "
        "validation: the whole program after the epoch (each epoch is a trial of the history). "
        + (f"Returned: {returned}." if returned else "The program returned holds the best epoch's parameters."),
    )


def _chosen(params: Mapping[str, Any]) -> str:
    if not params:
        return MISSING
    parts = []
    if "instruction" in params:
        parts.append(f"instruction #{params['instruction']}")
    if "n_demos" in params:
        n = params["n_demos"]
        parts.append(f"{n} demo{'' if n == 1 else 's'}" + (f" (set #{params['demos']})" if "demos" in params else ""))
    parts += [f"{k}={v}" for k, v in params.items() if k not in _POOL_KEYS]
    return ", ".join(parts)


def _stage_table(run: RunData, index: int, metric: str, order: list[str]) -> Table:
    params: Mapping[str, Any] = run.result.best.get("params") or {}
    if run.before is not None and run.after is not None:
        return _eval_stage_table(run, index, metric, order, params)
    base = run.result.baseline.get("stage_metrics") or {}
    best = run.result.best.get("stage_metrics") or {}
    names = list(dict.fromkeys([*order, *params, *base, *best]))
    rows = [
        [
            name,
            fmt(base.get(name)),
            fmt(best.get(name)),
            _delta(base.get(name), best.get(name)),
            _chosen(params.get(name, {})),
        ]
        for name in names
    ]
    b, a = run.result.baseline.get("score"), run.result.best.get("score")
    rows.append(
        [f"end to end ({metric})", fmt(b), fmt(a), _delta(b, a), f"best trial #{fmt(run.result.best.get('trial'))}"]
    )
    return Table(
        id=f"stages-{index}",
        caption=f"Before/after per stage: validation ({run.result.baseline.get('n', '?')} examples), "
        "unoptimized (baseline trial) vs the best trial",
        headers=["stage", "stage metric before", "stage metric after", "Δ", "chosen configuration"],
        rows=rows,
        note="From result.json. A stage without a task-defined stage metric shows a dash. "
        "before.json/after.json (written by `stageopt demo`) add dev numbers, parse rates, tokens and latency.",
    )


def _eval_stage_table(run: RunData, index: int, metric: str, order: list[str], params: Mapping[str, Any]) -> Table:
    before, after = run.before or {}, run.after or {}
    b_stages: Mapping[str, Any] = before.get("stages") or {}
    a_stages: Mapping[str, Any] = after.get("stages") or {}
    names = list(dict.fromkeys([*order, *b_stages, *a_stages]))
    rows = []
    for name in names:
        bs, as_ = b_stages.get(name) or {}, a_stages.get(name) or {}
        rows.append(
            [
                name,
                fmt(bs.get("metric")),
                fmt(as_.get("metric")),
                _delta(bs.get("metric"), as_.get("metric")),
                _pct(bs.get("parse_rate")),
                _pct(as_.get("parse_rate")),
                fmt(_round(bs.get("mean_prompt_tokens"))),
                fmt(_round(as_.get("mean_prompt_tokens"))),
                fmt(bs.get("mean_latency_s"), 2),
                fmt(as_.get("mean_latency_s"), 2),
                _chosen(params.get(name, {})),
            ]
        )
    b, a = before.get("score"), after.get("score")
    end = [f"end to end ({metric})", fmt(b), fmt(a), _delta(b, a), _pct(before.get("parse_rate"))]
    rows.append([*end, _pct(after.get("parse_rate")), "", "", "", "", ""])
    for key in dict.fromkeys([*(before.get("extra") or {}), *(after.get("extra") or {})]):
        if key.lower() == metric.lower():
            continue
        bx, ax = (before.get("extra") or {}).get(key), (after.get("extra") or {}).get(key)
        rows.append([f"end to end ({key.upper()})", fmt(bx), fmt(ax), _delta(bx, ax), "", "", "", "", "", "", ""])
    return Table(
        id=f"stages-{index}",
        caption=f"Before/after per stage on the same {before.get('n', '?')} examples (before.json, after.json)",
        headers=[
            "stage",
            "stage metric before",
            "stage metric after",
            "Δ",
            "parsed before",
            "parsed after",
            "prompt tokens before",
            "prompt tokens after",
            "mean s before",
            "mean s after",
            "chosen configuration",
        ],
        rows=rows,
        note="Stage metric: the task-defined metric of the stage (a dash where the task has none); "
        "prompt tokens and seconds are means per call.",
    )


def _settings_table(run: RunData, index: int) -> Table:
    r = run.result
    rows = [
        ["run directory", str(run.path)],
        ["strategy", r.strategy],
        ["task", fmt(r.task)],
        ["seed", str(r.seed)],
        ["status", r.status],
        ["stop reason", fmt(r.stop_reason)],
    ]
    rows += [[f"budget: {k}", fmt(v)] for k, v in r.budget.items()]
    rows += [[f"spent: {k}", fmt(v)] for k, v in r.usage.items()]
    rows.append(["validation examples", fmt(r.baseline.get("n"))])
    for stage, pools in r.candidates.items():
        text = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in pools.items()) if isinstance(pools, dict) else pools
        rows.append([f"candidates: {stage}", fmt(text)])
    rows.append(["result schema", str(r.schema_version)])
    return Table(
        id=f"settings-{index}",
        caption="Settings and spend",
        headers=["setting", "value"],
        rows=rows,
        note="Logical LM calls count every call (cache hits too); backend calls are those that reached the model.",
    )


def _diagnosis_tables(run: RunData, index: int) -> tuple[list[Table], list[str]]:
    d = run.diagnosis
    program = run.path / "program.json"
    command = f"stageopt diagnose --task {run.result.task or 'TASK'} --program {program} --out {run.path}"
    if d is None:
        hint = f"No diagnosis.json in this run directory: run `{command}` for error origins and stage attribution."
        return [], [hint]
    tables, hints = [], []
    metric = d.get("metric") or "score"
    stage_rows = [
        [
            name,
            fmt(s.get("metric")),
            fmt(s.get("calls")),
            _pct(s.get("parse_failure_rate")),
            fmt(_round(s.get("mean_output_chars"))),
            fmt(_round(s.get("mean_prompt_tokens"))),
            fmt(_round(s.get("mean_completion_tokens"))),
            fmt(s.get("mean_latency_s"), 2),
            fmt(s.get("p95_latency_s"), 2),
        ]
        for name, s in (d.get("stages") or {}).items()
    ]
    ci = d.get("ci95") or [None, None]
    tables.append(
        Table(
            id=f"diagnosis-stages-{index}",
            caption=f"Diagnosed program: {metric} {fmt(d.get('score'))} (95 % CI {fmt(ci[0])} to {fmt(ci[1])}, "
            f"n={d.get('n')}), per stage",
            headers=[
                "stage",
                "stage metric",
                "calls",
                "parse failures",
                "output chars",
                "prompt tok",
                "compl tok",
                "mean s",
                "p95 s",
            ],
            rows=stage_rows,
        )
    )
    origins = d.get("error_origins") or {}
    failed = origins.get("failed") or 0
    thresholds = origins.get("thresholds") or {}
    counts = origins.get("counts") or {}
    tables.append(
        Table(
            id=f"error-origins-{index}",
            caption=f"Error origins: {failed} of {origins.get('n')} examples failed "
            f"({metric} < {origins.get('fail_below')})",
            headers=["stage", "errors originating here", "share of failed", "pass threshold"],
            rows=[
                [name, str(count), _pct(count / failed if failed else None), fmt(thresholds.get(name))]
                for name, count in counts.items()
            ],
            note="A failed example counts at the first stage (program order) whose stage metric is below its "
            "threshold; otherwise at the stage of its last LM call when the program raised, else at the last stage.",
        )
    )
    attribution = d.get("attribution")
    if attribution:
        stages = attribution.get("stages") or {}
        total = sum(float(s.get("shapley", 0.0)) for s in stages.values())
        diff = float(attribution.get("program_score", 0.0)) - float(attribution.get("baseline_score", 0.0))
        tables.append(
            Table(
                id=f"attribution-{index}",
                caption=f"Stage attribution (Shapley values): baseline {fmt(attribution.get('baseline_score'))} → "
                f"program {fmt(attribution.get('program_score'))}",
                headers=["stage", "contribution", "95 % CI low", "95 % CI high"],
                rows=[
                    [name, f"{float(s['shapley']):+.3f}", *(fmt(v) for v in (s.get("ci95") or [None, None]))]
                    for name, s in stages.items()
                ],
                note=f"{'Exact over all' if attribution.get('exact') else 'Sampled from'} "
                f"{len(attribution.get('hybrids') or [])} hybrid programs; contributions sum to {total:+.3f} "
                f"(score change {diff:+.3f}).",
            )
        )
    else:
        hints.append(f"diagnosis.json has no stage attribution: rerun `{command}` (it compares with a baseline).")
    oracle = d.get("oracle")
    if oracle:
        tables.append(
            Table(
                id=f"oracle-{index}",
                caption="Oracle substitution: each stage given gold upstream results",
                headers=["stage", "what it is given", "oracle score", "95 % CI", "program score"],
                rows=[
                    [
                        name,
                        str(o.get("description", "")),
                        fmt(o.get("score")),
                        " to ".join(fmt(v) for v in (o.get("ci95") or [None, None])),
                        fmt(o.get("program_score")),
                    ]
                    for name, o in oracle.items()
                ],
            )
        )
    return tables, hints


def _study_section(study: StudyInfo, index: int, number: int, pareto: Mapping[str, Any] | None = None) -> StudySection:
    line = (
        f"Optuna study {study.name!r}: {study.n_complete} completed trials of {study.n_trials}, "
        f"{len(study.directions)} objective(s) ({', '.join(study.metric_names or study.directions)})"
    )
    if not study.multi_objective:
        return StudySection(study, line)
    front = (pareto or {}).get("front") or {}
    if len(front.get("objectives") or ()) == len(study.directions):
        return StudySection(study, line, _plots.pareto_png(study), _front_table(front, pareto or {}, index, number))
    rows = [[str(n), *(fmt(v) for v in study.values[n])] for n in study.pareto]
    table = Table(
        id=f"pareto-{index}-{number}",
        caption=f"Pareto front of study {study.name!r} ({len(rows)} trials)",
        headers=["trial", *(f"objective {i} ({d})" for i, d in enumerate(study.directions))],
        rows=rows,
    )
    return StudySection(study, line, _plots.pareto_png(study), table)


def _front_table(front: Mapping[str, Any], pareto: Mapping[str, Any], index: int, number: int) -> Table:
    """The front a ``pareto`` run stored in result.json: each program, its objectives, its feasibility."""
    objectives = list(front["objectives"])
    directions = list(front.get("directions") or [])
    rows = [
        [
            str(point["trial"]) + (" (returned)" if point["trial"] == pareto.get("picked") else ""),
            "; ".join(f"{stage}: {_chosen(params)}" for stage, params in (point.get("program") or {}).items()),
            *(_objective_cell(o, point["values"].get(o)) for o in objectives),
            fmt(bool(point.get("feasible", True))),
        ]
        for point in front.get("points") or []
    ]
    return Table(
        id=f"pareto-{index}-{number}",
        caption=f"Pareto front: {len(rows)} programs (result.json)",
        headers=["trial", "program", *(f"{o} ({d})" for o, d in zip(objectives, directions, strict=False)), "feasible"],
        rows=rows,
        note=f"Picked by the rule: {pareto.get('rule', 'best score')}"
        + ("" if pareto.get("rule_met") is not False else " (no program met it: the nearest was returned)")
        + ". Tokens and dollars are means per example; latency is the p95 of an example's seconds.",
    )


def _objective_cell(name: str, value: Any) -> str:
    """Dollars per example are small: three significant digits; the rest as :func:`fmt`."""
    if name == "cost" and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.3g}"
    return fmt(value)

"""``table.md`` (mean ± std over seeds) and ``convergence.png`` from a comparison's results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.compare._harness import BASELINE_ROWS, selected_rows
from stageopt.evaluation import PairedGain, paired_gain


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value), or None for no values."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(stat: tuple[float, float] | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def shown_split(results: dict[str, Any]) -> str:
    """The evaluation set the table shows: ``test`` when scored, else the eval split."""
    settings = results["settings"]
    return "test" if settings.get("test") else str(settings.get("eval_split", "dev"))


def _cells(results: dict[str, Any], row: str) -> list[dict[str, Any]]:
    return [c for c in results["cells"].values() if c.get("method") == row]


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row: mean ± std over seeds of every table number, and its cells' statuses."""
    split = shown_split(results)
    seeds = results["settings"]["seeds"]
    base = next((c for c in _cells(results, "unoptimized") if split in c.get("eval", {})), None)
    base_score = base["eval"][split]["score"] if base else None
    out: dict[str, dict[str, Any]] = {}
    for row in selected_rows(results):
        cells = _cells(results, row)
        scored = [c for c in cells if split in c.get("eval", {})]
        if row in BASELINE_ROWS:  # one evaluation stands for every seed
            scored = scored * len(seeds)
        evals = [c["eval"][split] for c in scored]
        stage_names = dict.fromkeys(k for e in evals for k in e["stage_metrics"])
        extra_names = dict.fromkeys(k for e in evals for k in e["extra"])
        usage = [c["usage"] for c in scored]
        out[row] = {
            "cells": len(cells),
            "statuses": sorted({str(c.get("status")) for c in cells}),
            "errors": sorted({c["error"] for c in cells if c.get("error")}),
            "score": mean_std([e["score"] for e in evals]),
            "stage_metrics": {k: mean_std([e["stage_metrics"][k] for e in evals]) for k in stage_names},
            "extra": {k: mean_std([e["extra"][k] for e in evals]) for k in extra_names},
            "improvement": mean_std([e["score"] - base_score for e in evals]) if base_score is not None else None,
            "paired": _paired(evals, base["eval"][split] if base else None),
            "validation": mean_std([c["validation"]["best"] for c in scored if c.get("validation", {}).get("best")]),
            "lm_calls": mean_std([u["lm_calls"] for u in usage]),
            "tokens": mean_std([u["tokens"] for u in usage]),
            "wall_s": mean_std([u["wall_s"] for u in usage]),
            "settings": [c.get("settings") for c in cells if c.get("settings")],
        }
    return out


def _paired(evals: list[dict[str, Any]], base: dict[str, Any] | None) -> PairedGain | None:
    """The row's per-example scores (mean over its seeds) against the unoptimized program's, paired.

    None when a cell was written before per-example scores were kept, or the examples differ.
    """
    if base is None or not evals or "example_scores" not in base:
        return None
    lists = [e.get("example_scores") for e in evals]
    n = len(base["example_scores"])
    if not n or any(x is None or len(x) != n for x in lists):
        return None
    per_example = [sum(x[i] for x in lists if x is not None) / len(lists) for i in range(n)]
    return paired_gain(per_example, base["example_scores"])


def _gain_cell(gain: PairedGain | None) -> str:
    if gain is None:
        return "-"
    lo, hi = gain.ci95
    return f"{gain.gain:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def format_table(results: dict[str, Any]) -> str:
    """The comparison table in Markdown, with the notes a reader needs to read it."""
    settings = results["settings"]
    split = shown_split(results)
    summary = summarize(results)
    stages = list(dict.fromkeys(k for s in summary.values() for k in s["stage_metrics"]))
    metric = str(results.get("metric", "score"))
    # The task metric first (F1 on HotpotQA, as in the design document), then the extra metrics
    # that are not the same number under another name.
    extras = [k for k in dict.fromkeys(k for s in summary.values() for k in s["extra"]) if k.lower() != metric.lower()]
    headers = [
        "method",
        *(f"{s} stage metric" for s in stages),
        metric,
        *(k.upper() for k in extras),
        "Δ score vs unoptimized",
        "paired Δ, 95 % CI",
        "logical LM calls",
        "tokens",
        "wall s",
        "status",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row, s in summary.items():
        metrics = [_pm(s["score"]), *(_pm(s["extra"].get(k)) for k in extras)]
        status = ", ".join(s["statuses"]) or "not run"
        cells = [
            row,
            *(_pm(s["stage_metrics"].get(name)) for name in stages),
            *metrics,
            "-" if row == "unoptimized" else _pm(s["improvement"]),
            "-" if row == "unoptimized" else _gain_cell(s["paired"]),
            _pm(s["lm_calls"], 0),
            _pm(s["tokens"], 0),
            _pm(s["wall_s"], 1),
            status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = next((c["eval"][split]["n"] for c in results["cells"].values() if split in c.get("eval", {})), 0)
    where = f"test file {settings['test']}" if split == "test" else f"the first {n} {split} examples"
    notes = [
        "",
        f"Task {settings['task']}, LM {settings.get('lm')}, adapter {settings.get('adapter')}; "
        f"budget {settings['budget_calls']} logical LM calls per run; seeds {settings['seeds']}; "
        f"selection on {settings['val_size']} validation examples from train "
        f"(bootstrap {settings['bootstrap_size']}).",
        f"Scores: mean ± std over seeds on {where} ({n} examples); selection never saw them. "
        "Δ score: the task metric minus the unoptimized program's on the same examples. Paired Δ: "
        f"per example (mean over seeds) minus the unoptimized program's, paired t 95 % interval, n={n}; "
        "an interval that includes 0 is no gain.",
        "Rows unoptimized and single_stage are not optimized; the LM is deterministic (T=0), so one "
        "evaluation stands for every seed (std 0).",
        "Logical LM calls, tokens and wall time are the optimization's (final scoring excluded), counted by "
        "the same MeteredLM/BudgetLedger for every method, DSPy's proposal and reflection calls included.",
    ]
    for row, s in summary.items():
        if s["settings"]:
            notes.append(f"{row} settings per seed: " + "; ".join(_settings_line(x) for x in s["settings"]))
        if s["errors"]:
            notes.append(f"{row} errors: " + "; ".join(s["errors"])[:300])
    return "\n".join(lines + notes) + "\n"


def _settings_line(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "candidates") or "stageopt defaults"


def seed_mean_curve(curves: list[list[list[float]]]) -> list[tuple[float, float]]:
    """Mean over seeds of best-so-far step curves, at every call count any seed reports.

    A seed counts from its first point on (before it, it has no validation score yet).
    """
    xs = sorted({p[0] for curve in curves for p in curve})
    out = []
    for x in xs:
        values = [max((p[1] for p in curve if p[0] <= x), default=None) for curve in curves]
        present = [v for v in values if v is not None]
        if present:
            out.append((x, statistics.fmean(present)))
    return out


def plot_convergence(results: dict[str, Any], path: Path) -> None:
    """Best-so-far validation score vs logical LM calls, one line per method (mean over seeds).

    Raises:
        ConfigurationError: when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigurationError(
            "convergence.png needs matplotlib: pip install 'stageopt[bench]' (results.json and table.md are written)"
        ) from exc
    settings = results["settings"]
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for method in settings["methods"]:
        curves = [c.get("curve") or [] for c in _cells(results, method)]
        points = seed_mean_curve([c for c in curves if c])
        if points:
            xs, ys = zip(*points, strict=True)
            ax.step(xs, ys, where="post", label=method, marker=".")
    ax.set_xlim(0, settings["budget_calls"])
    ax.set_xlabel("logical LM calls")
    ax.set_ylabel("best validation score so far")
    ax.set_title(f"{settings['task']}: best-so-far validation score (mean over seeds {settings['seeds']})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write ``table.md`` and ``convergence.png`` into ``out``."""
    (out / "table.md").write_text(format_table(results))
    plot_convergence(results, out / "convergence.png")

"""The report's plots, drawn with matplotlib and returned as ``data:image/png;base64`` URIs.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no global state) and
embedded in the page, so the report needs no file or network beside itself.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from stageopt._errors import ConfigurationError
from stageopt.diagnostics import CurvePoint
from stageopt.report._load import StudyInfo

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 100


def require_matplotlib() -> None:
    """Raise a clear error when matplotlib is missing.

    Raises:
        ConfigurationError: naming the extra to install.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "stageopt report draws its plots with matplotlib: pip install 'stageopt[bench]'"
        ) from exc


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def convergence_png(curves: Mapping[str, Sequence[CurvePoint]], *, metric: str = "score") -> str | None:
    """Best-so-far validation score vs logical LM calls and vs wall seconds, one line per run.

    Args:
        curves: Best-so-far points by run label.
        metric: The score's name for the axis label.

    Returns:
        The PNG as a data URI, or None when no run has a point.
    """
    if not any(curves.values()):
        return None
    fig = _figure(11, 4)
    by_calls, by_time = fig.subplots(1, 2, sharey=True)
    for label, points in curves.items():
        if not points:
            continue
        scores = [p.score for p in points]
        line = by_calls.step([p.lm_calls for p in points], scores, where="post", marker=".", label=label)
        colour = line[0].get_color()
        by_time.step([p.wall_s for p in points], scores, where="post", marker=".", color=colour, label=label)
    by_calls.set_xlabel("logical LM calls")
    by_time.set_xlabel("wall-clock seconds")
    by_calls.set_ylabel(f"best validation {metric} so far")
    for ax in (by_calls, by_time):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    by_calls.legend(fontsize="small", loc="lower right")
    fig.suptitle("Convergence: full-fidelity trials only")
    return _data_uri(fig)


def attribution_png(attribution: Mapping[str, Any]) -> str | None:
    """Each stage's Shapley contribution with its 95 % interval as error bars.

    Args:
        attribution: ``diagnosis["attribution"]``.

    Returns:
        The PNG as a data URI, or None when there are no stages.
    """
    stages: Mapping[str, Mapping[str, Any]] = attribution.get("stages") or {}
    if not stages:
        return None
    names = list(stages)
    values = [float(stages[n]["shapley"]) for n in names]
    lows = [v - float((stages[n].get("ci95") or [v, v])[0]) for n, v in zip(names, values, strict=True)]
    highs = [float((stages[n].get("ci95") or [v, v])[1]) - v for n, v in zip(names, values, strict=True)]
    fig = _figure(7, 0.6 * len(names) + 1.6)
    ax = fig.subplots()
    colours = ["tab:green" if v >= 0 else "tab:red" for v in values]
    positions = list(range(len(names)))
    ax.barh(positions, values, xerr=[lows, highs], color=colours, capsize=4)
    ax.set_yticks(positions, labels=names)
    ax.invert_yaxis()  # program order top to bottom
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("contribution to the score change (Shapley value, 95 % CI)")
    ax.set_title(
        f"Stage attribution: {float(attribution.get('baseline_score', 0)):.3f} → "
        f"{float(attribution.get('program_score', 0)):.3f}"
    )
    ax.grid(axis="x", alpha=0.3)
    return _data_uri(fig)


def origins_png(error_origins: Mapping[str, Any]) -> str | None:
    """Failed examples by the stage where their error originated.

    Args:
        error_origins: ``diagnosis["error_origins"]``.

    Returns:
        The PNG as a data URI, or None when there are no counts.
    """
    counts: Mapping[str, int] = error_origins.get("counts") or {}
    if not counts:
        return None
    from matplotlib.ticker import MaxNLocator

    names = list(counts)
    fig = _figure(7, 0.6 * len(names) + 1.6)
    ax = fig.subplots()
    positions = list(range(len(names)))
    ax.barh(positions, [int(counts[n]) for n in names], color="tab:orange")
    ax.set_yticks(positions, labels=names)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("failed examples whose error originated at the stage")
    ax.set_title(f"Error origins: {error_origins.get('failed', '?')} of {error_origins.get('n', '?')} failed")
    ax.grid(axis="x", alpha=0.3)
    return _data_uri(fig)


def pareto_png(study: StudyInfo) -> str | None:
    """The completed trials of a multi-objective study on its first two objectives, front highlighted.

    Returns:
        The PNG as a data URI, or None for a single-objective study or one without trials.
    """
    if not study.multi_objective or not study.values:
        return None
    front = set(study.pareto)
    others = [v for n, v in study.values.items() if n not in front]
    best = sorted((v for n, v in study.values.items() if n in front), key=lambda v: v[0])
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    if others:
        ax.scatter([v[0] for v in others], [v[1] for v in others], color="tab:gray", alpha=0.6, label="trials")
    if best:
        ax.plot([v[0] for v in best], [v[1] for v in best], "o-", color="tab:red", label="Pareto front")
    names = study.metric_names or ("objective 0", "objective 1")
    ax.set_xlabel(f"{names[0]} ({study.directions[0]})")
    ax.set_ylabel(f"{names[1]} ({study.directions[1]})")
    extra = f", objectives 0 and 1 of {len(study.directions)}" if len(study.directions) > 2 else ""
    ax.set_title(f"Study {study.name}: {study.n_complete} trials{extra}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _data_uri(fig)


def training_png(epochs: Sequence[Mapping[str, Any]], *, metric: str = "score") -> str | None:
    """Training loss per stage (and chain) and the validation score, against the epoch.

    Args:
        epochs: ``notes["softprompt"]["epochs"]`` of a run.
        metric: The validation score's name for the axis label.

    Returns:
        The PNG as a data URI, or None without epochs.
    """
    if not epochs:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 3.8)
    losses, validation = fig.subplots(1, 2)
    numbers = [int(e.get("epoch") or i) for i, e in enumerate(epochs, 1)]
    keys = list(dict.fromkeys(k for e in epochs for k in (e.get("train_loss") or {})))
    for key in keys:
        points = [(n, e["train_loss"][key]) for n, e in zip(numbers, epochs, strict=True) if key in e["train_loss"]]
        losses.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    scores = [(n, e.get("val_score")) for n, e in zip(numbers, epochs, strict=True) if e.get("val_score") is not None]
    validation.plot([p[0] for p in scores], [p[1] for p in scores], marker="o", color="tab:green")
    losses.set_ylabel("training loss (cross-entropy)")
    validation.set_ylabel(f"validation {metric}")
    for ax in (losses, validation):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if keys:
        losses.legend(fontsize="small")
    fig.suptitle("Training curves")
    return _data_uri(fig)

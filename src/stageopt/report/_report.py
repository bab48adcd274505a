"""Write a report of one or more run directories: ``report.html`` and ``report.md`` beside it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stageopt._errors import ConfigurationError
from stageopt.report._content import build_content
from stageopt.report._html import render_html
from stageopt.report._load import load_runs
from stageopt.report._markdown import render_markdown
from stageopt.report._plots import require_matplotlib


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` wrote the report.

    Attributes:
        html: The self-contained HTML page.
        markdown: The Markdown summary beside it.
    """

    html: Path
    markdown: Path


def write_report(run_dirs: Sequence[str | Path], *, out: str | Path | None = None) -> ReportPaths:
    """Report on ``run_dirs`` (several: one report comparing them).

    Args:
        run_dirs: Directories written by ``stageopt optimize`` (``result.json`` required;
            ``program.json``, ``optuna.db``, ``before.json``/``after.json`` and ``diagnosis.json`` used
            when present).
        out: The HTML file to write (default: ``report.html`` in the first run directory); the
            Markdown summary goes beside it with the suffix ``.md``.

    Returns:
        The paths written.

    Raises:
        ConfigurationError: for a run directory without a readable ``result.json``, an ``out``
            that is a directory, or a missing matplotlib.
    """
    require_matplotlib()
    runs = load_runs(run_dirs)
    html_path = Path(out) if out is not None else runs[0].path / "report.html"
    if html_path.is_dir():
        raise ConfigurationError(f"--out {html_path} is a directory; give a file name such as {html_path}/report.html")
    md_path = html_path.with_suffix(".md")
    content = build_content(runs)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(html_path, render_html(content))
    _write_atomic(md_path, render_markdown(content, html_name=html_path.name))
    return ReportPaths(html=html_path, markdown=md_path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

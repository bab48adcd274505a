"""Reports of optimization runs: one self-contained HTML page and a Markdown summary.

``stageopt report RUN_DIR [RUN_DIR...]`` calls :func:`write_report`. Pages embed their plots
(matplotlib, as PNG data URIs) and need no network to render.
"""

from stageopt.report._content import ReportContent, Table, build_content
from stageopt.report._load import RunData, StudyInfo, load_run, load_runs
from stageopt.report._report import ReportPaths, write_report

__all__ = [
    "ReportContent",
    "ReportPaths",
    "RunData",
    "StudyInfo",
    "Table",
    "build_content",
    "load_run",
    "load_runs",
    "write_report",
]

"""The report in a real browser: headless Chromium renders it, the screenshot is not blank, the DOM holds the tables.

`make test` installs Debian's chromium first (scripts/ensure-chromium.sh); without it this test skips.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from stageopt.report import write_report
from tests.report.conftest import RunFactory
from tests.report.test_report import _parse

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # as scripts/ensure-chromium.sh
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (make test does)"
)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_headless_chromium(make_run: RunFactory, tmp_path: Path) -> None:
    a = make_run("a", pareto=True, before_after=True)
    b = make_run("b", strategy="joint", diagnosis=False, shift=0.1)
    html = write_report([a, b], out=tmp_path / "report.html").html
    url = html.resolve().as_uri()

    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        # a blank page is one colour; text, tables and a plot give hundreds
        assert len(colours) > 100, f"{len(colours)} distinct colours"
        white = sum(count for count, colour in colours if colour == (255, 255, 255))
        assert white < 0.95 * image.size[0] * image.size[1]
        # the convergence plot (near the top) was decoded and drawn: matplotlib's first line colour shows
        assert dict((c, n) for n, c in colours).get((31, 119, 180), 0) > 50
        image.save(tmp_path / "kept.png")

    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    assert {"summary", "stages-1", "stages-2", "error-origins-1", "attribution-1", "pareto-1-2"} <= set(page.tables)
    assert page.tables["summary"][0] == ["", "a", "b"]
    assert [r[0] for r in page.tables["stages-1"][1:4]] == ["query1", "query2", "answer"]
    assert {"convergence-plot", "origins-plot-1", "attribution-plot-1", "pareto-plot-1-2"} <= set(page.images)
    assert all(src.startswith("data:image/png;base64,") for src in page.images.values())

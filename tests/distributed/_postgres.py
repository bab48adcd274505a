"""Helpers for the PostgreSQL-backed tests: finding the server binaries, free ports, the script."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "postgres.sh"
ENSURE_SCRIPT = REPO / "scripts" / "ensure-postgres.sh"
MISSING = "PostgreSQL is not installed: run `sh scripts/ensure-postgres.sh` (`make test` does)"


def postgres_binaries() -> str | None:
    """The directory holding initdb and pg_ctl (PATH first, then Debian's layout), or None."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return str(Path(on_path).resolve().parent)
    found = [d for d in sorted(glob.glob("/usr/lib/postgresql/*/bin")) if os.access(f"{d}/initdb", os.X_OK)]
    return found[-1] if found else None


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_script(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/postgres.sh`` (or ``script``) with ``args``; on start, stdout is the URL."""
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, timeout=120, check=False)


@contextlib.contextmanager
def cluster_parent() -> Iterator[Path]:
    """A fresh directory directly under the system temp dir, to hold a cluster's DATADIR.

    Not under pytest's ``tmp_path``: every pytest process that starts resets
    ``/tmp/pytest-of-USER`` to mode 0700, which would lock the ``postgres`` user out of a
    cluster running below it.
    """
    parent = Path(tempfile.mkdtemp(prefix="stageopt-pg-"))
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)

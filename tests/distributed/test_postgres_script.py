"""scripts/postgres.sh and scripts/ensure-postgres.sh against the real PostgreSQL binaries."""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distributed._postgres import (
    ENSURE_SCRIPT,
    MISSING,
    cluster_parent,
    free_port,
    postgres_binaries,
    run_script,
)

pytestmark = pytest.mark.skipif(postgres_binaries() is None, reason=MISSING)


def _query(url: str, sql: str) -> str:
    psycopg2 = pytest.importorskip("psycopg2")
    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return str(cur.fetchone()[0])
    finally:
        conn.close()


def test_ensure_postgres_is_quiet_and_succeeds_when_installed() -> None:
    done = run_script(script=ENSURE_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A mode-0700 directory (like mktemp -d makes) outside pytest's tmp tree."""
    with cluster_parent() as parent:
        private = parent / "private"
        private.mkdir(mode=0o700)
        yield private


def test_start_prints_a_url_that_connects_and_stop_is_idempotent(private_dir: Path) -> None:
    # only its owner may enter private_dir: the script must make it reachable for `postgres`
    datadir = private_dir / "data"
    port = free_port()

    started = run_script("start", str(datadir), str(port))
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url == f"postgresql://postgres@127.0.0.1:{port}/stageopt"
        assert _query(url, "SELECT current_database()") == "stageopt"
        assert _query(url, "SHOW max_connections") == "200"
        assert _query(url, "SHOW listen_addresses") == "127.0.0.1"
        assert _query(url, "SHOW unix_socket_directories") == str(datadir)
        assert re.search(r"^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust$", (datadir / "pg_hba.conf").read_text(), re.M)
        if os.geteuid() == 0:
            # PostgreSQL refuses root: the cluster must belong to `postgres`
            assert datadir.stat().st_uid == pwd.getpwnam("postgres").pw_uid
            assert _query(url, "SELECT current_user") == "postgres"

        again = run_script("start", str(datadir), str(port))
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == url
        assert "already running" in again.stderr
    finally:
        stopped = run_script("stop", str(datadir))
    assert stopped.returncode == 0, stopped.stderr
    assert not (datadir / "postmaster.pid").exists()
    psycopg2 = pytest.importorskip("psycopg2")
    with pytest.raises(psycopg2.OperationalError):
        _query(url, "SELECT 1")

    stopped_twice = run_script("stop", str(datadir))
    assert stopped_twice.returncode == 0
    assert "not running" in stopped_twice.stderr


def test_stop_of_a_directory_without_cluster_succeeds(tmp_path: Path) -> None:
    done = run_script("stop", str(tmp_path / "nothing-here"))
    assert done.returncode == 0
    assert "not running" in done.stderr


def test_start_refuses_a_non_empty_directory_without_a_cluster(tmp_path: Path) -> None:
    (tmp_path / "stray.txt").write_text("not a cluster")
    done = run_script("start", str(tmp_path), str(free_port()))
    assert done.returncode != 0
    assert "not empty" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("args", [(), ("start",), ("start", "/tmp/x"), ("start", "/tmp/x", "port"), ("restart", "/x")])
def test_bad_arguments_print_usage(args: tuple[str, ...]) -> None:
    done = run_script(*args)
    assert done.returncode == 2
    assert "usage" in done.stderr or "PORT must be a number" in done.stderr

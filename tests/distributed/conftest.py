"""A real PostgreSQL server for the tests of distributed optimization.

The session fixture ``postgres_url`` starts a throwaway cluster with ``scripts/postgres.sh`` on
a free port of 127.0.0.1 and stops it at the end; ``pg_url`` gives each test a fresh database
in it, so tests never see each other's studies or ledgers.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks.delay_server import start_in_thread

from stageopt.distributed import open_storage
from tests.distributed._cluster import Cluster
from tests.distributed._postgres import MISSING, cluster_parent, free_port, postgres_binaries, run_script


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the database ``stageopt`` on a throwaway PostgreSQL cluster (started once per session)."""
    if postgres_binaries() is None:
        pytest.skip(MISSING)
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[distributed]' (`make install` does)")
    with cluster_parent() as parent:
        datadir = parent / "data"
        started = run_script("start", str(datadir), str(free_port()))
        if started.returncode != 0:
            pytest.fail(f"scripts/postgres.sh start failed ({started.returncode}):\n{started.stderr}")
        try:
            yield started.stdout.strip().splitlines()[-1]
        finally:
            run_script("stop", str(datadir))


def admin_sql(url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE)."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """URL of a fresh, empty database for this test only (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin_sql(postgres_url, f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with contextlib.suppress(Exception):  # a leftover database in a throwaway cluster is harmless
        admin_sql(postgres_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    server, base = start_in_thread(delay=0.05)
    storage = open_storage(pg_url, heartbeat_interval=None)
    started = Cluster(pg_url, tmp_path, server, base, storage)
    try:
        yield started
    finally:
        started.stop()

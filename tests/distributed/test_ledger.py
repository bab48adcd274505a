"""SharedBudgetLedger against a real PostgreSQL server (and a SQLite file for one process)."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa

from stageopt import BudgetExhaustedError, ConfigurationError, StorageUnavailableError
from stageopt.distributed import LEDGER_TABLE_NAME, SharedBudgetLedger, open_storage
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM, Usage
from tests.conftest import scripted_lm
from tests.distributed._ledger_workers import COMPLETION_TOKENS, PROMPT_TOKENS, reserve_until_refused
from tests.distributed._postgres import free_port


@pytest.fixture
def storage(pg_url: str) -> Iterator[optuna.storages.RDBStorage]:
    opened = open_storage(pg_url, pool_size=8, heartbeat_interval=None)
    yield opened
    opened.engine.dispose()


def test_is_a_budget_ledger(storage: optuna.storages.RDBStorage) -> None:
    ledger = SharedBudgetLedger(storage, key="run", budget=Budget(lm_calls=3))
    assert isinstance(ledger, BudgetLedger)
    assert ledger.usage().lm_calls == 0
    assert ledger.remaining_calls() == 3
    assert sa.inspect(storage.engine).has_table(LEDGER_TABLE_NAME)


def test_processes_and_threads_never_exceed_the_shared_limit(pg_url: str, storage: Any) -> None:
    limit, n_procs, n_threads = 200, 4, 4
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=reserve_until_refused, args=(pg_url, "shared", limit, n_threads, go, results))
        for _ in range(n_procs)
    ]
    for proc in procs:
        proc.start()
    go.set()  # all build their ledger (racing to create the table and the row), then reserve
    try:
        totals = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    reserved = sum(t[0] for t in totals)
    backend = sum(t[2] for t in totals)
    assert reserved == limit
    assert all(t[1] == 3 * n_threads for t in totals)  # every thread was refused, and stayed refused

    usage = SharedBudgetLedger(storage, key="shared", budget=Budget(lm_calls=limit)).usage()
    assert usage.lm_calls == limit
    assert usage.prompt_tokens == limit * PROMPT_TOKENS
    assert usage.completion_tokens == limit * COMPLETION_TOKENS
    assert usage.backend_calls == backend
    assert 0 < backend < limit


def test_a_second_ledger_with_the_same_key_resumes(storage: optuna.storages.RDBStorage) -> None:
    first = SharedBudgetLedger(storage, key="run", budget=Budget(lm_calls=7))
    for _ in range(5):
        first.reserve()
    first.record(prompt_tokens=10, completion_tokens=4, cached=False)

    # ``spent`` only seeds a new row: an existing one is never overwritten
    second = SharedBudgetLedger(storage, key="run", budget=Budget(lm_calls=7), spent=Usage(lm_calls=1))
    usage = second.usage()
    assert (usage.lm_calls, usage.prompt_tokens, usage.completion_tokens, usage.backend_calls) == (5, 10, 4, 1)
    assert second.remaining_calls() == 2
    second.reserve()
    first.reserve()
    with pytest.raises(BudgetExhaustedError, match="budget exhausted: lm_calls limit 7 reached"):
        second.reserve()
    assert first.exhausted_reason() == "lm_calls limit 7 reached (7 spent)"


def test_spent_seeds_a_new_row(storage: optuna.storages.RDBStorage) -> None:
    ledger = SharedBudgetLedger(
        storage, key="resumed", budget=Budget(lm_calls=5), spent=Usage(lm_calls=4, prompt_tokens=9, wall_s=2.0)
    )
    usage = ledger.usage()
    assert (usage.lm_calls, usage.prompt_tokens) == (4, 9)
    assert usage.wall_s >= 2.0
    ledger.reserve()
    with pytest.raises(BudgetExhaustedError):
        ledger.reserve()


def test_distinct_keys_are_independent(storage: optuna.storages.RDBStorage) -> None:
    a = SharedBudgetLedger(storage, key="a", budget=Budget(lm_calls=2))
    b = SharedBudgetLedger(storage, key="b", budget=Budget(lm_calls=2))
    a.reserve()
    a.reserve()
    with pytest.raises(BudgetExhaustedError):
        a.reserve()
    assert b.usage().lm_calls == 0
    b.reserve()
    assert (a.usage().lm_calls, b.usage().lm_calls) == (2, 1)


def test_tokens_limit_uses_the_stored_tokens(storage: optuna.storages.RDBStorage) -> None:
    writer = SharedBudgetLedger(storage, key="tok", budget=Budget(tokens=10))
    reader = SharedBudgetLedger(storage, key="tok", budget=Budget(tokens=10))
    writer.reserve()
    reader.reserve()  # in flight: both admitted before any tokens were recorded
    writer.record(prompt_tokens=6, completion_tokens=5, cached=True)
    with pytest.raises(BudgetExhaustedError, match="budget exhausted: tokens limit 10 reached"):
        reader.reserve()
    usage = reader.usage()
    assert (usage.lm_calls, usage.tokens, usage.backend_calls) == (2, 11, 0)


def test_wall_limit_is_per_process_plus_the_spent_offset(storage: optuna.storages.RDBStorage) -> None:
    late = SharedBudgetLedger(storage, key="wall", budget=Budget(wall_s=50), spent=Usage(wall_s=60))
    with pytest.raises(BudgetExhaustedError, match="budget exhausted: wall_s limit 50 reached"):
        late.reserve()
    fresh = SharedBudgetLedger(storage, key="wall", budget=Budget(wall_s=50))
    fresh.reserve()  # its own clock just started: the other process's wall time is not shared
    assert fresh.usage().lm_calls == 1


def test_metered_lm_spends_from_the_shared_row(storage: optuna.storages.RDBStorage) -> None:
    ledger = SharedBudgetLedger(storage, key="metered", budget=Budget(lm_calls=2))
    lm = MeteredLM(scripted_lm(lambda prompt: "an answer of five words"), ledger)
    lm("what is the capital of France?")
    lm("and of Italy?")
    with pytest.raises(BudgetExhaustedError):
        lm("and of Spain?")
    usage = SharedBudgetLedger(storage, key="metered", budget=Budget()).usage()
    assert usage.lm_calls == 2
    assert usage.backend_calls == 2
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens == 2 * 5


_HOLD_ROW_LOCK = """
import sys, time, psycopg2
conn = psycopg2.connect(sys.argv[1])
cur = conn.cursor()
cur.execute("UPDATE stageopt_budget_ledger SET lm_calls = lm_calls + 100 WHERE key = %s", (sys.argv[2],))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_process_killed_mid_transaction_leaves_the_ledger_working(
    pg_url: str, storage: optuna.storages.RDBStorage
) -> None:
    ledger = SharedBudgetLedger(storage, key="killed", budget=Budget(lm_calls=10))
    ledger.reserve()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_ROW_LOCK, pg_url, "killed"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert select.select([holder.stdout], [], [], 30)[0], "the lock holder never started"
        assert holder.stdout.readline().strip() == "locked"

        done = threading.Event()
        errors: list[BaseException] = []

        def reserve() -> None:
            try:
                ledger.reserve()
            except BaseException as exc:  # reported below
                errors.append(exc)
            done.set()

        waiter = threading.Thread(target=reserve)
        waiter.start()
        assert not done.wait(0.5), "reserve() did not wait for the row the other process has locked"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        assert done.wait(15), "reserve() still blocked after the lock holder was killed"
        waiter.join()
        assert errors == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    # the killed transaction (+100) was rolled back; the ledger goes on to its exact limit
    assert ledger.usage().lm_calls == 2
    for _ in range(8):
        ledger.reserve()
    with pytest.raises(BudgetExhaustedError):
        ledger.reserve()
    assert ledger.usage().lm_calls == 10


def test_sqlite_file_works_for_one_process_with_threads(tmp_path: Path) -> None:
    sqlite_storage = open_storage(f"sqlite:///{tmp_path / 'run.db'}", heartbeat_interval=None)
    ledger = SharedBudgetLedger(sqlite_storage, key="local", budget=Budget(lm_calls=50))
    granted: list[int] = []

    def spend() -> None:
        while True:
            try:
                ledger.reserve()
            except BudgetExhaustedError:
                return
            ledger.record(prompt_tokens=1, completion_tokens=1, cached=False)
            granted.append(1)

    threads = [threading.Thread(target=spend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 50
    usage = SharedBudgetLedger(
        sa.create_engine(f"sqlite:///{tmp_path / 'run.db'}"), key="local", budget=Budget()
    ).usage()
    assert (usage.lm_calls, usage.tokens, usage.backend_calls) == (50, 100, 50)


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="in-memory SQLite"):
        SharedBudgetLedger(sa.create_engine("sqlite://"), key="k", budget=Budget(lm_calls=1))


@pytest.mark.parametrize("key", ["", "x" * 256])
def test_bad_keys_are_refused(storage: optuna.storages.RDBStorage, key: str) -> None:
    with pytest.raises(ConfigurationError, match="key"):
        SharedBudgetLedger(storage, key=key, budget=Budget(lm_calls=1))


def test_a_storage_without_engine_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="RDBStorage"):
        SharedBudgetLedger(optuna.storages.InMemoryStorage(), key="k", budget=Budget(lm_calls=1))


def test_an_unreachable_database_raises_storage_unavailable() -> None:
    engine = sa.create_engine(f"postgresql+psycopg2://bob:s3cret@127.0.0.1:{free_port()}/none")
    with pytest.raises(StorageUnavailableError) as info:
        SharedBudgetLedger(engine, key="k", budget=Budget(lm_calls=1))
    assert "s3cret" not in str(info.value)
    assert "bob:***@127.0.0.1" in str(info.value)

"""Process entry points for the shared-ledger tests (importable by 'spawn' children)."""

from __future__ import annotations

import threading
from typing import Any

from stageopt import BudgetExhaustedError
from stageopt.distributed import SharedBudgetLedger, open_storage
from stageopt.evaluation import Budget

PROMPT_TOKENS = 3
COMPLETION_TOKENS = 2


def reserve_until_refused(url: str, key: str, limit: int, n_threads: int, go: Any, results: Any) -> None:
    """Build a ledger when ``go`` is set, then reserve from ``n_threads`` threads until refused.

    Puts ``(reserved, refused, backend_calls)`` on ``results``; each reserved call records
    PROMPT_TOKENS + COMPLETION_TOKENS tokens, every other one as a cache hit.
    """
    storage = open_storage(url, pool_size=n_threads, heartbeat_interval=None)
    if not go.wait(60):
        raise TimeoutError("the test never said go")
    ledger = SharedBudgetLedger(storage, key=key, budget=Budget(lm_calls=limit))
    lock = threading.Lock()
    totals = [0, 0, 0]

    def spend() -> None:
        reserved = refused = backend = 0
        while refused < 3:  # after the first refusal, make sure the next ones are refused too
            try:
                ledger.reserve()
            except BudgetExhaustedError:
                refused += 1
                continue
            assert refused == 0, "a call was granted after a refusal"
            cached = reserved % 2 == 1
            ledger.record(prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS, cached=cached)
            reserved += 1
            backend += 0 if cached else 1
        with lock:
            totals[0] += reserved
            totals[1] += refused
            totals[2] += backend

    threads = [threading.Thread(target=spend) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    storage.engine.dispose()
    results.put(tuple(totals))

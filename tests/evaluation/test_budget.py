from __future__ import annotations

import threading

import pytest

from stageopt import BudgetExhaustedError
from stageopt.evaluation import Budget, BudgetLedger, Usage


@pytest.mark.parametrize("kwargs", [{"lm_calls": 0}, {"lm_calls": -3}, {"tokens": 0}, {"wall_s": -1.0}])
def test_non_positive_limits_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_non_number_limit_is_rejected() -> None:
    with pytest.raises(TypeError, match="lm_calls"):
        Budget(lm_calls="10")  # type: ignore[arg-type]


def test_round_trip() -> None:
    budget = Budget(lm_calls=5, tokens=100)
    assert Budget.from_dict(budget.to_dict()) == budget


def test_reserve_never_exceeds_calls_under_threads() -> None:
    ledger = BudgetLedger(Budget(lm_calls=50))
    granted = []

    def worker() -> None:
        for _ in range(20):
            try:
                ledger.reserve()
                granted.append(1)
            except BudgetExhaustedError:
                return

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 50
    assert ledger.usage().lm_calls == 50
    assert ledger.exhausted_reason() is not None


def test_tokens_limit_and_backend_calls() -> None:
    ledger = BudgetLedger(Budget(tokens=10))
    ledger.reserve()
    ledger.record(prompt_tokens=8, completion_tokens=4, cached=True)
    assert ledger.usage().backend_calls == 0
    with pytest.raises(BudgetExhaustedError, match="tokens"):
        ledger.reserve()


def test_resume_offsets_spending() -> None:
    ledger = BudgetLedger(Budget(lm_calls=10), spent=Usage(lm_calls=9, wall_s=5.0))
    ledger.reserve()
    assert ledger.remaining_calls() == 0
    assert ledger.usage().wall_s >= 5.0

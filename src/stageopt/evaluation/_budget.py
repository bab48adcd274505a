"""Budgets of logical LM calls, tokens and wall time, and the ledger that enforces them."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from stageopt._errors import BudgetExhaustedError, ConfigurationError


@dataclass(frozen=True)
class Budget:
    """Limits for one optimization run. ``None`` means unlimited.

    Logical LM calls count every call a program or proposer makes, cache hits included, so that
    strategies are compared fairly whatever the cache holds; the cache only saves time.

    Args:
        lm_calls: Maximum logical LM calls (task LM and proposers together).
        tokens: Maximum prompt + completion tokens of those calls.
        wall_s: Maximum wall-clock seconds.
    """

    lm_calls: int | None = None
    tokens: int | None = None
    wall_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("lm_calls", "tokens", "wall_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"`budget.{name}` must be a number or None, got {value!r}")
            if value <= 0:
                raise ConfigurationError(f"`budget.{name}` must be positive, got {name}={value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready limits."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data.get(k) for k in ("lm_calls", "tokens", "wall_s")})


@dataclass
class Usage:
    """What a run has spent so far."""

    lm_calls: int = 0
    backend_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready usage, wall time rounded to milliseconds."""
        data = asdict(self)
        data["wall_s"] = round(self.wall_s, 3)
        return data


class BudgetLedger:
    """Thread-safe counter of spending against a :class:`Budget`.

    A call is *reserved* before it is sent (:meth:`reserve`), so concurrent callers can never
    exceed ``lm_calls``; token and wall-time limits are checked at reservation against what was
    spent so far, so they can be exceeded only by calls already in flight.
    """

    #: Whether other processes spend from the same budget (then a usage difference is not one's own).
    shared = False

    def __init__(self, budget: Budget | None = None, *, spent: Usage | None = None) -> None:
        self.budget = budget or Budget()
        self._lock = threading.Lock()
        self._usage = spent or Usage()
        self._offset_s = self._usage.wall_s
        self._start = time.monotonic()
        self._held = 0

    @property
    def held(self) -> int:
        """Logical calls kept back from the search (see :meth:`hold`)."""
        return self._held

    def hold(self, calls: int) -> None:
        """Keep ``calls`` logical calls back: :meth:`exhausted_reason` treats them as spent.

        A strategy's trials check the budget through :meth:`exhausted_reason` before they run,
        so the held calls stay for what comes after the search (the confirmation of the chosen
        program); ``hold(0)`` releases them.
        """
        if calls < 0:
            raise ConfigurationError(f"held calls must be >= 0, got {calls=}")
        self._held = calls

    def usage(self) -> Usage:
        """A snapshot of what was spent, wall time included."""
        with self._lock:
            snap = Usage(**{**self._usage.__dict__})
        snap.wall_s = self._offset_s + time.monotonic() - self._start
        return snap

    def exhausted_reason(self, calls_needed: int = 1) -> str | None:
        """Why ``calls_needed`` more calls would break the budget, or None when they fit."""
        usage = self.usage()
        b = self.budget
        if b.lm_calls is not None and usage.lm_calls + calls_needed + self._held > b.lm_calls:
            kept = f", {self._held} kept for confirmation" if self._held else ""
            return f"lm_calls limit {b.lm_calls} reached ({usage.lm_calls} spent{kept})"
        if b.tokens is not None and usage.tokens >= b.tokens:
            return f"tokens limit {b.tokens} reached ({usage.tokens} spent)"
        if b.wall_s is not None and usage.wall_s >= b.wall_s:
            return f"wall_s limit {b.wall_s} reached ({usage.wall_s:.1f} s spent)"
        return None

    def remaining_calls(self) -> int | None:
        """Logical calls left, or None when calls are unlimited."""
        if self.budget.lm_calls is None:
            return None
        return max(0, self.budget.lm_calls - self.usage().lm_calls)

    def reserve(self) -> None:
        """Count one logical call about to be made, or raise :class:`BudgetExhaustedError`."""
        with self._lock:
            b = self.budget
            u = self._usage
            wall = self._offset_s + time.monotonic() - self._start
            reason = refusal_reason(b, dataclasses.replace(u, wall_s=wall))
            if reason:
                raise BudgetExhaustedError(f"budget exhausted: {reason}")
            u.lm_calls += 1

    def record(self, *, prompt_tokens: int, completion_tokens: int, cached: bool) -> None:
        """Add the tokens of a finished call (cache hits count their tokens too)."""
        with self._lock:
            self._usage.prompt_tokens += prompt_tokens
            self._usage.completion_tokens += completion_tokens
            if not cached:
                self._usage.backend_calls += 1


def refusal_reason(budget: Budget, usage: Usage) -> str | None:
    """Why one more call is refused at ``usage`` (``usage.wall_s`` is the elapsed time), or None.

    The check :meth:`BudgetLedger.reserve` makes before counting a call, shared by ledgers
    that keep their counts elsewhere.
    """
    if budget.lm_calls is not None and usage.lm_calls >= budget.lm_calls:
        return f"lm_calls limit {budget.lm_calls} reached"
    if budget.tokens is not None and usage.tokens >= budget.tokens:
        return f"tokens limit {budget.tokens} reached"
    if budget.wall_s is not None and usage.wall_s >= budget.wall_s:
        return f"wall_s limit {budget.wall_s} reached"
    return None

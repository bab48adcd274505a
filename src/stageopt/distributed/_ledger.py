"""A budget ledger kept in a database row, shared by every process that names the same key."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from stageopt._errors import BudgetExhaustedError, ConfigurationError, StageoptError, StorageUnavailableError
from stageopt.evaluation import Budget, BudgetLedger, Usage
from stageopt.evaluation._budget import refusal_reason

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Name of the table that holds one row of spending per ledger key.
LEDGER_TABLE_NAME = "stageopt_budget_ledger"

_METADATA = sa.MetaData()
_TABLE = sa.Table(
    LEDGER_TABLE_NAME,
    _METADATA,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("lm_calls", sa.BigInteger, nullable=False, default=0),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("backend_calls", sa.BigInteger, nullable=False, default=0),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


def _engine_of(storage_or_engine: Any) -> sa.engine.Engine:
    """The SQLAlchemy engine of an RDB storage (or the engine itself)."""
    if isinstance(storage_or_engine, sa.engine.Engine):
        return storage_or_engine
    engine = getattr(storage_or_engine, "engine", None)
    if engine is None:
        # optuna wraps an RDBStorage in a private cache when a study is created or loaded
        engine = getattr(getattr(storage_or_engine, "_backend", None), "engine", None)
    if isinstance(engine, sa.engine.Engine):
        return engine
    raise TypeError(
        "SharedBudgetLedger needs an optuna RDBStorage (from stageopt.distributed.open_storage) or a SQLAlchemy "
        f"Engine, got {type(storage_or_engine).__name__}"
    )


class SharedBudgetLedger(BudgetLedger):
    """A :class:`~stageopt.evaluation.BudgetLedger` whose counts live in a database row.

    Every process (and thread) that builds a ledger on the same database with the same ``key``
    spends from one budget: :meth:`reserve` is one transactional
    ``UPDATE ... SET lm_calls = lm_calls + 1 WHERE key = :key AND lm_calls < :limit``, so
    concurrent workers on many machines never exceed ``budget.lm_calls`` together, and a
    ledger built later with the same key resumes the spending (restarting a worker).

    Limits:
        * ``lm_calls``: exact across all processes.
        * ``tokens``: checked in the same statement against the tokens stored in the row, so,
          as with :class:`BudgetLedger`, only calls already in flight can exceed it.
        * ``wall_s``: per process. It is checked against THIS process's elapsed time since the
          ledger was built plus ``spent.wall_s``; wall time is not shared through the row.

    The table ``stageopt_budget_ledger`` (columns ``key``, ``lm_calls``, ``prompt_tokens``,
    ``completion_tokens``, ``backend_calls``, ``updated_at``) is created when missing, and the
    row of ``key`` is inserted with ``spent`` when absent; an existing row is never overwritten,
    so several processes may build their ledgers at the same time. Works on PostgreSQL and MySQL
    (many processes) and on a SQLite file (one process). Thread-safe: threads share the
    engine's connection pool.

    Args:
        storage_or_engine: An :class:`optuna.storages.RDBStorage` (its ``engine`` is used), e.g.
            from :func:`~stageopt.distributed.open_storage`, or a SQLAlchemy engine.
        key: Names the shared budget (e.g. the study name); at most 255 characters.
        budget: The limits shared by all processes using ``key``.
        spent: What was spent before, stored when the row is created; its ``wall_s`` is this
            process's wall-time offset.

    Raises:
        ConfigurationError: For an empty or too long key, or an in-memory SQLite engine (each
            connection would see a different database).
        StorageUnavailableError: When the database cannot be reached.
    """

    shared = True

    def __init__(
        self,
        storage_or_engine: Any,
        *,
        key: str,
        budget: Budget,
        spent: Usage | None = None,
    ) -> None:
        if not isinstance(key, str) or not key or len(key) > 255:
            raise ConfigurationError(f"`key` must be a non-empty string of at most 255 characters, got {key=!r}")
        super().__init__(budget, spent=spent)
        self.key = key
        self._engine = _engine_of(storage_or_engine)
        url = self._engine.url
        if url.get_backend_name() == "sqlite" and (url.database or ":memory:") == ":memory:":
            raise ConfigurationError(
                "SharedBudgetLedger cannot use an in-memory SQLite database (each connection sees its own); "
                "use a SQLite file for one process, a database server for several, or a plain BudgetLedger"
            )
        initial = spent or Usage()
        self._run(lambda: self._create(initial))

    # ---- database plumbing ------------------------------------------------------------------

    def _run(self, action: Callable[[], _T]) -> _T:
        """Run ``action``, once more if its connection died; map an unreachable server to an error.

        A reservation whose connection died before the commit was acknowledged may count twice
        after the retry: the ledger errs towards spending, never beyond the limit.
        """
        for attempt in (1, 2):
            try:
                return action()
            except sqlalchemy.exc.DBAPIError as exc:
                if exc.connection_invalidated and attempt == 1:
                    logger.warning("budget ledger %r: connection lost, retrying once", self.key)
                    continue
                if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
                    masked = self._engine.url.render_as_string(hide_password=True)
                    reason = " ".join(str(exc.orig or exc).split()[:40])
                    raise StorageUnavailableError(
                        f"the shared budget ledger {self.key!r} at {masked} is unreachable: {reason}. "
                        "Is the database server running? The run stops because its budget can no longer be counted."
                    ) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _create(self, spent: Usage) -> None:
        """Create the table if missing and insert the row of ``key`` if absent."""
        try:
            _METADATA.create_all(self._engine, checkfirst=True)
        except sqlalchemy.exc.DBAPIError:
            # another process created it between our check and our CREATE TABLE
            if not sa.inspect(self._engine).has_table(LEDGER_TABLE_NAME):
                raise
        values = {
            "key": self.key,
            "lm_calls": spent.lm_calls,
            "prompt_tokens": spent.prompt_tokens,
            "completion_tokens": spent.completion_tokens,
            "backend_calls": spent.backend_calls,
        }
        dialect = self._engine.dialect.name
        created: bool
        if dialect in ("postgresql", "sqlite"):
            insert = pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert
            stmt = insert(_TABLE).values(**values).on_conflict_do_nothing(index_elements=["key"])
            with self._engine.begin() as conn:
                created = conn.execute(stmt).rowcount == 1
        else:
            try:
                with self._engine.begin() as conn:
                    conn.execute(sa.insert(_TABLE).values(**values))
                created = True
            except sqlalchemy.exc.IntegrityError:
                created = False
        if created:
            logger.info("budget ledger %r created (%d calls spent before)", self.key, spent.lm_calls)
        else:
            logger.info("budget ledger %r exists: resuming its spending", self.key)

    def _wall(self) -> float:
        return self._offset_s + time.monotonic() - self._start

    def _read(self) -> Usage:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    _TABLE.c.lm_calls, _TABLE.c.backend_calls, _TABLE.c.prompt_tokens, _TABLE.c.completion_tokens
                ).where(_TABLE.c.key == self.key)
            ).one_or_none()
        if row is None:
            raise StageoptError(
                f"the row of budget ledger {self.key!r} is missing from table {LEDGER_TABLE_NAME} (deleted while "
                "the run was going?); build the SharedBudgetLedger again to recreate it"
            )
        return Usage(
            lm_calls=int(row.lm_calls),
            backend_calls=int(row.backend_calls),
            prompt_tokens=int(row.prompt_tokens),
            completion_tokens=int(row.completion_tokens),
        )

    def _try_reserve(self) -> bool:
        b = self.budget
        stmt = sa.update(_TABLE).where(_TABLE.c.key == self.key)
        if b.lm_calls is not None:
            stmt = stmt.where(_TABLE.c.lm_calls < b.lm_calls)
        if b.tokens is not None:
            stmt = stmt.where(_TABLE.c.prompt_tokens + _TABLE.c.completion_tokens < b.tokens)
        stmt = stmt.values(lm_calls=_TABLE.c.lm_calls + 1, updated_at=sa.func.now())
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def _add(self, prompt_tokens: int, completion_tokens: int, backend_calls: int) -> None:
        stmt = (
            sa.update(_TABLE)
            .where(_TABLE.c.key == self.key)
            .values(
                prompt_tokens=_TABLE.c.prompt_tokens + prompt_tokens,
                completion_tokens=_TABLE.c.completion_tokens + completion_tokens,
                backend_calls=_TABLE.c.backend_calls + backend_calls,
                updated_at=sa.func.now(),
            )
        )
        with self._engine.begin() as conn:
            conn.execute(stmt)

    # ---- the BudgetLedger interface -----------------------------------------------------------

    def usage(self) -> Usage:
        """What all processes sharing ``key`` spent, with THIS process's wall time (plus offset)."""
        snap = self._run(self._read)
        snap.wall_s = self._wall()
        return snap

    def reserve(self) -> None:
        """Count one logical call in the shared row, or raise :class:`~stageopt.BudgetExhaustedError`."""
        wall_s = self.budget.wall_s
        if (wall_s is None or self._wall() < wall_s) and self._run(self._try_reserve):
            return
        reason = refusal_reason(self.budget, self.usage()) or f"lm_calls limit {self.budget.lm_calls} reached"
        raise BudgetExhaustedError(f"budget exhausted: {reason}")

    def record(self, *, prompt_tokens: int, completion_tokens: int, cached: bool) -> None:
        """Add the tokens of a finished call to the shared row (one UPDATE)."""
        backend_calls = 0 if cached else 1
        if prompt_tokens == 0 and completion_tokens == 0 and backend_calls == 0:
            return
        self._run(lambda: self._add(prompt_tokens, completion_tokens, backend_calls))

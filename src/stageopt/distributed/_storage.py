"""Opening an Optuna study storage that several worker processes share.

SQLite (or no storage at all, i.e. Optuna's in-memory storage) is the embedded default for one
process. Several ``stageopt worker`` processes, possibly on several machines, share a study
through a database server instead (PostgreSQL, or MySQL), opened here as an
:class:`optuna.storages.RDBStorage` with a connection pool sized for a worker's threads, and
Optuna's heartbeat so that the trial of a worker that died is failed and queued again.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import time
import warnings
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc

from stageopt._errors import ConfigurationError, StorageUnavailableError
from stageopt.distributed._queue import JOBS_SUFFIX

logger = logging.getLogger(__name__)

#: Suffix of the study that holds the run leases of a shared study (see :class:`RunLease`).
RUNS_SUFFIX = ".runs"

_SHARED_DIALECTS = ("postgres", "mysql", "mariadb")
_LOCAL_SERVER_HINT = "sh scripts/postgres.sh start /tmp/pg 5432"


def _dialect(url: str) -> str:
    """The database kind of a SQLAlchemy URL (``postgresql+psycopg2://...`` -> ``postgresql``)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme.split("+", 1)[0].lower()


def is_shared_storage(url: str | None) -> bool:
    """Whether several processes can share a study stored at ``url``.

    Args:
        url: A storage URL, or None for Optuna's in-memory storage.

    Returns:
        True for database servers (``postgresql*``, ``mysql*``, ``mariadb*`` URLs); False for
        None, in-memory storage, SQLite and anything else.
    """
    if not url:
        return False
    return _dialect(url).startswith(_SHARED_DIALECTS)


def resolve_storage_url(url: str) -> str:
    """``url`` with an installed PostgreSQL driver named when it names none.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` URL as ``postgresql+psycopg://`` (psycopg 3),
    while ``stageopt[distributed]`` installs psycopg2. A bare URL is therefore given the driver
    that is installed: psycopg 3 when present, else psycopg2. Any other URL is returned as is.

    Args:
        url: A storage URL.

    Returns:
        The URL to hand to SQLAlchemy or Optuna.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs).

    Args:
        url: A storage URL such as ``postgresql://user:secret@host:5432/db``.

    Returns:
        The same URL as ``postgresql://user:***@host:5432/db``; unchanged when it has no password.
    """
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        # not a SQLAlchemy URL: hide whatever sits between "user:" and "@"
        return re.sub(r"^([A-Za-z][\w+.-]*://[^:/@]*):[^/]*@", r"\1:***@", url)
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def check_shared(url: str | None, *, what: str) -> None:
    """Refuse a storage that several processes cannot share.

    Args:
        url: The storage URL the processes would use, or None for no storage (in memory).
        what: The thing that needs a shared storage, named in the message (``"stageopt worker"``).

    Raises:
        ConfigurationError: When ``url`` is None, in-memory or SQLite: the message says what to
            pass instead.
    """
    if is_shared_storage(url):
        return
    given = "no storage (an in-memory study)" if not url else f"storage {mask_url(url)!r}"
    raise ConfigurationError(
        f"{what} needs a study storage that several processes share, got {given}. SQLite (or no storage) is "
        "the embedded default for ONE process; several workers need a database server: pass e.g. "
        f"`--storage postgresql://user@host:5432/db`, or start a local one with `{_LOCAL_SERVER_HINT}` "
        "(it prints the URL to pass)."
    )


def _one_line(exc: BaseException) -> str:
    """The driver's reason for ``exc`` on one line (the DBAPI error when SQLAlchemy wraps one)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    return re.sub(r"\s+", " ", first)


def _stale_trial_callback(max_retry: int | None) -> Any:
    """Optuna's callback that re-enqueues a heartbeat-stale trial (renamed in Optuna 4.9)."""
    storages: Any = optuna.storages
    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


#: SQLSTATEs of a schema object another session created at the same moment: unique violation (in
#: the catalog: ``CREATE TABLE IF NOT EXISTS`` is not atomic), duplicate table, duplicate object.
_CONCURRENT_DDL = frozenset({"23505", "42P07", "42710"})

#: How often a storage is tried when its tables were being created by another process.
_DDL_TRIES = 5


def _create_rdb_storage(url: str, engine_kwargs: dict[str, Any], kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``; tried again when another process created its tables at the same moment.

    Processes that open a new database together (a run and its workers) all create Optuna's
    tables; in PostgreSQL the losers of that race get a unique violation. The winner's tables
    exist by the next try, which then only checks them.
    """
    attempt = 1
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except sqlalchemy.exc.DBAPIError as exc:
            state = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
            if state not in _CONCURRENT_DDL or attempt == _DDL_TRIES:
                raise
            logger.info("another process was creating the storage's tables (%s); trying again", _one_line(exc))
            time.sleep(0.2 * attempt)
            attempt += 1


def _engine_kwargs(url: str, *, pool_size: int, max_overflow: int) -> dict[str, Any]:
    """Pool settings for a server database; SQLite and in-memory storages take none."""
    if not is_shared_storage(url):
        return {}
    kwargs: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_pre_ping": True,  # a connection the server closed is replaced, not handed out
        "pool_recycle": 1800,
    }
    if _dialect(url) == "postgresql" and "connect_timeout" not in sqlalchemy.engine.make_url(url).query:
        # an unreachable host fails in seconds instead of hanging on the TCP connect
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def open_storage(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    max_retry: int | None = 3,
) -> optuna.storages.RDBStorage:
    """Open (and connect to) the RDB storage at ``url``.

    The connection is made here, once, so that a wrong URL, a stopped server or a missing
    driver fails before any work starts.

    Args:
        url: A SQLAlchemy URL (``postgresql://user@host:5432/db``; ``sqlite:///file.db`` works
            for one process).
        pool_size: Connections the pool keeps open (server databases only).
        max_overflow: Extra connections opened under load beyond ``pool_size``.
        heartbeat_interval: Seconds between the heartbeats of a running trial; None turns the
            heartbeat off. A trial whose heartbeat is older than ``grace_period`` is failed and
            enqueued again (at most ``max_retry`` times). Optuna calls the heartbeat experimental;
            its warning is silenced here.
        grace_period: Seconds without heartbeat before a trial counts as stale (Optuna's
            default, None, is twice ``heartbeat_interval``).
        max_retry: How often one stale trial is re-enqueued; None retries without limit; 0 installs
            no retry callback at all: a stale trial is only failed (the run leases of
            :class:`~stageopt.distributed.RunLease`, which must never come back).

    Returns:
        The storage; its SQLAlchemy engine is ``storage.engine`` (see :class:`SharedBudgetLedger`).

    Raises:
        ConfigurationError: When ``url`` is not a valid storage URL or a setting is out of range.
        StorageUnavailableError: When the server cannot be reached or its driver is missing.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(f"the storage URL must be a non-empty string, got {url!r}")
    for name, value, low in (("pool_size", pool_size, 1), ("max_overflow", max_overflow, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"`{name}` must be an integer >= {low}, got {name}={value!r}")
    for name, opt in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if opt is not None and (isinstance(opt, bool) or not isinstance(opt, int) or opt <= 0):
            raise ConfigurationError(f"`{name}` must be a positive integer or None, got {name}={opt!r}")
    if max_retry is not None and (isinstance(max_retry, bool) or not isinstance(max_retry, int) or max_retry < 0):
        raise ConfigurationError(f"`max_retry` must be an integer >= 0 or None, got {max_retry=}")

    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
    masked = mask_url(url)
    url = resolve_storage_url(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat_interval is not None and max_retry != 0:
            callback = _stale_trial_callback(max_retry)
            # Optuna >= 4.9 renamed ``failed_trial_callback`` (deprecated) to ``heartbeat_stale_trial_callback``.
            params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
            name = (
                "heartbeat_stale_trial_callback"
                if "heartbeat_stale_trial_callback" in params
                else "failed_trial_callback"
            )
            kwargs[name] = callback
        try:
            storage = _create_rdb_storage(
                url, _engine_kwargs(url, pool_size=pool_size, max_overflow=max_overflow), kwargs
            )
        except ImportError as exc:
            cause = exc.__cause__ or exc
            raise StorageUnavailableError(
                f"cannot open the study storage {masked}: its database driver is missing ({_one_line(cause)}). "
                "Install it with `pip install 'stageopt[distributed]'` (psycopg2-binary, for PostgreSQL)."
            ) from exc
        except sqlalchemy.exc.ArgumentError as exc:
            raise ConfigurationError(
                f"the storage URL {masked} is not valid: {_one_line(exc)}. "
                "Give a SQLAlchemy URL such as postgresql://user@host:5432/db."
            ) from exc
        except sqlalchemy.exc.DBAPIError as exc:
            raise StorageUnavailableError(
                f"cannot connect to the study storage {masked}: {_one_line(exc)}. Is the database server running "
                "and reachable from here, and do the user, password and database exist? For a local server run "
                "`sh scripts/postgres.sh start DIR PORT` (it prints the URL to pass)."
            ) from exc
    logger.info("opened study storage %s (pool_size=%d, heartbeat=%s)", masked, pool_size, heartbeat_interval)
    return storage


#: Suffixes of the studies a run on a shared storage keeps beside its own.
_HELPER_SUFFIXES = (JOBS_SUFFIX, RUNS_SUFFIX)


def load_study(
    storage: optuna.storages.BaseStorage | str,
    study_name: str,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Load an existing study, or explain which studies the storage holds.

    Args:
        storage: The storage (from :func:`open_storage`) or its URL.
        study_name: The study to load.
        sampler: The sampler of the loaded study; a :class:`~optuna.samplers.RandomSampler`
            when None (workers that only evaluate queued trials do not sample).

    Returns:
        The study.

    Raises:
        ConfigurationError: When no study of that name exists; the message lists those that do
            (a run's ``NAME.jobs`` and ``NAME.runs`` are left out: they go with ``NAME``).
    """
    if isinstance(storage, str):
        storage = resolve_storage_url(storage)
    try:
        return optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler or optuna.samplers.RandomSampler()
        )
    except KeyError:
        pass
    every = set(optuna.get_all_study_names(storage))
    # A run's job queue and run leases are listed under its own name only.
    names = sorted(n for n in every if not any(n.endswith(s) and n[: -len(s)] in every for s in _HELPER_SUFFIXES))
    where = mask_url(storage) if isinstance(storage, str) else mask_url(str(getattr(storage, "url", storage)))
    existing = ", ".join(repr(n) for n in names) if names else "none"
    raise ConfigurationError(
        f"no study named {study_name!r} in storage {where} (studies there: {existing}). "
        f"Create it first with `stageopt optimize ... --storage URL --study {study_name}`, "
        "or pass one of the existing names."
    )

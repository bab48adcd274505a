"""Opening shared study storages on a real PostgreSQL server."""

from __future__ import annotations

import importlib.util
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from stageopt import ConfigurationError, StorageUnavailableError
from stageopt.distributed import (
    check_shared,
    is_shared_storage,
    load_study,
    mask_url,
    open_storage,
    resolve_storage_url,
)
from tests.distributed._postgres import free_port


@pytest.mark.parametrize(
    ("url", "shared"),
    [
        ("postgresql://u@h:5432/db", True),
        ("postgresql+psycopg2://u:p@h/db", True),
        ("postgres://u@h/db", True),
        ("mysql+pymysql://u@h/db", True),
        ("sqlite:///run/optuna.db", False),
        ("sqlite:///:memory:", False),
        (None, False),
        ("", False),
        ("optuna.db", False),
    ],
)
def test_is_shared_storage(url: str | None, shared: bool) -> None:
    assert is_shared_storage(url) is shared


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://bob:s3cret@db.example:5432/runs", "postgresql://bob:***@db.example:5432/runs"),
        ("postgresql://bob@db.example/runs", "postgresql://bob@db.example/runs"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("weird://bob:s3cret@host", "weird://bob:***@host"),
    ],
)
def test_mask_url_hides_only_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_resolve_storage_url_names_an_installed_driver() -> None:
    resolved = resolve_storage_url("postgres://u@h/db")
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        assert resolved == "postgresql+psycopg2://u@h/db"
    else:
        assert resolved.startswith("postgresql")
    assert resolve_storage_url("postgresql+pg8000://u@h/db") == "postgresql+pg8000://u@h/db"
    assert resolve_storage_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("url", [None, "sqlite:///tmp/run.db", "sqlite:///:memory:"])
def test_check_shared_refuses_single_process_storages(url: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_shared(url, what="stageopt worker")
    message = str(info.value)
    assert "stageopt worker" in message
    assert "ONE process" in message
    assert "--storage postgresql://user@host:5432/db" in message
    assert "sh scripts/postgres.sh start /tmp/pg 5432" in message


def test_check_shared_accepts_a_server_and_masks_a_refused_password() -> None:
    check_shared("postgresql://u@h/db", what="stageopt worker")
    with pytest.raises(ConfigurationError) as info:
        check_shared("sqlite:///a.db", what="a queue")
    assert "sqlite:///a.db" in str(info.value)


def test_open_storage_connects_with_pool_and_heartbeat(pg_url: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(pg_url, pool_size=3, max_overflow=2, heartbeat_interval=7, grace_period=30, max_retry=4)
    noisy = [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning | FutureWarning)]
    assert noisy == []
    try:
        pool = storage.engine.pool
        assert pool.size() == 3  # type: ignore[attr-defined]
        assert pool._max_overflow == 2  # type: ignore[attr-defined]
        assert pool._pre_ping is True
        assert pool._recycle == 1800
        assert storage.get_heartbeat_interval() == 7
        assert storage.grace_period == 30
        callback = storage.get_heartbeat_stale_trial_callback()
        assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
        assert callback._max_retry == 4
        # connected: a study can be created and read back
        optuna.create_study(storage=storage, study_name="s1")
        assert optuna.get_all_study_names(storage) == ["s1"]
    finally:
        storage.engine.dispose()


def test_heartbeat_requeues_the_trial_of_a_dead_worker(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=1, grace_period=1, max_retry=1)
    try:
        study = optuna.create_study(storage=storage, study_name="hb")
        study.enqueue_trial({"x": 0.5})
        with warnings.catch_warnings():  # heartbeats outside Study.optimize, as workers using ask/tell do
            warnings.simplefilter("ignore")
            trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            storage.record_heartbeat(trial._trial_id)
            time.sleep(2.2)  # the "worker" died: no heartbeat for longer than grace_period
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
        assert trials[1].params == {"x": 0.5}
        assert trials[1].system_attrs["failed_trial"] == 0
    finally:
        storage.engine.dispose()


def test_open_storage_on_sqlite_takes_no_pool_settings(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'one.db'}")
    assert storage.engine_kwargs == {}
    optuna.create_study(storage=storage, study_name="local")
    assert optuna.get_all_study_names(storage) == ["local"]


def test_unreachable_server_raises_storage_unavailable_with_masked_url() -> None:
    url = f"postgresql://bob:s3cret@127.0.0.1:{free_port()}/runs"
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        open_storage(url)
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "s3cret" not in message
    assert "postgresql://bob:***@127.0.0.1" in message
    assert "\n" not in message
    assert "sh scripts/postgres.sh start" in message


def test_missing_driver_raises_storage_unavailable_naming_the_extra() -> None:
    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed: no missing driver to test with")
    with pytest.raises(StorageUnavailableError, match=r"pip install 'stageopt\[distributed\]'") as info:
        open_storage("postgresql+pg8000://bob:s3cret@127.0.0.1:1/runs")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("kwargs", [{"pool_size": 0}, {"max_overflow": -1}, {"heartbeat_interval": 0}])
def test_open_storage_rejects_bad_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        open_storage("sqlite:///unused.db", **kwargs)


def test_open_storage_rejects_a_malformed_url() -> None:
    with pytest.raises(ConfigurationError, match="not valid"):
        open_storage("nodialect://x")


def test_load_study_loads_or_lists_the_existing_names(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=None)
    try:
        optuna.create_study(storage=storage, study_name="beta")
        optuna.create_study(storage=storage, study_name="alpha")
        study = load_study(storage, "alpha")
        assert study.study_name == "alpha"
        assert isinstance(study.sampler, optuna.samplers.RandomSampler)
        with pytest.raises(ConfigurationError) as info:
            load_study(storage, "gamma")
        message = str(info.value)
        assert "'gamma'" in message
        assert "'alpha', 'beta'" in message
        assert "--storage URL --study gamma" in message
        # by URL too
        assert load_study(pg_url, "beta", sampler=optuna.samplers.TPESampler(seed=1)).study_name == "beta"
    finally:
        storage.engine.dispose()


def test_load_study_in_an_empty_storage_says_none(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"studies there: none"):
        load_study(open_storage(f"sqlite:///{tmp_path / 'e.db'}"), "run")


def test_processes_opening_a_new_database_at_once_all_get_the_storage(pg_url: str) -> None:
    # PostgreSQL's CREATE TABLE IF NOT EXISTS is not atomic: two sessions creating Optuna's tables
    # at the same moment can both pass the check, and the loser gets a unique violation on the
    # catalog (pg_type_typname_nsp_index). A run and its workers starting together do exactly that.
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    opened: list[optuna.storages.RDBStorage] = []

    def open_at_once() -> None:
        barrier.wait()
        try:
            opened.append(open_storage(pg_url, pool_size=1, heartbeat_interval=None))
        except BaseException as exc:  # collected and shown below
            errors.append(exc)

    threads = [threading.Thread(target=open_at_once) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], [str(e) for e in errors]
    assert len(opened) == 6
    assert optuna.get_all_study_names(opened[0]) == []
    for storage in opened:
        storage.engine.dispose()

"""The registry on both backends: a fresh database per test (SQLite file or PostgreSQL database), what differs.

:func:`fresh_database` is what the registry, status and study tests parametrise over
(``@pytest.fixture(params=BACKENDS)``). For PostgreSQL it creates a database of its own on the server
that ``LUNGVL_TEST_POSTGRES_URL`` names (``. .ci/services.sh``; the role may create databases) and drops
it afterwards, so tests are independent and leave nothing behind; without that server the PostgreSQL
cases skip, and fail under ``LUNGVL_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import importlib.abc
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from lungvl.errors import BAD_INPUT, MISSING_DEPENDENCY, UNREACHABLE, classify
from lungvl_model.errors import PeerUnreachable
from server.registry import Registry, sqlalchemy_url
from server.registry_engine import POSTGRES_EXTRA_HINT
from server.registry_schema import utc_now
from tests.conftest import postgres_url

BACKENDS = ("sqlite", "postgresql")


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database of ``backend``, removed afterwards.

    Args:
        backend: ``"sqlite"`` (a file in ``directory``) or ``"postgresql"`` (a new database on the test
            server, dropped on exit even while connections to it are open).
        directory: where the SQLite file goes.

    Yields:
        The URL (with the password: tests connect with it).
    """
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'registry.db'}"
        return
    admin_url = make_url(postgres_url())
    name = f"lungvl_t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def _databases() -> set[str]:
    engine = create_engine(postgres_url(), poolclass=NullPool)
    with engine.connect() as conn:
        names = set(conn.exec_driver_sql("SELECT datname FROM pg_database").scalars())
    engine.dispose()
    return names


def test_fresh_postgresql_database_is_empty_and_dropped(tmp_path: Path) -> None:
    before = _databases()
    with fresh_database("postgresql", tmp_path) as url:
        name = make_url(url).database
        assert name not in before and name in _databases()
        reg = Registry(url)  # left open on purpose: the drop must still succeed
        reg.start_run("r", {}, seed=1)
        assert [r["id"] for r in reg.runs()] == [1]  # a fresh sequence
    assert _databases() == before


def test_missing_driver_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now raises ModuleNotFoundError
    for url in ("postgresql://u:p@127.0.0.1:1/db", "postgresql+psycopg://u:p@127.0.0.1:1/db"):
        with pytest.raises(ModuleNotFoundError) as info:
            Registry(url)
        assert str(info.value) == POSTGRES_EXTRA_HINT and "\n" not in str(info.value)
        assert info.value.name == "psycopg" and info.value.__cause__ is None
        verdict = classify(info.value)
        assert verdict is not None and verdict.code == MISSING_DEPENDENCY
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ModuleNotFoundError, match=r"lungvl\[postgres\].*postgresql\+psycopg://"):
        Registry("postgresql+psycopg2://u:p@127.0.0.1:1/db")


class _NoLibpq(importlib.abc.MetaPathFinder):
    """psycopg installed without a libpq: its import fails with a multi-line ImportError."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.split(".")[0] == "psycopg":
            raise ImportError("no pq wrapper available.\nAttempts made:\n- couldn't import psycopg 'binary'")


def test_driver_without_libpq_is_the_same_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "psycopg"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoLibpq(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError) as info:
        Registry("postgresql://u:p@127.0.0.1:1/db")
    assert str(info.value) == POSTGRES_EXTRA_HINT and info.value.name == "psycopg"


def test_postgres_url_forms() -> None:
    assert sqlalchemy_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"


def test_bad_postgresql_urls_are_one_line(tmp_path: Path) -> None:
    url = make_url(postgres_url())
    with pytest.raises(PeerUnreachable, match=r"unreachable: .*refused") as info:
        Registry(url.set(port=1).render_as_string(hide_password=False))
    assert "\n" not in str(info.value) and "***" in str(info.value)  # the password is hidden
    assert getattr(classify(info.value), "code", None) == UNREACHABLE
    with pytest.raises(ValueError, match="refused the connection: .*password authentication") as bad:
        Registry(url.set(password="wrong-password").render_as_string(hide_password=False))
    assert "wrong-password" not in str(bad.value) and getattr(classify(bad.value), "code", None) == BAD_INPUT
    with fresh_database("postgresql", tmp_path) as fresh:
        gone = make_url(fresh).set(database=make_url(fresh).database + "_missing")
        with pytest.raises(ValueError, match="does not exist"):
            Registry(gone.render_as_string(hide_password=False))
        with pytest.raises(ValueError, match="holds no tables"):  # CorruptStateError: an empty database
            Registry(fresh, read_only=True)


def test_read_only_registry_refuses_writes_and_sees_a_live_run(db_url: str) -> None:
    writer = Registry(db_url)
    run = writer.start_run("live", {"rounds": 3}, seed=2**40)  # a seed past 32 bits
    writer.start_round(run, 1, sampled=2)
    reader = Registry(db_url, read_only=True)
    assert reader.rounds(run)[0]["status"] == "running"
    writer.end_round(run, 1, replied=2, failed=0, status="completed")  # a writer while the reader is open
    assert reader.rounds(run)[0]["status"] == "completed" and reader.run(run)["seed"] == 2**40
    with pytest.raises(DBAPIError, match="(?i)read-only|readonly"):
        reader.start_round(run, 2, sampled=2)
    assert [r["round"] for r in writer.rounds(run)] == [1]
    reader.close()
    writer.close()


def test_times_are_utc_and_values_fit_on_both_backends(db_url: str) -> None:
    reg = Registry(db_url)
    run = reg.start_run("t", {"ünïcode": ["ε", 1.5, None, {"nested": True}]}, seed=None)
    reg.start_round(run, 1, sampled=1)
    reg.record_participation(
        run, 1, node_id=2**64 - 1, status="failed", reason="site said \x00 then stopped", bytes_received=5 * 2**30
    )
    row = reg.run(run)
    assert row["config"] == {"ünïcode": ["ε", 1.5, None, {"nested": True}]} and row["seed"] is None
    assert row["created_at"].utcoffset() == timedelta(0) and abs(utc_now() - row["created_at"]) < timedelta(minutes=5)
    (part,) = reg.participation(run)
    assert part["node_id"] == str(2**64 - 1) and part["bytes_received"] == 5 * 2**30
    assert part["reason"] == "site said \\x00 then stopped"
    reg.close()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda reg, run: reg.start_run("x" * 201, {}, seed=None), "run name is 201 characters long, at most 200"),
        (lambda reg, run: reg.record_metrics(run, 1, "global", {"m" * 101: 1.0}), "metric name is 101"),
        (lambda reg, run: reg.record_metrics(run, 1, "site:" + "s" * 216, {"a": 1.0}), "metric scope is 221"),
        (lambda reg, run: reg.record_participation(run, 1, node_id=1, status="ok", site_name="a\x00"), "NUL"),
        (
            lambda reg, run: reg.record_privacy(
                run, 1, level="client", epsilon=1, delta=1e-5, noise_multiplier=1, sample_rate=1, steps=1,
                accountant="a" * 33,
            ),
            "privacy accountant is 33",
        ),
    ],
)  # fmt: skip
def test_values_that_do_not_fit_are_refused_alike(db_url: str, call, match: str) -> None:
    reg = Registry(db_url)
    run = reg.start_run("r", {}, seed=None)
    with pytest.raises(ValueError, match=match):
        call(reg, run)
    assert reg.metrics(run) == [] and reg.participation(run) == [] and len(reg.runs()) == 1
    reg.close()


def test_shown_url_hides_the_password() -> None:
    from server.registry_engine import shown_url

    assert shown_url("postgresql://lungvl:s3cret@db:5432/lungvl") == "postgresql+psycopg://lungvl:***@db:5432/lungvl"
    assert shown_url("runs/registry.db") == "sqlite:///runs/registry.db"

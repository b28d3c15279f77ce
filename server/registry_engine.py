"""The registry's database connection: URL forms, the PostgreSQL driver, SQLite pragmas, read-only mode.

Two backends are supported and tested: a SQLite file (the default; a plain path is accepted) and
PostgreSQL through psycopg 3 (``pip install 'lungvl[postgres]'``). ``postgresql://`` and
``postgres://`` URLs (libpq's own form) mean psycopg 3; ``postgresql+psycopg2://`` is left as given.

What the two backends do differently, and how the registry keeps them alike:

* SQLite: foreign keys on, WAL journal (readers in other processes during a run), a busy timeout; a
  read-only registry sets ``query_only`` so SQLite itself refuses every write.
* PostgreSQL: a connection is tried at once, so an unreachable server (:class:`PeerUnreachable`) or a
  refused login or unknown database (``ValueError``) is one line naming the URL (password hidden), not a
  traceback; a read-only registry opens every transaction ``READ ONLY`` (the server refuses writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from federation.sql_state import sqlite_read_only_pragmas
from lungvl_model.errors import PeerUnreachable

__all__ = ["POSTGRES_EXTRA_HINT", "open_engine", "sqlalchemy_url"]

#: What a PostgreSQL registry needs installed (the ``postgres`` extra ships psycopg 3).
POSTGRES_EXTRA_HINT: Final = "PostgreSQL registry needs the driver: pip install 'lungvl[postgres]'"
_REFUSED: Final = ("password authentication", "does not exist", "no password supplied", "role ", "permission denied")


def sqlalchemy_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL for ``url_or_path``.

    A plain filesystem path becomes ``sqlite:///path``; ``postgresql://`` and ``postgres://`` become
    ``postgresql+psycopg://`` (the driver of the ``postgres`` extra); any other URL is left as it is.
    """
    text = str(url_or_path)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser()}"
    scheme, rest = text.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return text


def shown_url(url_or_path: str | Path) -> str:
    """``url_or_path`` as it may be printed or logged: the SQLAlchemy URL with any password hidden."""
    if not str(url_or_path):
        return ""
    return make_url(sqlalchemy_url(url_or_path)).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _create(url: URL, *, echo: bool, read_only: bool) -> Engine:
    """``create_engine`` with a one-line error when the backend's driver is not installed."""
    options: dict[str, Any] = (
        {"postgresql_readonly": True} if read_only and url.get_backend_name() == "postgresql" else {}
    )
    try:
        return create_engine(
            url, echo=echo, pool_pre_ping=url.get_backend_name() != "sqlite", execution_options=options
        )
    except ImportError as err:  # the driver, or psycopg without a libpq ("no pq wrapper available")
        if url.get_backend_name() != "postgresql":
            raise
        other = "" if url.get_driver_name() == "psycopg" else f" and a postgresql+psycopg:// URL (not {url.drivername})"
        raise ModuleNotFoundError(f"{POSTGRES_EXTRA_HINT}{other}", name=err.name or "psycopg") from None


def _try_connect(engine: Engine, shown: str) -> None:
    """Connect once to a server database so a wrong URL fails here, in one line."""
    failure: OperationalError | None = None
    try:
        with engine.connect():
            pass
    except OperationalError as err:
        failure = err
    if failure is None:
        return
    # raised outside the except block: no chained driver error for lungvl.errors.classify to reclassify
    reason = " ".join(str(failure.orig if failure.orig is not None else failure).split())
    if any(word in reason.lower() for word in _REFUSED):
        raise ValueError(f"registry {shown}: the database refused the connection: {reason}")
    raise PeerUnreachable(f"registry {shown}: database unreachable: {reason}")


def open_engine(url_or_path: str | Path, *, echo: bool = False, read_only: bool = False) -> Engine:
    """The engine of a registry database (see the module docstring for what each backend gets).

    Args:
        url_or_path: a SQLAlchemy URL or a plain path of a SQLite file (parent folders are created
            unless ``read_only``).
        echo: log SQL statements.
        read_only: refuse writes (SQLite ``query_only``; PostgreSQL read-only transactions); a missing
            SQLite file is a ``FileNotFoundError``.

    Returns:
        The engine (PostgreSQL: already connected once).

    Raises:
        FileNotFoundError: ``read_only`` and no SQLite file there.
        ModuleNotFoundError: a PostgreSQL URL without its driver, or psycopg without a libpq (the message
            names the extra).
        PeerUnreachable: the PostgreSQL server cannot be reached.
        ValueError: the PostgreSQL server refused the login or has no such database.
    """
    url = make_url(sqlalchemy_url(url_or_path))
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite and url.database not in (None, "", ":memory:"):
        if read_only and not Path(url.database).is_file():
            raise FileNotFoundError(f"no registry at {url.database}")
        if not read_only:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = _create(url, echo=echo, read_only=read_only)
    if sqlite:
        event.listen(engine, "connect", sqlite_read_only_pragmas if read_only else _sqlite_pragmas)
    else:
        _try_connect(engine, engine.url.render_as_string(hide_password=True))
    return engine

"""SQLAlchemy state files (the server's registry, a site's audit ledger): open them safely.

Both refuse a database that is not theirs before anything is written to it, and both open read-only
for the commands that only read (``lungvl server status``, ``lungvl site audit``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, MetaData, inspect
from sqlalchemy.exc import DBAPIError

from lungvl_model.errors import CorruptStateError


def sqlite_read_only_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Readers never write: no journal-mode change, every write refused by SQLite itself."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def check_schema(engine: Engine, metadata: MetaData, *, what: str, read_only: bool) -> None:
    """Refuse a database that is not (or no longer) one of ours.

    Args:
        engine: the database.
        metadata: the tables it should hold.
        what: its name in messages, with its location (``"registry sqlite:///runs/registry.db"``).
        read_only: the caller only reads: an empty database is an error too (nothing to read).

    Raises:
        CorruptStateError: unreadable (not a database, truncated), another application's tables, our
            tables with other columns (another lungvl version), or (``read_only``) no tables at all.
    """
    try:
        insp = inspect(engine)
        present = set(insp.get_table_names())
        ours = present & set(metadata.tables)
        columns = {t: {c["name"] for c in insp.get_columns(t)} for t in ours}
    except DBAPIError as err:
        raise CorruptStateError(f"{what}: cannot be read as a database ({err.orig})") from None
    if not present:
        if read_only:
            raise CorruptStateError(f"{what}: holds no tables (an empty file, not written by lungvl)")
        return
    if not ours:
        raise CorruptStateError(f"{what}: not written by lungvl (its tables: {sorted(present)[:6]})")
    for name, have in sorted(columns.items()):
        want = {c.name for c in metadata.tables[name].columns}
        if want - have:
            raise CorruptStateError(
                f"{what}: table {name!r} lacks columns {sorted(want - have)} (written by another lungvl version)"
            )

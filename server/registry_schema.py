"""The run registry's SQLAlchemy 2 ORM schema (DESIGN.md section 4) and the values its columns admit.

Tables: ``runs`` (:class:`Run`), ``rounds`` (:class:`Round`), ``participation``
(:class:`Participation`), ``metrics`` (:class:`Metric`), ``privacy_ledger`` (:class:`PrivacyEntry`) and
``checkpoints`` (:class:`Checkpoint`). Round-scoped rows reference ``runs`` only, not ``rounds``: a
server-side evaluation before training is recorded as round 0, which has no round row. The calls that
read and write these tables are :class:`server.registry.Registry`'s.

The same schema runs on SQLite and PostgreSQL; the types are chosen so both store the same values:
times as naive UTC ``TIMESTAMP`` (timezone-aware in Python, whatever the server's time zone), JSON as
``JSON``, seeds and byte counts as 64-bit integers (PostgreSQL's ``INTEGER`` stops at 2**31 - 1), Flower's
uint64 node ids as text. SQLite ignores a ``VARCHAR`` length and PostgreSQL refuses a longer value, so
the registry checks lengths itself (:func:`check_text`) and both backends refuse the same names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Mapped, mapped_column

__all__ = [
    "PARTICIPATION_STATUSES",
    "PRIVACY_LEVELS",
    "ROUND_SCOPED",
    "ROUND_STATUSES",
    "RUN_STATUSES",
    "SHA256_HEX",
    "Base",
    "Checkpoint",
    "Metric",
    "Participation",
    "PrivacyEntry",
    "Round",
    "Run",
    "UTCDateTime",
    "check_choice",
    "check_finite",
    "check_scope",
    "check_text",
    "printable_text",
    "row_dict",
    "utc_now",
]

RUN_STATUSES: Final = ("running", "finished", "stopped_budget", "failed")
ROUND_STATUSES: Final = ("running", "completed", "failed")
PARTICIPATION_STATUSES: Final = ("ok", "failed", "timeout", "rejected")
PRIVACY_LEVELS: Final = ("client", "sample")
#: A checkpoint's sha256, lower-case hex.
SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (stored naive, as UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: D102
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: D102
        return None if value is None else value.replace(tzinfo=UTC)


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of the registry schema."""


def _run_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)


class Run(Base):
    """One federated (or simulated) training run."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(32), default="running")
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(BigInteger)  # any 64-bit seed a config may hold


class Round(Base):
    """One server round of a run."""

    __tablename__ = "rounds"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sites_sampled: Mapped[int]
    sites_replied: Mapped[int | None]
    sites_failed: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(32), default="running")
    update_norm: Mapped[float | None]


class Participation(Base):
    """What one site did in one round (including failures, timeouts and rejected updates)."""

    __tablename__ = "participation"
    __table_args__ = (Index("ix_participation_run_round", "run_id", "round"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = _run_fk()
    round: Mapped[int]
    node_id: Mapped[str] = mapped_column(String(64))  # Flower node ids are uint64: too big for a signed INTEGER
    site_name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    num_examples: Mapped[int] = mapped_column(default=0)
    seconds: Mapped[float | None]
    update_norm: Mapped[float | None]
    clipped: Mapped[bool | None]
    bytes_received: Mapped[int | None] = mapped_column(BigInteger)  # an update may pass 2 GiB


class Metric(Base):
    """One scalar metric of a round; scope is ``"global"`` or ``"site:<name>"``."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "round", "scope", "name", name="uq_metric"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = _run_fk()
    round: Mapped[int]
    scope: Mapped[str] = mapped_column(String(220))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float]


class PrivacyEntry(Base):
    """Privacy spent: client-level (server accountant) or patient-level (one site's DP-SGD).

    The σ of the row's mechanism sits in the column named for it: ``client_noise_multiplier`` for a
    ``client`` row (the server's noise on the sum of site updates), ``dp_sgd_noise_multiplier`` for a
    ``sample`` row (the site's DP-SGD); the other column is NULL.
    """

    __tablename__ = "privacy_ledger"
    __table_args__ = (Index("ix_privacy_run_round", "run_id", "round"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = _run_fk()
    round: Mapped[int]
    level: Mapped[str] = mapped_column(String(16))
    site_name: Mapped[str | None] = mapped_column(String(200))
    client_noise_multiplier: Mapped[float | None]
    dp_sgd_noise_multiplier: Mapped[float | None]
    sample_rate: Mapped[float]
    steps: Mapped[int]
    epsilon: Mapped[float]
    delta: Mapped[float]
    accountant: Mapped[str] = mapped_column(String(32))


class Checkpoint(Base):
    """A checkpoint file written after a round (path as given, plus its sha256)."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "round", name="uq_checkpoint_round"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = _run_fk()
    round: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)


#: Tables whose rows belong to one round of a run.
ROUND_SCOPED: Final = (Participation, Metric, PrivacyEntry, Checkpoint)


def row_dict(row: Base) -> dict[str, Any]:
    """One ORM row as a plain ``{column: value}`` dict."""
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


def check_finite(what: str, value: Any) -> float:
    """``value`` as a finite float (numpy scalars and 0-d tensors accepted; booleans refused).

    Raises:
        ValueError: not a real number, or not finite (the message names ``what``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


def check_choice(what: str, value: str, allowed: Iterable[str]) -> str:
    """``value`` when it is one of ``allowed``.

    Raises:
        ValueError: any other value (the message names ``what``).
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def check_text(what: str, value: str, column: InstrumentedAttribute[Any]) -> str:
    """``value`` when it fits ``column`` on every backend: within its ``VARCHAR`` length, no NUL character.

    Raises:
        ValueError: too long, or a NUL character (PostgreSQL refuses it in text); the message names ``what``.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {value!r}")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain a NUL character, got {value!r}")
    length = getattr(column.type, "length", None)
    if length is not None and len(value) > length:
        raise ValueError(f"{what} is {len(value)} characters long, at most {length} fit: {value[:60]!r}...")
    return value


def printable_text(value: str) -> str:
    """Free text as any backend stores it (a NUL character, which PostgreSQL refuses, as a backslash escape)."""
    return value.replace("\x00", "\\x00")


def check_scope(scope: str) -> str:
    """A metric scope: ``"global"`` or ``"site:<name>"``.

    Raises:
        ValueError: any other scope.
    """
    if scope != "global" and not (scope.startswith("site:") and len(scope) > len("site:")):
        raise ValueError(f"metric scope must be 'global' or 'site:<name>', got {scope!r}")
    return scope

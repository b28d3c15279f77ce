"""Run registry: runs, rounds, per-site participation, metrics, privacy ledger and checkpoints.

One SQLAlchemy 2 ORM schema (DESIGN.md section 4), stored in a SQLite file by default; any SQLAlchemy
URL (e.g. ``postgresql+psycopg://user@host/lungvl``) is accepted. Tables are created on first use.

Concurrency: every public method opens its own short-lived session and commits before returning, and
nothing is cached between calls, so a :class:`Registry` may be used from one process at a time (the
server). Readers in other processes (``lungvl server status`` while a run is going) are fine with
SQLite thanks to WAL mode; two *writers* in different processes are not supported.

Round-scoped rows (participation, metrics, privacy, checkpoints) reference ``runs`` only, not
``rounds``: a server-side evaluation before training is recorded as round 0, which has no round row.

Example:
    >>> reg = Registry("runs/lungvl.db")  # doctest: +SKIP
    >>> run = reg.start_run("screening-vs-referral", {"rounds": 10}, seed=0)  # doctest: +SKIP
    >>> reg.start_round(run, 1, sampled=4)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    make_url,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

RUN_STATUSES: Final = ("running", "finished", "stopped_budget", "failed")
ROUND_STATUSES: Final = ("running", "completed", "failed")
PARTICIPATION_STATUSES: Final = ("ok", "failed", "timeout", "rejected")
PRIVACY_LEVELS: Final = ("client", "sample")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryError(Exception):
    """A registry call that does not fit the recorded state (unknown run, duplicate round, ...)."""


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


def _now() -> datetime:
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
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(32), default="running")
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int | None]


class Round(Base):
    """One server round of a run."""

    __tablename__ = "rounds"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
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
    bytes_received: Mapped[int | None]


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
    """Privacy spent: client-level (server accountant) or sample-level (one site's DP-SGD)."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (Index("ix_privacy_run_round", "run_id", "round"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = _run_fk()
    round: Mapped[int]
    level: Mapped[str] = mapped_column(String(16))
    site_name: Mapped[str | None] = mapped_column(String(200))
    noise_multiplier: Mapped[float]
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
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


_ROUND_SCOPED: Final = (Participation, Metric, PrivacyEntry, Checkpoint)


def _as_dict(row: Base) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


def _finite(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


def _choice(what: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def _check_scope(scope: str) -> str:
    if scope != "global" and not (scope.startswith("site:") and len(scope) > len("site:")):
        raise ValueError(f"metric scope must be 'global' or 'site:<name>', got {scope!r}")
    return scope


def sqlalchemy_url(url_or_path: str | Path) -> str:
    """Turn a plain filesystem path into ``sqlite:///path``; leave SQLAlchemy URLs as they are."""
    text = str(url_or_path)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Registry:
    """The consortium's run registry (one process at a time; see the module docstring).

    Args:
        url_or_path: a SQLAlchemy URL or a plain path of a SQLite file (parent folders are created).
        echo: log SQL statements (debugging).
    """

    def __init__(self, url_or_path: str | Path, *, echo: bool = False) -> None:
        url = make_url(sqlalchemy_url(url_or_path))
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, echo=echo, pool_pre_ping=url.get_backend_name() != "sqlite")
        if url.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Release pooled connections (the registry can still be used afterwards; it reconnects)."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------------------------------
    def start_run(self, name: str, config: Mapping[str, Any], seed: int | None) -> int:
        """Record a new run (status ``running``) with its resolved config; returns the run id.

        Raises:
            ValueError: empty name, or a config that is not plain JSON (no NaN/inf either).
        """
        if not name:
            raise ValueError("run name must not be empty")
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"run config must be plain JSON: {err}") from None
        with self._sessions.begin() as s:
            run = Run(name=name, config=dict(config), seed=seed, status="running")
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, status: str) -> None:
        """Mark a run ended: ``finished``, ``stopped_budget`` or ``failed``."""
        _choice("final run status", status, RUN_STATUSES[1:])
        with self._sessions.begin() as s:
            run = self._run(s, run_id)
            run.status, run.finished_at = status, _now()

    def reopen_run(self, run_id: int) -> None:
        """Set an ended run back to ``running`` (``server start --resume`` after a failure)."""
        with self._sessions.begin() as s:
            run = self._run(s, run_id)
            run.status, run.finished_at = "running", None

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as a dict (id, name, created_at, finished_at, status, config, seed)."""
        with self._sessions() as s:
            return _as_dict(self._run(s, run_id))

    def runs(self) -> list[dict[str, Any]]:
        """All runs, oldest first."""
        with self._sessions() as s:
            return [_as_dict(r) for r in s.scalars(select(Run).order_by(Run.id))]

    def latest_run(self, name: str | None = None) -> dict[str, Any] | None:
        """The most recent run (optionally of that name), or ``None`` when there is none."""
        query = select(Run).order_by(Run.id.desc()).limit(1)
        if name is not None:
            query = query.where(Run.name == name)
        with self._sessions() as s:
            run = s.scalars(query).first()
            return None if run is None else _as_dict(run)

    # -- rounds -------------------------------------------------------------------------------------
    def start_round(self, run_id: int, rnd: int, sampled: int) -> None:
        """Record the start of round ``rnd`` with ``sampled`` sites asked to train.

        Raises:
            RegistryError: unknown run, or the round already exists (``delete_round`` it to redo it).
        """
        if rnd < 1 or sampled < 0:
            raise ValueError(f"need round >= 1 and sampled >= 0, got round={rnd}, sampled={sampled}")
        with self._sessions.begin() as s:
            self._run(s, run_id)
            old = s.get(Round, (run_id, rnd))
            if old is not None:
                raise RegistryError(
                    f"round {rnd} of run {run_id} already exists (status {old.status!r}); delete_round() to redo it"
                )
            s.add(Round(run_id=run_id, round=rnd, sites_sampled=sampled, status="running"))

    def end_round(
        self, run_id: int, rnd: int, *, replied: int, failed: int, status: str, update_norm: float | None = None
    ) -> None:
        """Close round ``rnd``: ``completed`` (model advanced) or ``failed`` (too few replies, error)."""
        _choice("round status", status, ROUND_STATUSES[1:])
        norm = None if update_norm is None else _finite("aggregated update_norm", update_norm)
        with self._sessions.begin() as s:
            row = s.get(Round, (run_id, rnd))
            if row is None:
                raise RegistryError(f"round {rnd} of run {run_id} was never started")
            row.sites_replied, row.sites_failed, row.status = replied, failed, status
            row.update_norm, row.ended_at = norm, _now()

    def last_completed_round(self, run_id: int) -> int:
        """Highest round with status ``completed`` (0 when none): resume from its checkpoint."""
        query = select(func.max(Round.round)).where(Round.run_id == run_id, Round.status == "completed")
        with self._sessions() as s:
            self._run(s, run_id)
            return int(s.scalar(query) or 0)

    def pending_rounds(self, run_id: int) -> list[int]:
        """Rounds with any row after the last completed one (a crash's leftovers, to ``delete_round``)."""
        last = self.last_completed_round(run_id)
        found: set[int] = set()
        with self._sessions() as s:
            for table in (Round, *_ROUND_SCOPED):
                query = select(table.round).where(table.run_id == run_id, table.round > last).distinct()
                found.update(s.scalars(query))
        return sorted(found)

    def delete_round(self, run_id: int, rnd: int, *, force: bool = False) -> None:
        """Delete every row of round ``rnd`` (round, participation, metrics, privacy, checkpoint rows).

        Checkpoint files on disk are left alone.

        Args:
            run_id: the run.
            rnd: the round to redo.
            force: also delete a ``completed`` round. Refused by default: its privacy-ledger rows
                record ε that was really spent.

        Raises:
            RegistryError: the round is completed and ``force`` is false.
        """
        with self._sessions.begin() as s:
            row = s.get(Round, (run_id, rnd))
            if row is not None and row.status == "completed" and not force:
                raise RegistryError(f"round {rnd} of run {run_id} is completed; pass force=True to delete it")
            for table in _ROUND_SCOPED:
                s.execute(delete(table).where(table.run_id == run_id, table.round == rnd))
            if row is not None:
                s.delete(row)

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """All round rows of a run, in round order."""
        with self._sessions() as s:
            return [_as_dict(r) for r in s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round))]

    # -- per-round records --------------------------------------------------------------------------
    def record_participation(
        self,
        run_id: int,
        rnd: int,
        *,
        node_id: int | str,
        status: str,
        site_name: str = "",
        reason: str = "",
        num_examples: int = 0,
        seconds: float | None = None,
        update_norm: float | None = None,
        clipped: bool | None = None,
        bytes_received: int | None = None,
    ) -> int:
        """Record one site's outcome in a round; returns the row id.

        A non-finite ``update_norm`` (a rejected update) is stored as NULL and appended to ``reason``.
        """
        _choice("participation status", status, PARTICIPATION_STATUSES)
        if update_norm is not None and not math.isfinite(update_norm):
            reason = f"{reason} [update_norm={update_norm}]".strip()
            update_norm = None
        seconds = None if seconds is None else _finite("seconds", seconds)
        with self._sessions.begin() as s:
            self._run(s, run_id)
            row = Participation(
                run_id=run_id,
                round=rnd,
                node_id=str(node_id),
                site_name=site_name,
                status=status,
                reason=reason,
                num_examples=int(num_examples),
                seconds=seconds,
                update_norm=update_norm,
                clipped=clipped,
                bytes_received=bytes_received,
            )
            s.add(row)
            s.flush()
            return row.id

    def record_metrics(self, run_id: int, rnd: int, scope: str, metrics: Mapping[str, float]) -> None:
        """Record scalar metrics (a name recorded again for the same round and scope is overwritten).

        Raises:
            ValueError: a bad scope, or a non-finite/non-numeric value (the message names the metric);
                nothing is written then.
        """
        _check_scope(scope)
        values = {name: _finite(f"metric {name!r} ({scope}, round {rnd})", v) for name, v in metrics.items()}
        if not values:
            return
        with self._sessions.begin() as s:
            self._run(s, run_id)
            query = select(Metric).where(
                Metric.run_id == run_id, Metric.round == rnd, Metric.scope == scope, Metric.name.in_(values)
            )
            existing = {m.name: m for m in s.scalars(query)}
            for name, value in values.items():
                if name in existing:
                    existing[name].value = value
                else:
                    s.add(Metric(run_id=run_id, round=rnd, scope=scope, name=name, value=value))

    def record_privacy(
        self,
        run_id: int,
        rnd: int,
        *,
        level: str,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        site_name: str | None = None,
    ) -> int:
        """Record ε spent so far at ``delta`` (cumulative, not per round); returns the row id.

        ``level="client"`` is the server's client-level accountant (``site_name`` None);
        ``level="sample"`` is one site's DP-SGD accountant (``site_name`` required).
        """
        _choice("privacy level", level, PRIVACY_LEVELS)
        if (level == "sample") != bool(site_name):
            raise ValueError(
                f"site_name is required for level 'sample' and not allowed for 'client', got {site_name!r}"
            )
        eps = _finite("epsilon", epsilon)
        dlt = _finite("delta", delta)
        sigma = _finite("noise_multiplier", noise_multiplier)
        q = _finite("sample_rate", sample_rate)
        if eps < 0 or not 0 <= dlt < 1 or sigma < 0 or not 0 <= q <= 1 or steps < 0:
            raise ValueError(
                f"need epsilon >= 0, 0 <= delta < 1, noise_multiplier >= 0, 0 <= sample_rate <= 1, steps >= 0; got "
                f"epsilon={eps}, delta={dlt}, noise_multiplier={sigma}, sample_rate={q}, steps={steps}"
            )
        with self._sessions.begin() as s:
            self._run(s, run_id)
            row = PrivacyEntry(
                run_id=run_id,
                round=rnd,
                level=level,
                site_name=site_name,
                noise_multiplier=sigma,
                sample_rate=q,
                steps=int(steps),
                epsilon=eps,
                delta=dlt,
                accountant=accountant,
            )
            s.add(row)
            s.flush()
            return row.id

    def record_checkpoint(self, run_id: int, rnd: int, path: str | Path, sha256: str) -> int:
        """Record the checkpoint of a round (replacing an earlier one of the same round); returns the row id."""
        sha = sha256.lower()
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        with self._sessions.begin() as s:
            self._run(s, run_id)
            row = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.round == rnd)).first()
            if row is None:
                row = Checkpoint(run_id=run_id, round=rnd, path=str(path), sha256=sha)
                s.add(row)
            else:
                row.path, row.sha256, row.created_at = str(path), sha, _now()
            s.flush()
            return row.id

    # -- reading ------------------------------------------------------------------------------------
    def participation(self, run_id: int, rnd: int | None = None) -> list[dict[str, Any]]:
        """Participation rows of a run (or one round), in round then insertion order."""
        query = select(Participation).where(Participation.run_id == run_id)
        if rnd is not None:
            query = query.where(Participation.round == rnd)
        with self._sessions() as s:
            return [_as_dict(r) for r in s.scalars(query.order_by(Participation.round, Participation.id))]

    def metrics(self, run_id: int, scope: str | None = None) -> list[dict[str, Any]]:
        """Metric rows ``{id, run_id, round, scope, name, value}``, ordered by round, scope, name."""
        query = select(Metric).where(Metric.run_id == run_id)
        if scope is not None:
            query = query.where(Metric.scope == scope)
        with self._sessions() as s:
            return [_as_dict(r) for r in s.scalars(query.order_by(Metric.round, Metric.scope, Metric.name))]

    def privacy(self, run_id: int) -> list[dict[str, Any]]:
        """Privacy-ledger rows of a run in round then insertion order."""
        query = select(PrivacyEntry).where(PrivacyEntry.run_id == run_id).order_by(PrivacyEntry.round, PrivacyEntry.id)
        with self._sessions() as s:
            return [_as_dict(r) for r in s.scalars(query)]

    def checkpoints(self, run_id: int) -> list[dict[str, Any]]:
        """Checkpoint rows of a run in round order."""
        query = select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round)
        with self._sessions() as s:
            return [_as_dict(r) for r in s.scalars(query)]

    def summary(self, run_id: int) -> dict[str, Any]:
        """The run at a glance (what ``lungvl server status`` shows).

        Returns:
            ``run`` (the run dict), ``rounds_done`` (completed rounds), ``rounds_recorded``,
            ``last_completed_round``, ``sites_seen`` (sorted site names, node id when unnamed),
            ``failures`` (participation rows not ``ok``), ``latest_global_round`` and
            ``latest_global_metrics`` (``{}`` when none), ``epsilon``/``delta`` (latest client-level,
            ``None`` without client-level DP), ``max_site_epsilon`` and ``max_site_epsilon_site``
            (largest latest sample-level ε over sites, ``None`` when none).
        """
        run = self.run(run_id)
        rounds, parts, ledger = self.rounds(run_id), self.participation(run_id), self.privacy(run_id)
        global_rows = self.metrics(run_id, scope="global")
        last_global = max((m["round"] for m in global_rows), default=None)
        client = [p for p in ledger if p["level"] == "client"]
        per_site = {p["site_name"]: p["epsilon"] for p in ledger if p["level"] == "sample"}  # last row wins
        top_site = max(per_site, key=lambda k: per_site[k], default=None)
        return {
            "run": run,
            "rounds_done": sum(r["status"] == "completed" for r in rounds),
            "rounds_recorded": len(rounds),
            "last_completed_round": max((r["round"] for r in rounds if r["status"] == "completed"), default=0),
            "sites_seen": sorted({p["site_name"] or p["node_id"] for p in parts}),
            "failures": sum(p["status"] != "ok" for p in parts),
            "latest_global_round": last_global,
            "latest_global_metrics": {m["name"]: m["value"] for m in global_rows if m["round"] == last_global},
            "epsilon": client[-1]["epsilon"] if client else None,
            "delta": client[-1]["delta"] if client else None,
            "max_site_epsilon": None if top_site is None else per_site[top_site],
            "max_site_epsilon_site": top_site,
        }

    def export_csv(self, run_id: int, out_dir: str | Path) -> list[Path]:
        """Write per-round metrics as CSV: ``metrics.csv`` (long) and one wide file per scope.

        Wide files are named ``metrics_global.csv`` and ``metrics_site_<name>.csv`` (unsafe filename
        characters replaced by ``_``), one row per round, one column per metric.

        Returns:
            The files written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.metrics(run_id)
        written = [out / "metrics.csv"]
        with written[0].open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["round", "scope", "name", "value"])
            writer.writerows([m["round"], m["scope"], m["name"], m["value"]] for m in rows)
        for scope in sorted({m["scope"] for m in rows}):
            names = sorted({m["name"] for m in rows if m["scope"] == scope})
            table: dict[int, dict[str, float]] = {}
            for m in rows:
                if m["scope"] == scope:
                    table.setdefault(m["round"], {})[m["name"]] = m["value"]
            path = out / f"metrics_{re.sub(r'[^A-Za-z0-9._-]', '_', scope.replace(':', '_'))}.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["round", *names])
                for rnd in sorted(table):
                    writer.writerow([rnd, *(table[rnd].get(n, "") for n in names)])
            written.append(path)
        return written

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _run(session: Session, run_id: int) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise RegistryError(f"no run with id {run_id}")
        return run

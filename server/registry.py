"""Run registry: runs, rounds, per-site participation, metrics, privacy ledger and checkpoints.

One SQLAlchemy 2 ORM schema (DESIGN.md section 4; tables and column checks in
:mod:`server.registry_schema`), stored in a SQLite file by default or in PostgreSQL
(``postgresql://user:password@host/lungvl``, driver from ``pip install 'lungvl[postgres]'``); both are
tested with the same suite. Tables are created on first use. How the connection is opened (URL forms,
the missing-driver message, read-only mode) is :mod:`server.registry_engine`.

Concurrency: every public method opens its own short-lived session and commits before returning, and
nothing is cached between calls, so a :class:`Registry` may be used from one process at a time (the
server). Readers in other processes (``lungvl server status`` while a run is going) are fine: SQLite
in WAL mode, PostgreSQL by its own MVCC; two *writers* in different processes are not supported.

Round-scoped rows (participation, metrics, privacy, checkpoints) reference ``runs`` only, not
``rounds``: a server-side evaluation before training is recorded as round 0, which has no round row.
The run summary and the CSV export are built from the rows in :mod:`server.registry_report`.

Example:
    >>> reg = Registry("runs/lungvl.db")  # doctest: +SKIP
    >>> run = reg.start_run("screening-vs-referral", {"rounds": 10}, seed=0)  # doctest: +SKIP
    >>> reg.start_round(run, 1, sampled=4)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from federation.sql_state import check_schema
from server.registry_engine import open_engine, sqlalchemy_url
from server.registry_report import export_metrics_csv, summarize_run
from server.registry_schema import (
    PARTICIPATION_STATUSES,
    PRIVACY_LEVELS,
    ROUND_SCOPED,
    ROUND_STATUSES,
    RUN_STATUSES,
    SHA256_HEX,
    Base,
    Checkpoint,
    Metric,
    Participation,
    PrivacyEntry,
    Round,
    Run,
    check_choice,
    check_finite,
    check_scope,
    check_text,
    printable_text,
    row_dict,
    utc_now,
)

__all__ = ["Registry", "RegistryError", "sqlalchemy_url"]


class RegistryError(ValueError):
    """A registry call that does not fit the recorded state (unknown run, duplicate round, ...)."""


class Registry:
    """The consortium's run registry (one process at a time; see the module docstring).

    Args:
        url_or_path: a SQLAlchemy URL or a plain path of a SQLite file (parent folders are created).
        echo: log SQL statements (debugging).
        read_only: open for reading only (``server status``, reports): nothing is created or written
            (the database refuses writes), a missing SQLite file is a ``FileNotFoundError``.

    Raises:
        CorruptStateError: the database is unreadable or not a lungvl registry
            (:func:`federation.sql_state.check_schema`).
        ModuleNotFoundError: a PostgreSQL URL without its driver (the message names the extra).
        PeerUnreachable: a PostgreSQL server that cannot be reached.
        ValueError: a PostgreSQL server that refuses the login or has no such database.
    """

    def __init__(self, url_or_path: str | Path, *, echo: bool = False, read_only: bool = False) -> None:
        self.engine: Engine = open_engine(url_or_path, echo=echo, read_only=read_only)
        check_schema(self.engine, Base.metadata, what=f"registry {self.url}", read_only=read_only)
        if not read_only:
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
            ValueError: empty or too long a name, or a config that is not plain JSON (no NaN/inf either).
        """
        if not name:
            raise ValueError("run name must not be empty")
        check_text("run name", name, Run.name)
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"run config must be plain JSON: {err}") from None
        with self._sessions.begin() as s:
            run = Run(name=name, config=dict(config), seed=None if seed is None else int(seed), status="running")
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, status: str) -> None:
        """Mark a run ended: ``finished``, ``stopped_budget`` or ``failed``."""
        check_choice("final run status", status, RUN_STATUSES[1:])
        with self._sessions.begin() as s:
            run = self._run(s, run_id)
            run.status, run.finished_at = status, utc_now()

    def reopen_run(self, run_id: int) -> tuple[str, datetime | None]:
        """Set an ended run back to ``running`` (``server start --resume`` after a failure).

        Returns:
            The run's previous ``(status, finished_at)``, for :meth:`restore_run`.
        """
        with self._sessions.begin() as s:
            run = self._run(s, run_id)
            previous = (run.status, run.finished_at)
            run.status, run.finished_at = "running", None
            return previous

    def restore_run(self, run_id: int, status: str, finished_at: datetime | None) -> None:
        """Put back a run's status and end time as :meth:`reopen_run` found them (a resume that ran no round)."""
        check_choice("run status", status, RUN_STATUSES)
        with self._sessions.begin() as s:
            run = self._run(s, run_id)
            run.status, run.finished_at = status, finished_at

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as a dict (id, name, created_at, finished_at, status, config, seed)."""
        with self._sessions() as s:
            return row_dict(self._run(s, run_id))

    def runs(self) -> list[dict[str, Any]]:
        """All runs, oldest first."""
        with self._sessions() as s:
            return [row_dict(r) for r in s.scalars(select(Run).order_by(Run.id))]

    def latest_run(self, name: str | None = None) -> dict[str, Any] | None:
        """The most recent run (optionally of that name), or ``None`` when there is none."""
        query = select(Run).order_by(Run.id.desc()).limit(1)
        if name is not None:
            query = query.where(Run.name == name)
        with self._sessions() as s:
            run = s.scalars(query).first()
            return None if run is None else row_dict(run)

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
        check_choice("round status", status, ROUND_STATUSES[1:])
        norm = None if update_norm is None else check_finite("aggregated update_norm", update_norm)
        with self._sessions.begin() as s:
            row = s.get(Round, (run_id, rnd))
            if row is None:
                raise RegistryError(f"round {rnd} of run {run_id} was never started")
            row.sites_replied, row.sites_failed, row.status = replied, failed, status
            row.update_norm, row.ended_at = norm, utc_now()

    def last_completed_round(self, run_id: int) -> int:
        """Highest round with status ``completed`` (0 when none): resume from its checkpoint."""
        query = select(func.max(Round.round)).where(Round.run_id == run_id, Round.status == "completed")
        with self._sessions() as s:
            self._run(s, run_id)
            return int(s.scalar(query) or 0)

    def last_closed_round(self, run_id: int) -> int:
        """Highest round with status ``completed`` or ``failed`` (0 when none): resume after it.

        A failed round is closed too: under client-level DP it was charged to ε, and it is never run again.
        """
        query = select(func.max(Round.round)).where(Round.run_id == run_id, Round.status.in_(ROUND_STATUSES[1:]))
        with self._sessions() as s:
            self._run(s, run_id)
            return int(s.scalar(query) or 0)

    def pending_rounds(self, run_id: int) -> list[int]:
        """Rounds with any row after the last closed one (a crash's leftovers, to ``delete_round``)."""
        last = self.last_closed_round(run_id)
        found: set[int] = set()
        with self._sessions() as s:
            for table in (Round, *ROUND_SCOPED):
                query = select(table.round).where(table.run_id == run_id, table.round > last).distinct()
                found.update(s.scalars(query))
        return sorted(found)

    def delete_round(self, run_id: int, rnd: int, *, force: bool = False) -> None:
        """Delete every row of round ``rnd`` (round, participation, metrics, privacy, checkpoint rows).

        Checkpoint files on disk are left alone.

        Args:
            run_id: the run.
            rnd: the round to redo.
            force: also delete a closed (``completed`` or ``failed``) round. Refused by default: its
                privacy-ledger rows record ε that was really spent.

        Raises:
            RegistryError: the round is closed and ``force`` is false.
        """
        with self._sessions.begin() as s:
            row = s.get(Round, (run_id, rnd))
            if row is not None and row.status != "running" and not force:
                raise RegistryError(f"round {rnd} of run {run_id} is {row.status}; pass force=True to delete it")
            for table in ROUND_SCOPED:
                s.execute(delete(table).where(table.run_id == run_id, table.round == rnd))
            if row is not None:
                s.delete(row)

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """All round rows of a run, in round order."""
        with self._sessions() as s:
            return [row_dict(r) for r in s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round))]

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

        A non-finite ``update_norm`` (a rejected update) is stored as NULL and appended to ``reason``;
        ``reason`` is stored whatever it holds (a site's error text; a NUL character is written as a backslash escape).

        Raises:
            ValueError: an unknown status, a non-finite ``seconds``, a node id or site name that is not
                text of at most 64 / 200 characters.
        """
        check_choice("participation status", status, PARTICIPATION_STATUSES)
        node = check_text("participation node_id", str(node_id), Participation.node_id)
        check_text("participation site_name", site_name, Participation.site_name)
        if update_norm is not None and not math.isfinite(update_norm):
            reason = f"{reason} [update_norm={update_norm}]".strip()
            update_norm = None
        seconds = None if seconds is None else check_finite("seconds", seconds)
        with self._sessions.begin() as s:
            self._run(s, run_id)
            row = Participation(
                run_id=run_id,
                round=rnd,
                node_id=node,
                site_name=site_name,
                status=status,
                reason=printable_text(reason),
                num_examples=int(num_examples),
                seconds=seconds,
                update_norm=update_norm,
                clipped=clipped,
                bytes_received=None if bytes_received is None else int(bytes_received),
            )
            s.add(row)
            s.flush()
            return row.id

    def record_metrics(self, run_id: int, rnd: int, scope: str, metrics: Mapping[str, float]) -> None:
        """Record scalar metrics (a name recorded again for the same round and scope is overwritten).

        Raises:
            ValueError: a bad or too long scope or name, or a non-finite/non-numeric value (the message
                names the metric); nothing is written then.
        """
        check_text("metric scope", check_scope(scope), Metric.scope)
        values = {
            check_text("metric name", name, Metric.name): check_finite(f"metric {name!r} ({scope}, round {rnd})", v)
            for name, v in metrics.items()
        }
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

        ``level="client"`` is the server's client-level accountant (``site_name`` None; ``noise_multiplier``
        is stored as ``client_noise_multiplier``); ``level="sample"`` is one site's DP-SGD accountant
        (``site_name`` required; stored as ``dp_sgd_noise_multiplier``).
        """
        check_choice("privacy level", level, PRIVACY_LEVELS)
        if (level == "sample") != bool(site_name):
            raise ValueError(
                f"site_name is required for level 'sample' and not allowed for 'client', got {site_name!r}"
            )
        if site_name:
            check_text("privacy site_name", site_name, PrivacyEntry.site_name)
        check_text("privacy accountant", accountant, PrivacyEntry.accountant)
        eps = check_finite("epsilon", epsilon)
        dlt = check_finite("delta", delta)
        sigma = check_finite("noise_multiplier", noise_multiplier)
        q = check_finite("sample_rate", sample_rate)
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
                client_noise_multiplier=sigma if level == "client" else None,
                dp_sgd_noise_multiplier=sigma if level == "sample" else None,
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
        if not SHA256_HEX.fullmatch(sha):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        check_text("checkpoint path", str(path), Checkpoint.path)
        with self._sessions.begin() as s:
            self._run(s, run_id)
            row = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.round == rnd)).first()
            if row is None:
                row = Checkpoint(run_id=run_id, round=rnd, path=str(path), sha256=sha)
                s.add(row)
            else:
                row.path, row.sha256, row.created_at = str(path), sha, utc_now()
            s.flush()
            return row.id

    # -- reading ------------------------------------------------------------------------------------
    def participation(self, run_id: int, rnd: int | None = None) -> list[dict[str, Any]]:
        """Participation rows of a run (or one round), in round then insertion order."""
        query = select(Participation).where(Participation.run_id == run_id)
        if rnd is not None:
            query = query.where(Participation.round == rnd)
        with self._sessions() as s:
            return [row_dict(r) for r in s.scalars(query.order_by(Participation.round, Participation.id))]

    def metrics(self, run_id: int, scope: str | None = None) -> list[dict[str, Any]]:
        """Metric rows ``{id, run_id, round, scope, name, value}``, ordered by round, scope, name."""
        query = select(Metric).where(Metric.run_id == run_id)
        if scope is not None:
            query = query.where(Metric.scope == scope)
        with self._sessions() as s:
            return [row_dict(r) for r in s.scalars(query.order_by(Metric.round, Metric.scope, Metric.name))]

    def privacy(self, run_id: int) -> list[dict[str, Any]]:
        """Privacy-ledger rows of a run in round then insertion order."""
        query = select(PrivacyEntry).where(PrivacyEntry.run_id == run_id).order_by(PrivacyEntry.round, PrivacyEntry.id)
        with self._sessions() as s:
            return [row_dict(r) for r in s.scalars(query)]

    def checkpoints(self, run_id: int) -> list[dict[str, Any]]:
        """Checkpoint rows of a run in round order."""
        query = select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round)
        with self._sessions() as s:
            return [row_dict(r) for r in s.scalars(query)]

    def summary(self, run_id: int) -> dict[str, Any]:
        """The run at a glance (what ``lungvl server status`` shows).

        Returns:
            ``run`` (the run dict), ``rounds_done`` (completed rounds), ``rounds_recorded``,
            ``last_completed_round``, ``sites_seen`` (sorted site names, node id when unnamed),
            ``failures`` (participation rows not ``ok``), ``latest_global_round`` and
            ``latest_global_metrics`` (``{}`` when none), ``epsilon``/``delta`` (latest client-level,
            ``None`` without client-level DP), ``max_site_epsilon`` and ``max_site_epsilon_site``
            (largest latest patient-level ε over sites, ``None`` when none).
        """
        return summarize_run(
            self.run(run_id),
            rounds=self.rounds(run_id),
            participation=self.participation(run_id),
            privacy=self.privacy(run_id),
            global_metrics=self.metrics(run_id, scope="global"),
        )

    def export_csv(self, run_id: int, out_dir: str | Path) -> list[Path]:
        """Write per-round metrics as CSV: ``metrics.csv`` (long) and one wide file per scope.

        Wide files are named ``metrics_global.csv`` and ``metrics_site_<name>.csv`` (unsafe filename
        characters replaced by ``_``), one row per round, one column per metric.

        Returns:
            The files written.
        """
        return export_metrics_csv(self.metrics(run_id), out_dir)

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _run(session: Session, run_id: int) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise RegistryError(f"no run with id {run_id}")
        return run

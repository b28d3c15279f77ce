"""The site's outbound audit ledger: one row per message that leaves the hospital.

DESIGN.md section 4: a site sends model arrays, a config record and a whitelist of scalar metrics, and
nothing else. Before sending, the site client serialises the message and calls
:meth:`AuditLedger.record` with the exact bytes; the ledger stores their size and sha256 (never the
bytes), the metric names and values, the DP parameters and the ε spent so far. Hospital IT can then
check any message seen on the wire against the ledger.

The ledger is also the last gate: :meth:`AuditLedger.record` raises :class:`MetricNotAllowed` when a
metric is not in :data:`METRIC_WHITELIST` or not a finite number, and writes nothing; the message must
then not be sent. :func:`filter_metrics` is the lenient step before it, which drops (and logs) such
metrics.

The ledger is also the site's memory of what it has answered: the site trainer counts the rounds it
trained in and the evaluations it answered per round from it (:meth:`AuditLedger.entries`,
:meth:`AuditLedger.rounds`), and a restarted site checks its accountant state against the largest ε
the ledger records (:meth:`AuditLedger.max_epsilon`).

Storage: a SQLite file in the site's state directory by default (``<state_dir>/outbound_ledger.db``),
or any SQLAlchemy URL. One short-lived session per call; meant for one process at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import JSON, DateTime, Engine, String, create_engine, event, func, make_url, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from federation.sql_state import check_schema, sqlite_read_only_pragmas

logger = logging.getLogger(__name__)

LEDGER_FILENAME: Final = "outbound_ledger.db"

#: Scalar metrics a site may send. Aggregates over the site's whole split only: counts, timings,
#: mean losses and validation scores, and the site's own DP parameters/ε. No per-study or per-patient
#: value has a name here, so none can leave.
METRIC_WHITELIST: Final[frozenset[str]] = frozenset(
    {
        # bookkeeping
        "num_examples",
        "num_batches",
        "local_epochs",
        "local_steps",
        "seconds",
        # training losses (means over the local epochs of the round)
        "train_loss",
        "train_report_loss",
        "train_contrastive_loss",
        "train_grounding_loss",
        "train_seg_loss",
        "train_risk_loss",
        "train_concept_loss",
        "update_norm",
        # validation on the site's held-out split
        "val_loss",
        "val_dice",
        "val_dice_found",
        "val_nodule_sensitivity",
        "val_auc",
        "val_sensitivity",
        "val_specificity",
        "val_lung_rads_acc",
        "val_growth_mae",
        "val_concept_f1",
        "val_ece",
        # malignancy AUC within slice-thickness groups (lungvl_model.losses.group_penalty.SLICE_GROUPS)
        "val_auc_thin",
        "val_auc_medium",
        "val_auc_thick",
        # patient-level DP at the site (Opacus DP-SGD)
        "epsilon",
        "delta",
        "dp_sgd_noise_multiplier",
        "dp_sgd_max_grad_norm",
        "sample_rate",
        "dp_steps",
        "budget_exhausted",
    }
)


class MetricNotAllowed(ValueError):
    """A metric that may not leave the site (not whitelisted, or not a finite number)."""


def metric_rejections(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Why each offending metric may not be sent; ``{}`` when all may.

    Args:
        metrics: name -> value.

    Returns:
        name -> reason, for names not in :data:`METRIC_WHITELIST` and values that are not finite real
        numbers (bools are refused too).
    """
    reasons: dict[str, str] = {}
    for name, value in metrics.items():
        if name not in METRIC_WHITELIST:
            reasons[name] = f"metric {name!r} is not in METRIC_WHITELIST"
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            reasons[name] = f"metric {name!r} is not a real number: {value!r}"
        elif not math.isfinite(float(value)):
            reasons[name] = f"metric {name!r} is not finite: {value!r}"
    return reasons


def _plain(value: numbers.Real) -> int | float:
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def filter_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """Keep the metrics a site may send; **drop** the others, logging a warning with the reason.

    Args:
        metrics: name -> value (Python or numpy scalars).

    Returns:
        The allowed metrics as plain ``int``/``float`` values.
    """
    reasons = metric_rejections(metrics)
    for reason in reasons.values():
        logger.warning("dropped outbound metric: %s", reason)
    return {name: _plain(value) for name, value in metrics.items() if name not in reasons}


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be plain JSON with finite numbers: {err}") from None


class _Base(DeclarativeBase):
    pass


class Outbound(_Base):
    """One outbound message (payload described, never stored)."""

    __tablename__ = "outbound"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime)  # naive UTC; returned timezone-aware
    run_id: Mapped[str] = mapped_column(String(200), default="")
    round: Mapped[int]
    kind: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    dp: Mapped[dict[str, Any]] = mapped_column(JSON)
    epsilon: Mapped[float | None]
    delta: Mapped[float | None]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class AuditLedger:
    """Append-only record of what a site sends.

    Args:
        path_or_url: a SQLAlchemy URL, a SQLite file path (parent folders are created), or an existing
            directory (the site's state dir), in which ``outbound_ledger.db`` is used.
        read_only: open for reading only (``lungvl site audit``): nothing is created or written.

    Raises:
        CorruptStateError: the database is unreadable or not an audit ledger.
    """

    def __init__(self, path_or_url: str | Path, *, read_only: bool = False) -> None:
        text = str(path_or_url)
        if "://" not in text:
            path = Path(text).expanduser()
            if path.is_dir():
                path = path / LEDGER_FILENAME
            if read_only and not path.is_file():
                raise FileNotFoundError(f"no audit ledger at {path}")
            if not read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
            text = f"sqlite:///{path}"
        url = make_url(text)
        self.engine: Engine = create_engine(url)
        if url.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", sqlite_read_only_pragmas if read_only else _sqlite_pragmas)
        what = f"audit ledger {self.engine.url.render_as_string(hide_password=True)}"
        check_schema(self.engine, _Base.metadata, what=what, read_only=read_only)
        if not read_only:
            _Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def record(
        self,
        *,
        round: int,
        kind: str,
        payload: bytes | bytearray | memoryview,
        metrics: Mapping[str, Any],
        dp: Mapping[str, Any],
        epsilon: float | None,
        delta: float | None,
        run_id: str = "",
    ) -> int:
        """Record one outbound message before it is sent; returns the entry id.

        Args:
            round: server round the message answers.
            kind: message kind, e.g. ``"train_reply"``, ``"evaluate_reply"``.
            payload: the exact serialised bytes that will be sent (size and sha256 computed here).
            metrics: the scalar metrics inside the message.
            dp: DP parameters used (e.g. ``dp_sgd_noise_multiplier``, ``dp_sgd_max_grad_norm``,
                ``sample_rate``, ``steps``).
            epsilon: the site's patient-level ε spent so far (``None`` without DP-SGD).
            delta: the δ of that ε.
            run_id: the server's run identifier, when known.

        Raises:
            MetricNotAllowed: a metric is not whitelisted or not finite (nothing is written).
            ValueError: empty kind, bad ε/δ, or ``dp`` not plain JSON.
        """
        reasons = metric_rejections(metrics)
        if reasons:
            raise MetricNotAllowed("; ".join(reasons.values()))
        if not kind:
            raise ValueError("message kind must not be empty")
        if epsilon is not None and not (math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
        if delta is not None and not 0 <= delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {delta!r}")
        _check_json("dp", dict(dp))
        data = bytes(payload)
        entry = Outbound(
            time=datetime.now(UTC).replace(tzinfo=None),
            run_id=run_id,
            round=int(round),
            kind=kind,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            metrics={name: _plain(value) for name, value in metrics.items()},
            dp=dict(dp),
            epsilon=None if epsilon is None else float(epsilon),
            delta=None if delta is None else float(delta),
        )
        with self._sessions.begin() as s:
            s.add(entry)
            s.flush()
            return entry.id

    def entries(
        self, limit: int | None = None, *, kind: str | None = None, run_id: str | None = None, round: int | None = None
    ) -> list[dict[str, Any]]:
        """Entries oldest first; with ``limit``, only the most recent ``limit`` (still oldest first).

        ``kind``, ``run_id`` and ``round`` keep only the entries with that message kind, run and round.
        """
        query = select(Outbound).order_by(Outbound.id.desc())
        if kind is not None:
            query = query.where(Outbound.kind == kind)
        if run_id is not None:
            query = query.where(Outbound.run_id == run_id)
        if round is not None:
            query = query.where(Outbound.round == int(round))
        if limit is not None:
            query = query.limit(limit)
        with self._sessions() as s:
            rows = list(s.scalars(query))
        out = [{c.key: getattr(r, c.key) for c in Outbound.__table__.columns} for r in reversed(rows)]
        for row in out:
            row["time"] = row["time"].replace(tzinfo=UTC)
        return out

    def rounds(self, kind: str) -> set[tuple[str, int]]:
        """The distinct ``(run_id, round)`` of the entries of one message kind (e.g. the rounds trained in)."""
        query = select(Outbound.run_id, Outbound.round).where(Outbound.kind == kind).distinct()
        with self._sessions() as s:
            return {(str(run), int(rnd)) for run, rnd in s.execute(query)}

    def max_epsilon(self) -> dict[float | None, float]:
        """The largest ε recorded, per δ it was recorded at (``{}`` when no entry records an ε)."""
        query = (
            select(Outbound.delta, func.max(Outbound.epsilon))
            .where(Outbound.epsilon.is_not(None))
            .group_by(Outbound.delta)
        )
        with self._sessions() as s:
            return {None if d is None else float(d): float(e) for d, e in s.execute(query) if e is not None}

    def total_bytes(self) -> int:
        """Sum of the payload sizes of all recorded messages."""
        with self._sessions() as s:
            return int(s.scalar(select(func.coalesce(func.sum(Outbound.size_bytes), 0))) or 0)

"""What the run registry's rows add up to: a run's summary and its metrics as CSV files.

Plain functions over the row dicts that :class:`server.registry.Registry` returns (no database access),
behind :meth:`~server.registry.Registry.summary` (what ``lungvl server status`` shows) and
:meth:`~server.registry.Registry.export_csv`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["export_metrics_csv", "summarize_run"]

Row = Mapping[str, Any]


def summarize_run(
    run: dict[str, Any],
    *,
    rounds: Sequence[Row],
    participation: Sequence[Row],
    privacy: Sequence[Row],
    global_metrics: Sequence[Row],
) -> dict[str, Any]:
    """The run at a glance, from its rows (see :meth:`server.registry.Registry.summary` for the keys).

    Args:
        run: the run dict.
        rounds: the run's round rows.
        participation: the run's participation rows, in round then insertion order.
        privacy: the run's privacy-ledger rows, in round then insertion order (the last row of a site wins).
        global_metrics: the run's metric rows of scope ``"global"``.

    Returns:
        The summary dict.
    """
    last_global = max((m["round"] for m in global_metrics), default=None)
    client = [p for p in privacy if p["level"] == "client"]
    per_site = {p["site_name"]: p["epsilon"] for p in privacy if p["level"] == "sample"}  # last row wins
    top_site = max(per_site, key=lambda k: per_site[k], default=None)
    return {
        "run": run,
        "rounds_done": sum(r["status"] == "completed" for r in rounds),
        "rounds_recorded": len(rounds),
        "last_completed_round": max((r["round"] for r in rounds if r["status"] == "completed"), default=0),
        "sites_seen": sorted({p["site_name"] or p["node_id"] for p in participation}),
        "failures": sum(p["status"] != "ok" for p in participation),
        "latest_global_round": last_global,
        "latest_global_metrics": {m["name"]: m["value"] for m in global_metrics if m["round"] == last_global},
        "epsilon": client[-1]["epsilon"] if client else None,
        "delta": client[-1]["delta"] if client else None,
        "max_site_epsilon": None if top_site is None else per_site[top_site],
        "max_site_epsilon_site": top_site,
    }


def export_metrics_csv(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Write metric rows as CSV: ``metrics.csv`` (long) and one wide file per scope.

    Wide files are named ``metrics_global.csv`` and ``metrics_site_<name>.csv`` (unsafe filename
    characters replaced by ``_``), one row per round, one column per metric.

    Args:
        rows: metric rows ``{round, scope, name, value, ...}`` ordered by round, scope, name.
        out_dir: the folder to write into (created when missing).

    Returns:
        The files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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

"""``lungvl server``: what the consortium coordinator runs."""

from __future__ import annotations

from pathlib import Path

import typer

from lungvl.console import err, out

app = typer.Typer(help="Consortium server commands.", no_args_is_help=True)


@app.command("status")
def status(
    db: str = typer.Option("registry.db", "--db", help="registry: SQLite file path or SQLAlchemy URL"),
    run_id: int | None = typer.Option(None, "--run", help="run id (default: the latest run)"),
) -> None:
    """Rounds, sites, failures, epsilon spent and latest metrics of a run from the registry."""
    from server.registry import Registry
    from server.status import render_status

    if "://" not in db and not Path(db).exists():
        err.print(f"[red]no registry at {db} (give --db PATH or URL)")
        raise typer.Exit(2)
    with Registry(db) as reg:
        out.print(*render_status(reg, run_id))

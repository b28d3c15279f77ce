"""``lungvl study``: run a grid of simulations over one federation, and report it from the registry."""

from __future__ import annotations

from pathlib import Path

import typer

from lungvl.console import print_error, print_json

app = typer.Typer(
    help="Studies: a grid of simulation runs (strategy × DP × seed) and its report.", no_args_is_help=True
)


@app.command("run")
def run(
    study: Path = typer.Argument(..., exists=True, dir_okay=False, help="study TOML (simulations/studies/)"),
    out_dir: Path = typer.Option(..., "--out", help="study directory (registry.db, sites, cells/)"),
    db: str | None = typer.Option(
        None,
        "--db",
        help="registry: SQLAlchemy URL (postgresql://user:pw@host/db) or SQLite path; default OUT/registry.db",
    ),
    only: list[str] = typer.Option([], "--only", help="run only cells whose id matches this pattern (repeatable)"),
    max_cells: int | None = typer.Option(None, "--max-cells", min=1, help="stop after running this many cells"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and exit"),
    as_json: bool = typer.Option(False, "--json", help="with --dry-run: print the cells as one JSON document"),
    rerun: bool = typer.Option(False, "--rerun", help="run the selected cells again even when they finished"),
    reproducible_noise: bool = typer.Option(
        False,
        "--reproducible-noise",
        help="research only, NOT PRIVATE: seed each cell's client-level noise from its seed and cell id",
    ),
) -> None:
    """Run every cell not yet finished (a rerun skips finished cells); one progress line per cell and round.

    Exit codes: 3 when another process holds --out, 1 when a cell failed.
    """
    from server.run_lock import RunDirBusy
    from simulations.study_config import StudyConfig
    from simulations.study_run import run_study

    try:
        spec = StudyConfig.from_toml(study)
    except (KeyError, ValueError) as e:
        print_error(e.args[0] if e.args else e)
        raise typer.Exit(2) from e
    if as_json and not dry_run:
        print_error("--json goes with --dry-run (a study run prints one progress line per cell and round)")
        raise typer.Exit(2)
    if dry_run:
        if as_json:
            print_json({"study": str(study), "cells": [c.to_dict() for c in spec.cells()]})
            return
        for cell in spec.cells():
            print(cell.cell_id)
        return
    try:
        summary = run_study(
            spec,
            out_dir,
            only=only,
            max_cells=max_cells,
            rerun=rerun,
            progress=lambda line: print(line, flush=True),
            reproducible_noise=reproducible_noise,
            db_url=db,
        )
    except RunDirBusy as e:
        print_error(e)
        raise typer.Exit(3) from e
    for cell_id, reason in summary["failed"].items():
        print_error(f"{cell_id}: {reason}")
    if summary["failed"]:
        raise typer.Exit(1)


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="study directory (holds registry.db)"),
    study: str | None = typer.Option(None, "--study", help="study name (default: the only one in the registry)"),
    bootstrap: int | None = typer.Option(
        None,
        "--bootstrap",
        min=1,
        help="bootstrap resamples of the descriptive per-site-kind and local-only tables (default 2000; the main "
        "intervals are Student-t over seeds)",
    ),
    db: str | None = typer.Option(
        None, "--db", help="registry the study ran with (study run --db); default RUN_DIR/registry.db"
    ),
) -> None:
    """Write results.md, convergence.png and privacy_utility.png into RUN_DIR from its registry alone."""
    from simulations.study_report import write_report

    try:
        path = write_report(run_dir, study=study, n_boot=bootstrap, db_url=db)
    except (FileNotFoundError, ValueError) as e:
        print_error(e)
        raise typer.Exit(2) from e
    print(path)

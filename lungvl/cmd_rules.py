"""``lungvl rules``: Lung-RADS v2022 and Brock on CSV files."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer

from lungvl.console import err, print_row_errors
from lungvl.errors import naming
from lungvl.params import STDIN_NAME, input_file, is_stdin
from lungvl_model.clinical import (
    BROCK_COLUMN,
    LUNG_RADS_COLUMN,
    brock_csv,
    lung_rads_csv,
    read_csv_rows,
    write_csv_rows,
)

app = typer.Typer(help="Clinical rules: Lung-RADS v2022 and the Brock model on CSV rows.", no_args_is_help=True)


def _run(csv_path: Path, out: Path | None, fn: Callable, column: str) -> None:
    """Answer every row; exit 1 when a row had an error (the others are answered), 2 for an unusable file."""
    if is_stdin(out):
        out = None
    if out is not None and not is_stdin(csv_path) and out.exists() and out.resolve() == csv_path.resolve():
        raise ValueError(f"--out {out} is the input file: write the answers to another file")
    with input_file(csv_path) as path:
        header, rows = read_csv_rows(path)  # a missing / non-UTF-8 / empty file: ValueError naming it
    name = STDIN_NAME if is_stdin(csv_path) else csv_path.name
    answered, errors = fn(rows)
    header = [*header, column] if column not in header else header
    if out is None:
        with naming("standard output"):
            write_csv_rows(sys.stdout, header, answered)
            sys.stdout.flush()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with naming(out), out.open("w", encoding="utf-8", newline="") as fh:
            write_csv_rows(fh, header, answered)
    n = print_row_errors(f"error {name}: {e}" for e in errors)
    if n:
        err.print(f"{n:,} error(s); the other rows were answered.")
        raise typer.Exit(1)


@app.command("lung-rads")
def lung_rads(
    csv_path: Path = typer.Option(
        ...,
        "--csv",
        help="columns: type, mean_diameter_mm, solid_component_mm, context, "
        "juxtapleural, benign_pattern, suspicious_features; - reads standard input",
    ),
    out: Path | None = typer.Option(None, "--out", help="write here instead of standard output (-)"),
) -> None:
    """Add a lung_rads column (ACR Lung-RADS v2022, the implemented rows).

    Exit codes: 0 every row answered; 1 a row had an error (named on stderr; the other rows are answered);
    2 the file is missing, empty, not UTF-8 or not CSV.
    """
    _run(csv_path, out, lung_rads_csv, LUNG_RADS_COLUMN)


@app.command("brock")
def brock(
    csv_path: Path = typer.Option(
        ...,
        "--csv",
        help="columns: age, female, family_history, emphysema, "
        "longest_diameter_mm, type, upper_lobe, nodule_count, spiculation; - reads standard input",
    ),
    out: Path | None = typer.Option(None, "--out", help="write here instead of standard output (-)"),
) -> None:
    """Add a brock_probability column (McWilliams 2013 full model with spiculation).

    Exit codes: 0 every row answered; 1 a row had an error (named on stderr; the other rows are answered);
    2 the file is missing, empty, not UTF-8 or not CSV.
    """
    _run(csv_path, out, brock_csv, BROCK_COLUMN)

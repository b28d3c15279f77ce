"""``lungvl report``: structured findings from free-text chest CT reports."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from lungvl.console import err

app = typer.Typer(help="Radiology report tools.", no_args_is_help=True)


@app.command("label")
def label(
    jsonl: Path = typer.Option(..., "--jsonl", help='input lines {"id": ..., "text": ...}'),
) -> None:
    """Print one JSON line of structured findings per input line (errors go to stderr)."""
    from lungvl_model.text.labeler import label_reports_jsonl

    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        err.print(f"[red]cannot read {jsonl}: {e}")
        raise typer.Exit(2) from e
    n_err = 0
    for result, problem in label_reports_jsonl(lines):
        if problem is not None:
            n_err += 1
            err.print(f"[red]error[/red] {escape(jsonl.name)}: {escape(problem)}", highlight=False)
        elif result is not None:
            print(json.dumps(result, ensure_ascii=False))
    if n_err:
        raise typer.Exit(1)

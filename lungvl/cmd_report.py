"""``lungvl report``: structured findings from free-text chest CT reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lungvl.console import print_row_errors
from lungvl.errors import naming
from lungvl_model.text_file import read_text_lines

app = typer.Typer(help="Radiology report tools.", no_args_is_help=True)


@app.command("label")
def label(
    jsonl: Path = typer.Option(..., "--jsonl", help='input lines {"id": ..., "text": ...}'),
) -> None:
    """Print one JSON line of structured findings per input line (errors go to stderr)."""
    from lungvl_model.text.labeler import label_reports_jsonl

    lines = read_text_lines(jsonl)
    problems: list[str] = []
    with naming("standard output"):
        for result, problem in label_reports_jsonl(lines):
            if problem is not None:
                problems.append(f"error {jsonl.name}: {problem}")
            elif result is not None:
                print(json.dumps(result, ensure_ascii=False))
        sys.stdout.flush()
    if print_row_errors(problems):
        raise typer.Exit(1)

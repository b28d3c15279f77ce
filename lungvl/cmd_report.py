"""``lungvl report``: structured findings from free-text chest CT reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lungvl.console import print_row_errors
from lungvl.errors import naming
from lungvl.params import STDIN_NAME, input_file, is_stdin
from lungvl_model.text_file import read_text_lines

app = typer.Typer(help="Radiology report tools.", no_args_is_help=True)


@app.command("label")
def label(
    jsonl: Path = typer.Option(
        ..., "--jsonl", help='input lines {"id": ..., "text": ...}; - reads them from standard input'
    ),
) -> None:
    """Print one JSON line of structured findings per input line (errors go to stderr).

    Exit codes: 0 every line labelled; 1 a line was malformed, empty or too long (each named; the others
    are labelled); 2 the file is missing, empty or not UTF-8.
    """
    from lungvl_model.text.labeler import label_reports_jsonl

    with input_file(jsonl) as path:
        lines = read_text_lines(path)
    name = STDIN_NAME if is_stdin(jsonl) else jsonl.name
    problems: list[str] = []
    with naming("standard output"):
        for result, problem in label_reports_jsonl(lines):
            if problem is not None:
                problems.append(f"error {name}: {problem}")
            elif result is not None:
                print(json.dumps(result, ensure_ascii=False))
        sys.stdout.flush()
    if print_row_errors(problems):
        raise typer.Exit(1)

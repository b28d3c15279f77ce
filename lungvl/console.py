"""Shared rich consoles and progress bars for the CLI (machine-readable output goes to stdout)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

out = Console()
err = Console(stderr=True, soft_wrap=True)  # errors name paths and values: never wrap them mid-word


#: per-row errors printed before the rest are counted (a missing column on 100k rows is 21 lines, not 100k)
MAX_ROW_ERRORS = 20


def print_error(message: object) -> None:
    """``message`` as one red line on stderr, as it is (rich markup in its paths and values escaped)."""
    err.print(f"[red]{escape(str(message).replace(chr(10), ' '))}", highlight=False)


def print_row_errors(messages: Iterable[str], *, limit: int = MAX_ROW_ERRORS) -> int:
    """Print the first ``limit`` per-row errors, then one line counting the rest; returns how many there were."""
    n = 0
    for n, message in enumerate(messages, start=1):
        if n <= limit:
            print_error(message)
    if n > limit:
        print_error(f"... and {n - limit:,} more error(s) like these ({n:,} in all)")
    return n


def strict_json(obj: Any) -> Any:
    """``obj`` made strict-JSON-ready, recursively: NaN/inf become None, datetimes ISO 8601, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """Print ``obj`` as one indented, strict JSON document on stdout (the machine-readable output of ``--json``)."""
    sys.stdout.write(json.dumps(strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def log_line(message: object) -> None:
    """A progress or log line on stderr, printed as it is (no markup: bracketed names stay)."""
    err.print(message, highlight=False, markup=False)


#: Without a terminal (a log file, a pipe), a progress line is printed at every 1/this of the total.
LOG_PROGRESS_LINES = 10


@contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A ``progress(done, total, label)`` callback drawing a rich bar on stderr.

    Without a terminal a bar is drawn only when it stops, so a long job would say nothing for an hour:
    then a plain line (``train findings 150/1500 0:01:30 loss 0.812``) is printed at every
    1/:data:`LOG_PROGRESS_LINES` of the total as well.
    """
    t0 = time.monotonic()
    logged = [-1]
    with Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[label]}", markup=False),  # file names and study UIDs, as they are
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, label=label[-40:])
            if err.is_terminal or total <= 0:
                return
            mark = done * LOG_PROGRESS_LINES // total
            if mark > logged[0] and 0 < done < total:
                logged[0] = mark
                elapsed = int(time.monotonic() - t0)
                log_line(f"{description} {done}/{total} {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d} "
                         f"{label[-40:]}")  # fmt: skip

        yield update

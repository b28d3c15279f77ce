"""Shared rich consoles and progress bars for the CLI (machine-readable output goes to stdout)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

out = Console()
err = Console(stderr=True, soft_wrap=True)  # errors name paths and values: never wrap them mid-word


def print_error(message: object) -> None:
    """``message`` as one red line on stderr, as it is (rich markup in its paths and values escaped)."""
    err.print(f"[red]{escape(str(message).replace(chr(10), ' '))}", highlight=False)


@contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A ``progress(done, total, label)`` callback drawing a rich bar on stderr."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[label]}"),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, label=label[-40:])

        yield update

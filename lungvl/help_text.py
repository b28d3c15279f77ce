r"""Help text shown as written: no rich markup in docstrings and option help, paragraphs reflowed.

typer renders ``--help`` through rich markup, so a bracketed word (``[federation]``, ``[both]``,
``[run]``) disappeared from the help, and docstring lines wrapped at 100 columns in the source kept
their hard breaks on the terminal. :class:`LiteralHelpGroup`, the root group's class, fixes both for
every command when the click command tree is built: help, epilog and option help are escaped (so
commands write brackets plainly, never ``\[``) and each paragraph's single line breaks become spaces
(a paragraph starting with ``\b`` is kept as it is, as click does; so are lines that start a list
item ``- `` or are indented). The double backquotes of RST literals in docstrings are dropped.
"""

from __future__ import annotations

import inspect
from typing import Any

import click
from rich.markup import escape
from typer.core import TyperGroup

_LIST_STARTS = ("- ", "* ", "• ")


def reflow(text: str) -> str:
    """Join the lines of each paragraph of ``text`` (paragraphs stay separated by a blank line)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    out: list[str] = []
    for para in paragraphs:
        if para.startswith("\b"):
            out.append(para)
            continue
        lines = para.split("\n")
        joined = lines[0].rstrip()
        for line in lines[1:]:
            keep = line.startswith("  ") or line.lstrip().startswith(_LIST_STARTS)
            joined += ("\n" + line.rstrip()) if keep else (" " + line.strip())
        out.append(joined)
    return "\n\n".join(out)


def make_help_literal(command: click.Command) -> None:
    """Escape and reflow the help of ``command``, its parameters and, recursively, its subcommands."""
    for attr in ("help", "epilog", "short_help"):
        text = getattr(command, attr, None)
        if text:
            setattr(command, attr, escape(reflow(text).replace("``", "")))  # RST ``literals`` from docstrings
    for param in command.params:
        text = getattr(param, "help", None)
        if text:
            param.help = escape(" ".join(text.split()))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            make_help_literal(sub)


class LiteralHelpGroup(TyperGroup):
    """The root ``lungvl`` group: builds as typer does, then makes every help text literal."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        make_help_literal(self)

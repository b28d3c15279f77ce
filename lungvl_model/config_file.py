"""Read a TOML configuration file once, with errors that name the file, the line and what was wrong."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lungvl_model.text_file import decode_utf8


class ConfigFileError(ValueError):
    """A configuration file cannot be read as TOML; the message names the file and where."""


def read_toml(path: str | Path, *, what: str = "config") -> dict[str, Any]:
    """Parse ``path`` as UTF-8 TOML.

    Args:
        path: the file.
        what: what the file is, for messages (``"scenario"``, ``"server config"``...).

    Returns:
        The document.

    Raises:
        FileNotFoundError: no such file (named).
        ConfigFileError: a directory, unreadable bytes (not UTF-8: the line and byte), or a TOML syntax
            error (tomllib's line and column), each naming the file.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigFileError(f"{what} {p} is a directory, not a TOML file")
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        text = decode_utf8(p.read_bytes(), f"{what} {p}")
    except ValueError as e:
        raise ConfigFileError(str(e)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{what} {p}: TOML syntax error: {e}") from None


def reject_unknown_keys(values: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """Raise for the first key of ``values`` not in ``known``, with a "did you mean" or the known keys.

    Args:
        values: a TOML table (or any mapping read from a config).
        known: its allowed keys.
        where: how the message names the table, e.g. ``"site.toml: [federation]"``.

    Raises:
        KeyError: ``"unknown key 'x' in WHERE; did you mean 'y'?"`` (or ``"; known: [...]"``).
    """
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            raise KeyError(
                f"unknown key {key!r} in {where}"
                + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {list(known)}")
            )

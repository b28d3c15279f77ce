"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The text goes to a temporary file in the target's directory, is flushed and fsynced, and replaces the target
with ``os.replace`` (atomic on POSIX within one file system); on any error the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["replace_atomically", "write_json_atomic", "write_text_atomic"]


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace ``path`` with what ``write`` writes to a temporary file beside it, creating the parent directory.

    Args:
        path: the target file.
        write: writes the whole new content to the path it is given (and flushes it).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8, fsynced) atomically, creating its parent directory.

    Args:
        path: the target file.
        text: its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return replace_atomically(path, lambda tmp: _write_synced(tmp, text))


def write_json_atomic(
    path: str | Path, payload: Any, *, indent: int = 2, sort_keys: bool = False, allow_nan: bool = False
) -> Path:
    """Write ``payload`` as JSON (a trailing newline) with :func:`write_text_atomic`.

    Raises:
        ValueError: ``payload`` holds NaN or an infinity and ``allow_nan`` is False (nothing is written).
    """
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n"
    return write_text_atomic(path, text)

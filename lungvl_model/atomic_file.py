"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The text goes to a temporary file in the target's directory, is flushed and fsynced, and replaces the target
with ``os.replace`` (atomic on POSIX within one file system); on any error the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic", "write_text_atomic"]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically, creating its parent directory.

    Args:
        path: the target file.
        text: its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json_atomic(
    path: str | Path, payload: Any, *, indent: int = 2, sort_keys: bool = False, allow_nan: bool = False
) -> Path:
    """Write ``payload`` as JSON (a trailing newline) with :func:`write_text_atomic`.

    Raises:
        ValueError: ``payload`` holds NaN or an infinity and ``allow_nan`` is False (nothing is written).
    """
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n"
    return write_text_atomic(path, text)

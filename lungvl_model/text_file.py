"""Read a user's text file (CSV, JSONL) with errors that name the file, the line and the byte."""

from __future__ import annotations

from pathlib import Path


def decode_utf8(data: bytes, path: str | Path) -> str:
    """``data`` as UTF-8 text (a BOM dropped).

    Raises:
        ValueError: bytes that are not UTF-8, naming ``path``, the line and the byte offset.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text (line {line}, byte {e.start}: {data[e.start : e.start + 4]!r}); save it as UTF-8"
        ) from None


def read_user_text(path: str | Path, *, expected: str = "text") -> str:
    """The whole of a UTF-8 text file (a BOM is accepted and dropped).

    Args:
        path: the file.
        expected: what it should hold, for the empty-file message (``"one JSON object per line"``).

    Raises:
        FileNotFoundError: no such file (named).
        ValueError: a directory, an empty file, NUL bytes (a binary file) or bytes that are not UTF-8,
            naming the file, the line and the byte offset.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a text file")
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    data = p.read_bytes()
    if not data.strip():
        raise ValueError(f"{p}: empty file (expected {expected})")
    text = decode_utf8(data, p)
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ValueError(f"{p}: holds NUL bytes (line {line}): a binary file, not text")
    return text


def read_text_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 JSONL file (see :func:`read_user_text`)."""
    return read_user_text(path, expected="one JSON object per line").splitlines()

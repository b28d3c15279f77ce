"""One error path for the CLI: every expected failure is a short message and its own exit code.

Commands raise (or let through) the domain's exceptions; :func:`classify` turns each into an exit
code and one line naming the file, row or key and the value. Anything unexpected is a bug: its
traceback goes to a crash file (named on the terminal), never onto the terminal itself.

Exit codes: :data:`EXIT_CODES`, the one table of them (``lungvl --help`` prints it; README "Exit codes").
"""

from __future__ import annotations

import errno
import os
import sqlite3
import ssl
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lungvl.import_guard import PackageShadowed
from lungvl_model.errors import CorruptStateError, PeerUnreachable
from server.round_types import RunAborted

OK = 0
FAILED = 1
BAD_INPUT = 2
BUSY = 3
DISK_FULL = 4
NO_PERMISSION = 5
CORRUPT_STATE = 6
UNREACHABLE = 7
MISSING_DEPENDENCY = 8
INTERNAL = 70
INTERRUPTED = 130

#: every exit code and its meaning, in order (the module docstring's table; ``lungvl --help`` prints it)
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (OK, "success"),
    (FAILED, "the command ran and reports a failure (a check found problems, a run failed)"),
    (BAD_INPUT, "bad input: a file, option, row or config value is wrong (the message names it)"),
    (BUSY, "busy: another process holds the run directory"),
    (DISK_FULL, "disk full (no space left on the device or quota exceeded)"),
    (NO_PERMISSION, "permission denied or read-only file system"),
    (CORRUPT_STATE, "corrupt state: a registry, audit ledger, accountant state or checkpoint is unreadable or foreign"),
    (UNREACHABLE, "unreachable: a network peer (the SuperLink) cannot be reached or failed TLS"),
    (MISSING_DEPENDENCY, "a required program or Python package is missing (or shadowed by another of the same name)"),
    (INTERNAL, "internal error (a bug in lungvl): the traceback is in the crash file printed"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)


def exit_codes_help() -> str:
    """The exit-code table as help paragraphs (one line each in ``--help``)."""
    return "\n\n".join(["Exit codes:", *(f"{code:<4}{meaning}" for code, meaning in EXIT_CODES)])


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class Verdict:
    """How one exception ends the command.

    Attributes:
        code: the exit code.
        message: one line for the terminal (plain text; the caller escapes markup).
    """

    code: int
    message: str


def _text(exc: BaseException) -> str:
    """The exception's own message (``KeyError`` quotes its argument: take it as it is)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def _os_message(exc: OSError) -> str:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or _text(exc)
    return f"{where}: {reason}" if where else reason


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (a disk-full deep inside a library counts)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _sql_error(exc: BaseException) -> BaseException | None:
    """A DB-API error in ``exc``'s chain (sqlite3 or wrapped by SQLAlchemy), else None."""
    for e in _chain(exc):
        if isinstance(e, sqlite3.Error):
            return e
        orig = getattr(e, "orig", None)
        if isinstance(orig, sqlite3.Error):
            return orig
    return None


def classify(exc: BaseException) -> Verdict | None:
    """The exit code and message for an expected failure; None for a bug.

    Args:
        exc: what the command raised.

    Returns:
        The verdict, or None when ``exc`` is not an expected failure (the caller writes a crash file).
    """
    if isinstance(exc, KeyboardInterrupt):
        return Verdict(INTERRUPTED, "interrupted (Ctrl-C): what was written so far is kept as it is")
    if isinstance(exc, BrokenPipeError):
        return Verdict(FAILED, "output closed before the command finished writing")
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return Verdict(DISK_FULL, f"disk full: {_os_message(e)}")
    sql = _sql_error(exc)
    if sql is not None:
        text = str(sql).lower()
        if "disk is full" in text or "database or disk is full" in text:
            return Verdict(DISK_FULL, f"disk full: {_text(exc)}")
        if "readonly" in text or "read-only" in text:
            return Verdict(NO_PERMISSION, f"read-only database: {_text(exc)}")
        if "unable to open" in text:
            return Verdict(BAD_INPUT, f"cannot open database: {_text(exc)}")
        return Verdict(CORRUPT_STATE, f"corrupt or foreign database: {_text(exc)}")
    for e in _chain(exc):  # a server database's driver error (SQLAlchemy keeps it as .orig)
        orig = getattr(e, "orig", None)
        if isinstance(orig, Exception) and not isinstance(orig, sqlite3.Error):
            text = str(orig).lower()
            if any(w in text for w in ("connect", "timeout", "timed out", "translate host", "resolve")):
                return Verdict(UNREACHABLE, f"database unreachable: {str(orig).strip()}")
            if any(w in text for w in ("authentication", "password", "permission denied", "does not exist")):
                return Verdict(BAD_INPUT, f"database refused: {str(orig).strip()}")
    if isinstance(exc, CorruptStateError):
        return Verdict(CORRUPT_STATE, _text(exc))
    for e in _chain(exc):  # the server gave up on the run (too many failed rounds in a row): recorded failed
        if isinstance(e, RunAborted):
            return Verdict(FAILED, f"run failed: {_text(e)}")
    if isinstance(exc, PeerUnreachable | ssl.SSLError):
        return Verdict(UNREACHABLE, _text(exc))
    if isinstance(exc, PackageShadowed):
        return Verdict(MISSING_DEPENDENCY, _text(exc))
    if isinstance(exc, ModuleNotFoundError):
        if "pip install" in _text(exc):  # the raiser named what to install (e.g. the registry's PostgreSQL driver)
            return Verdict(MISSING_DEPENDENCY, _text(exc))
        name = exc.name or _text(exc)
        return Verdict(MISSING_DEPENDENCY, f"missing Python package {name!r}: install lungvl's dependencies")
    if isinstance(exc, OSError):
        if exc.errno in _PERMISSION_ERRNOS or isinstance(exc, PermissionError):
            kind = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
            return Verdict(NO_PERMISSION, f"{kind}: {_os_message(exc)}")
        if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | FileExistsError):
            return Verdict(BAD_INPUT, _os_message(exc) if exc.filename else _text(exc))
        if isinstance(exc, ConnectionError | TimeoutError):
            return Verdict(UNREACHABLE, _text(exc))
        return Verdict(BAD_INPUT, _os_message(exc))  # EIO, ENAMETOOLONG, ELOOP...: the file named
    if isinstance(exc, UnicodeDecodeError):
        return Verdict(BAD_INPUT, f"not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 4]!r})")
    if isinstance(exc, tomllib.TOMLDecodeError):
        return Verdict(BAD_INPUT, f"TOML syntax error: {_text(exc)}")
    if isinstance(exc, ValueError | KeyError):
        return Verdict(BAD_INPUT, _text(exc))
    if type(exc).__module__.startswith("sqlalchemy") and type(exc).__name__ in ("ArgumentError", "NoSuchModuleError"):
        return Verdict(BAD_INPUT, f"database URL not usable: {_text(exc)}")
    return None


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give an ``OSError`` raised inside (a write that hit a full disk has no file name) ``path`` as its file."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror or _text(e), str(path)) from e
        raise


def crash_file(exc: BaseException, argv: list[str]) -> Path | None:
    """Write ``exc``'s traceback to a crash file and return its path (None when nothing is writable)."""
    text = "".join(traceback.format_exception(exc))
    header = f"lungvl {' '.join(argv)}\n{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
    for folder in (os.environ.get("LUNGVL_CRASH_DIR"), tempfile.gettempdir()):
        if not folder:
            continue
        try:
            fd, name = tempfile.mkstemp(prefix="lungvl-crash-", suffix=".txt", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(header + text)
            return Path(name)
        except OSError:
            continue
    return None


def run_guarded(command: Callable[[], object], argv: list[str], print_error: Callable[[str], None]) -> int:
    """Run ``command`` (the click/typer app in standalone mode) and turn what it raises into an exit code.

    Args:
        command: runs the CLI; raises ``SystemExit`` for its own exits.
        argv: the arguments (for the crash file).
        print_error: prints one error line (escaping markup).

    Returns:
        The exit code.
    """
    try:
        command()
    except SystemExit as e:
        code = e.code
        if code is None:
            return OK
        if isinstance(code, int):
            if code == INTERRUPTED:  # click turns Ctrl-C into a silent exit 130
                print_error("interrupted (Ctrl-C): what was written so far is kept as it is")
            return code
        print_error(str(code))
        return FAILED
    except BaseException as e:  # noqa: BLE001 - the one place every failure is turned into an exit code
        verdict = classify(e)
        if verdict is not None:
            print_error(verdict.message)
            return verdict.code
        path = crash_file(e, argv)
        where = f"; the traceback is in {path}" if path else ""
        print_error(f"internal error (a bug in lungvl): {type(e).__name__}: {_text(e)}{where}")
        return INTERNAL
    return OK


def exit_with(code: int) -> None:
    """Flush and exit (separate so tests can call :func:`run_guarded` without exiting)."""
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)

"""Run directories are owned: one lungvl process at a time writes a run directory (:class:`RunDirLock`).

The lock is an OS advisory lock, ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.lungvl.lock``, taken
without waiting: a second ``lungvl simulate`` / ``study run`` / ``server start`` on the same directory is
refused at once with :class:`RunDirBusy`, which names the directory and the holder (PID, host, command,
since when) from the note the holder wrote into the lock file.

The kernel drops the lock when the holder closes the file or dies (SIGKILL, OOM kill, a crash), so a
lock file left behind by a dead process never blocks anyone and needs no clean-up: the file is only a
note of who held the lock. A clean release empties the note; a note found while the lock is free was
left by a holder that died (:attr:`RunDirLock.stale`, and the new holder says so through ``log``).

Limits: advisory (it keeps lungvl commands apart, not other programs); per open file, so two
:class:`RunDirLock` of one directory in one process exclude each other too (no re-entry); a process
forked while holding it (not exec'd: the descriptor is close-on-exec) shares the lock until it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = ["LOCK_FILE", "RunDirBusy", "RunDirLock", "describe_holder", "read_note"]

LOCK_FILE: Final = ".lungvl.lock"
_MAX_COMMAND = 300


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock; the message names the directory and the holder.

    Attributes:
        run_dir: the directory.
        holder: the holder's note (``pid``, ``host``, ``command``, ``what``, ``since``); ``{}`` when it
            had not written it yet.
    """

    def __init__(self, run_dir: Path, holder: Mapping[str, Any], what: str) -> None:
        self.run_dir = run_dir
        self.holder = dict(holder)
        super().__init__(f"{what} refused: {run_dir} is in use by {describe_holder(self.holder)}; wait for it to end")


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(note: Mapping[str, Any]) -> str:
    """``PID 123 on host (lungvl simulate, command: ...) since 2025-01-01T10:00:00+00:00``, one line."""
    if not note.get("pid"):
        return "another process (it has not written its note into the lock file yet)"
    pid, host = int(note["pid"]), _one_line(note.get("host", "?"))
    gone = host == socket.gethostname() and not _pid_alive(pid)
    who = f"PID {pid}{' (no longer running)' if gone else ''} on {host}"
    what = _one_line(note.get("what", ""))
    return f"{who} ({what}, command: {_one_line(note.get('command', '?'))}) since {_one_line(note.get('since', '?'))}"


def read_note(path: str | Path) -> dict[str, Any]:
    """The note in a lock file (``{}`` when missing, empty or unreadable); reading takes no lock."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return {}
    return _parse(text)


def _parse(text: str) -> dict[str, Any]:
    try:
        note = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return note if isinstance(note, dict) else {}


def _read_fd(fd: int) -> dict[str, Any]:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return _parse(b"".join(chunks).decode("utf-8", errors="replace"))


class RunDirLock:
    """Exclusive ownership of a run directory for the duration of a ``with`` block (module docstring).

    Args:
        run_dir: the directory (created when missing, with its parents).
        what: what the holder does, for the note and the refusal (e.g. ``"lungvl simulate tiny"``).
        log: told when the lock file holds the note of a holder that died.

    Raises:
        RunDirBusy: on entering, when another open lock file (another process, or another
            :class:`RunDirLock` in this one) holds the lock.

    Example:
        >>> with RunDirLock("runs/sim", what="lungvl simulate"):  # doctest: +SKIP
        ...     run_the_simulation()
    """

    def __init__(self, run_dir: str | Path, *, what: str, log: Callable[[str], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.what = what
        self.log = log
        self.stale: dict[str, Any] | None = None
        self.note: dict[str, Any] = {}
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock without waiting and write this process's note into the lock file."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunDirLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's note stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise RunDirBusy(self.run_dir, holder, self.what) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            previous = _read_fd(fd)
            if previous:  # a clean release empties the note: this one's writer died holding the lock
                self.stale = previous
                if self.log is not None:
                    self.log(
                        f"{self.run_dir}: the lock's previous holder, {describe_holder(previous)}, ended without "
                        "releasing it (the OS freed the lock when it died); taking it over"
                    )
            self.note = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": shlex.join(sys.argv)[:_MAX_COMMAND],
                "what": self.what,
                "since": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.note) + "\n").encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the note and drop the lock (closing the file drops it); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

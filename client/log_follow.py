"""Follow the site's process logs and bring their failures to the terminal (``lungvl site join``).

The SuperNode and the worker write to ``<state_dir>/logs/{supernode,worker}.log``; what goes wrong there
(the SuperLink refusing the node, a TLS error, a crash) must not stay in the file. A
:class:`LogFollower` reads what was appended since it last looked (polled by
:func:`client.deploy.run_site`'s 0.5 s loop: no threads) and passes on:

- lines at level ERROR or CRITICAL, with their continuation lines (Flower writes its exit message over
  several lines: ``Exit Code: 305`` / ``Failed to initialize the connection to the SuperLink.`` / the
  reason / the help text);
- Flower 1.42's connection lines at WARNING/INFO (``Connection attempt failed, retrying in ...``,
  ``Connection successful after ...``), the first at once and repeats at most once per ``repeat_s``;
- the exception line that ends a Python traceback (its frames are left in the file).

It keeps the last lines it read, for :func:`exit_report` when a process ends. The line classifiers are
pure functions (:func:`strip_ansi`, :func:`line_level`, :func:`classify`, :func:`flower_exit_code`).
"""

from __future__ import annotations

import re
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = [
    "LogFollower",
    "classify",
    "exit_meaning",
    "exit_report",
    "flower_exit_code",
    "line_level",
    "strip_ansi",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Flower (``ERROR :      msg``), uvicorn (``INFO:     msg``), the worker (``2026-01-01 10:00:00,123 ERROR name: msg``)
# and Flower's SuperLink (``2026-01-01T10:00:00.123Z ERROR [uvicorn.error] msg``).
_LEVEL = re.compile(r"^(?:\d{4}-\d\d-\d\d[T ][\d:.,]+Z? )?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b\s*:?\s*")
_EXIT_CODE = re.compile(r"\bExit Code: (\d+)\b")
#: Flower 1.42 SuperNode lines about its connection to the SuperLink, by kind.
CONNECTION_LINES: Final = ("Connection attempt failed", "Giving up reconnection", "does not recognize this SuperNode")
RECOVERY_LINES: Final = ("Connection successful after",)
TLS_WORDS: Final = ("SSL", "TLS", "certificate verify failed", "CERTIFICATE_VERIFY_FAILED")
#: uvicorn/FastAPI start and stop chatter, left out of :func:`exit_report`.
NOISE: Final = (
    "Started server process",
    "Waiting for application",
    "Application startup complete",
    "Application shutdown complete",
    "Shutting down",
    "Finished server process",
    "FastAPI lifespan",
    "Uvicorn running on",
)
_TRACEBACK_GLUE: Final = ("Traceback (most recent call last)", "During handling of", "The above exception")
_QUIET_EXCEPTIONS: Final = ("SystemExit", "KeyboardInterrupt")  # a process stopping, not failing
MAX_CONTINUATION: Final = 8


def strip_ansi(line: str) -> str:
    """``line`` without terminal colour codes and trailing whitespace (Flower colours its file logs too)."""
    return _ANSI.sub("", line).rstrip()


def line_level(line: str) -> str | None:
    """The log level a line starts with (``WARN`` read as ``WARNING``), or None for a continuation line."""
    m = _LEVEL.match(line)
    if m is None:
        return None
    return "WARNING" if m.group(1) == "WARN" else m.group(1)


def _message(line: str) -> str:
    """A logged line as ``LEVEL: message`` (timestamp and padding removed)."""
    m = _LEVEL.match(line)
    return f"{line_level(line)}: {line[m.end() :]}" if m else line


def classify(line: str) -> str | None:
    """What a (colour-stripped) log line means for the terminal.

    Returns:
        ``"tls"`` (an ERROR/CRITICAL line about SSL/TLS/certificates), ``"error"`` (any other
        ERROR/CRITICAL line), ``"connection"`` (Flower's connection-failure lines), ``"recovered"``
        (``Connection successful after ...``), or None (nothing to show).
    """
    level = line_level(line)
    if level in ("ERROR", "CRITICAL"):
        return "tls" if any(w in line for w in TLS_WORDS) else "error"
    if any(s in line for s in CONNECTION_LINES):
        return "connection"
    if any(s in line for s in RECOVERY_LINES):
        return "recovered"
    return None


def flower_exit_code(line: str) -> int | None:
    """The Flower exit code in ``Exit Code: NNN`` (the process itself exits with 1), or None."""
    m = _EXIT_CODE.search(line)
    return int(m.group(1)) if m else None


def exit_meaning(code: int) -> str:
    """Flower's one-line help for an exit code (``flwr.supercore.exit.exit_code``), or ``""``."""
    try:
        from flwr.supercore.exit.exit_code import EXIT_CODE_HELP
    except ImportError:  # another Flower version: the log still has the message
        return ""
    return " ".join(str(EXIT_CODE_HELP.get(code, "")).split())


class LogFollower:
    """Read a log file from its current end on each :meth:`poll`; pass failures to ``emit``.

    Args:
        path: the log file (it may not exist yet).
        name: prefix of the emitted lines (``"supernode"``).
        emit: line printer.
        from_end: start at the file's current end (what an earlier process wrote is not this one's).
        keep: how many of the last lines read to keep for :meth:`tail`.
        repeat_s: show a repeated connection line at most once per this many seconds.
        clock: seconds (monotonic), for tests.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        emit: Callable[[str], object],
        from_end: bool = True,
        keep: int = 10,
        repeat_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.emit = emit
        self.repeat_s = repeat_s
        self.clock = clock
        self.offset = self.path.stat().st_size if from_end and self.path.exists() else 0
        self.flower_exit_code: int | None = None
        self.tls_error = False
        self._partial = b""
        self._tail: deque[str] = deque(maxlen=keep)
        self._in_error = False
        self._continued = 0
        self._in_traceback = False
        self._last_connection: float | None = None
        self._suppressed = 0

    def poll(self) -> int:
        """Read what was appended since the last poll and emit what matters.

        Returns:
            The number of lines emitted.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size < self.offset:  # truncated or replaced: start again from its beginning
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return 0
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return sum(self._feed(strip_ansi(raw.decode("utf-8", errors="replace"))) for raw in lines)

    def tail(self) -> list[str]:
        """The last lines read (colour-stripped, without uvicorn's start/stop chatter)."""
        return list(self._tail)

    def _show(self, text: str) -> int:
        self.emit(f"{self.name}: {text}")
        return 1

    def _feed(self, line: str) -> int:
        if line.strip() and not any(n in line for n in NOISE):
            self._tail.append(line)
        code = flower_exit_code(line)
        if code is not None:
            self.flower_exit_code = code
        if self._in_traceback:
            if not line.strip() or line[:1].isspace() or line.startswith(_TRACEBACK_GLUE):
                return 0
            self._in_traceback = False
            if line.startswith(_QUIET_EXCEPTIONS):
                return 0
            if any(w in line for w in TLS_WORDS):
                self.tls_error = True
            return self._show(line)  # the exception (``ssl.SSLError: ...``)
        if line.startswith(_TRACEBACK_GLUE[0]):
            self._in_traceback = True
            return 0
        level = line_level(line)
        if level is None:  # a continuation of the last logged line
            if self._in_error and line.strip() and self._continued < MAX_CONTINUATION:
                self._continued += 1
                if any(w in line for w in TLS_WORDS):
                    self.tls_error = True
                return self._show(f"  {line.strip()}")
            return 0
        kind = classify(line)
        self._in_error, self._continued = kind in ("error", "tls"), 0
        if kind is None:
            return 0
        if kind == "tls":
            self.tls_error = True
        if kind == "connection":
            now = self.clock()
            if self._last_connection is not None and now - self._last_connection < self.repeat_s:
                self._suppressed += 1
                return 0
            more = f" ({self._suppressed} more like it since)" if self._suppressed else ""
            self._last_connection, self._suppressed = now, 0
            return self._show(_message(line) + more)
        if kind == "recovered":
            self._last_connection, self._suppressed = None, 0
        return self._show(_message(line))


def exit_report(name: str, returncode: int, follower: LogFollower | None) -> list[str]:
    """Lines telling how a process ended: its exit code, Flower's exit code and meaning, its last log lines.

    Args:
        name: the process (``"supernode"``).
        returncode: :attr:`subprocess.Popen.returncode` (negative: killed by that signal).
        follower: the follower of its log (after a last :meth:`LogFollower.poll`), or None.
    """
    if returncode < 0:
        try:
            why = f" (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            why = f" (killed by signal {-returncode})"
    else:
        why = ""
    fcode = follower.flower_exit_code if follower is not None else None
    if fcode is not None:
        meaning = exit_meaning(fcode)
        why += f" (Flower exit code {fcode}{': ' + meaning if meaning else ''})"
    lines = [f"{name} exited with code {returncode}{why}"]
    if follower is not None:
        tail = follower.tail()
        if tail:
            lines.append(f"last lines of {follower.path}:")
            lines += [f"  | {t}" for t in tail]
        else:
            lines.append(f"nothing new in {follower.path}")
    return lines

"""Stopping the Flower processes lungvl starts (SuperLink, SuperNode, workers) by PID, children included.

Shared by ``server/deploy.py`` and ``client/deploy.py`` (which may not import each other) and the
end-to-end tests. Linux: children are found through ``/proc``; elsewhere only the process itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["children", "stop_process"]


def children(pid: int) -> list[int]:
    """Direct and indirect child processes of ``pid`` (from /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0, *, kill: bool = False) -> None:
    """Stop ``proc`` and its descendants by PID (SIGTERM, then SIGKILL after ``timeout``; ``kill``: SIGKILL now)."""
    pids = [proc.pid, *children(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)

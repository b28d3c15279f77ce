"""Run directories are owned: one holder of ``<run_dir>/.lungvl.lock`` at a time, freed when it ends or dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.run_lock import LOCK_FILE, RunDirBusy, RunDirLock, read_note

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from server.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1], what="holder test").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir, what="lungvl simulate first") as first:
        assert first.held and read_note(run_dir / LOCK_FILE)["pid"] == os.getpid()
        with pytest.raises(RunDirBusy) as busy:
            RunDirLock(run_dir, what="lungvl simulate second").acquire()
        message = str(busy.value)
        assert "\n" not in message
        assert message.startswith(f"lungvl simulate second refused: {run_dir} is in use by PID {os.getpid()} on ")
        assert "(lungvl simulate first, command: " in message
        assert f"since {first.note['since']}" in message
        assert read_note(run_dir / LOCK_FILE) == first.note  # the refused one wrote nothing
    assert not first.held and (run_dir / LOCK_FILE).read_text() == ""  # a clean release leaves no note
    with RunDirLock(run_dir, what="third") as third:
        assert third.held and third.stale is None


def test_a_killed_holder_frees_the_lock_and_its_stale_note_is_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by PID {child.pid} on .*holder test"):
            RunDirLock(run_dir, what="lungvl study run").acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == child.pid  # the dead holder's note stays
    lines: list[str] = []
    with RunDirLock(run_dir, what="after the kill", log=lines.append) as lock:  # the OS freed the lock
        assert lock.stale is not None and lock.stale["pid"] == child.pid
        assert read_note(run_dir / LOCK_FILE)["pid"] == os.getpid()
    assert len(lines) == 1 and f"PID {child.pid} (no longer running)" in lines[0] and "died" in lines[0]

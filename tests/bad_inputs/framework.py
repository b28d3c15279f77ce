"""The bad-input corpus: each case is a command a careless user or a crashing machine runs, and what it must do.

A case writes its inputs into a fresh folder, runs ``lungvl`` (in-process through :func:`lungvl.cli.run`,
or as a subprocess where it needs one: a signal, a lock held by another process, a size-limited file
system), and the runner asserts, for every case:

* the exit code (``lungvl.errors``: 2 bad input, 3 busy, 4 disk full, 5 no permission, 6 corrupt state,
  7 unreachable, 1 a check that found problems);
* no traceback on the terminal (and never the internal-error exit 70);
* the message names the offending file, row or key (``names``: substrings that must appear);
* no file that existed before the command changed (sha256 and size), except those the case allows;
* it finishes under its timeout (pytest-timeout; subprocesses get their own timeout).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

#: classes reported in the closing note (one per case)
CLASSES = (
    "cli",
    "dicom",
    "reports",
    "labels",
    "csv",
    "site_toml",
    "scenario_toml",
    "server_toml",
    "keys_certs",
    "state",
    "concurrency",
    "disk",
)


@dataclass(frozen=True)
class Outcome:
    """What one run of ``lungvl`` did."""

    code: int
    output: str


@dataclass(frozen=True)
class Case:
    """One bad input and the behaviour required of it.

    Attributes:
        id: unique id (pytest parameter id).
        klass: one of :data:`CLASSES`.
        setup: ``setup(tmp) -> argv`` writes the inputs under ``tmp`` and returns lungvl's arguments.
        code: the exit code required.
        names: substrings the output must contain (the file, row, key or value named).
        subprocess: run as ``python -m lungvl.cli`` in a child process (argv may start with a wrapper
            such as ``["unshare", ...]``: then ``setup`` returns the full command line).
        may_change: relative paths (under ``tmp``) the command may create or change.
        absent: substrings the output must not contain (e.g. a "usable" verdict).
        timeout: seconds.
        env: extra environment of a subprocess case.
        interrupt_after: send SIGINT (Ctrl-C) to a subprocess case after this many seconds.
    """

    id: str
    klass: str
    setup: Callable[[Path], list[str]]
    code: int
    names: tuple[str, ...] = ()
    subprocess: bool = False
    may_change: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    timeout: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    interrupt_after: float | None = None


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_in_process(argv: list[str]) -> Outcome:
    """``lungvl argv`` in this process, stdout and stderr captured together."""
    from lungvl.cli import run

    buf = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # a wide terminal (as for subprocess cases): tables do not wrap names
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            code = run(argv)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return Outcome(code, buf.getvalue())


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child ``lungvl`` (no telemetry, one thread, a writable matplotlib dir)."""
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1", COLUMNS="200")
    env.setdefault("MPLCONFIGDIR", "/tmp/mpl")
    env.update(extra or {})
    return env


def lungvl_cmd() -> list[str]:
    """The command line that runs lungvl's CLI in a child process."""
    return [sys.executable, "-m", "lungvl.cli"]


def run_subprocess(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None, interrupt_after: float | None = None
) -> Outcome:
    """A child process; a hang is a failure (TimeoutExpired propagates)."""
    if interrupt_after is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(env))
        return Outcome(proc.returncode, proc.stdout + proc.stderr)
    # A test run started in the background of a non-interactive shell (`pytest ... &`) inherits SIGINT ignored, and
    # so would the child: give it the default disposition, as a terminal's foreground process has.
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(env),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(interrupt_after)
    child.send_signal(signal.SIGINT)
    try:
        output, _ = child.communicate(timeout=timeout)
    finally:
        child.kill()
    return Outcome(child.returncode, output)


def check(case: Case, tmp: Path) -> Outcome:
    """Run ``case`` in ``tmp`` and assert everything the corpus requires; returns the outcome."""
    argv = case.setup(tmp)
    before = snapshot(tmp)
    if case.subprocess:
        outcome = run_subprocess(argv, case.timeout, case.env, case.interrupt_after)
    else:
        outcome = run_in_process(argv)
    text = outcome.output
    assert "Traceback (most recent call last)" not in text, f"{case.id}: traceback\n{text}"
    assert outcome.code != 70, f"{case.id}: internal error\n{text}"
    assert outcome.code == case.code, f"{case.id}: exit {outcome.code}, expected {case.code}\n{text}"
    flat = " ".join(text.split())  # rich may wrap long paths
    for name in case.names:
        assert name in text or name in flat, f"{case.id}: output does not name {name!r}\n{text}"
    for name in case.absent:
        assert name not in text, f"{case.id}: output says {name!r}\n{text}"
    after = snapshot(tmp)
    changed = sorted(
        k for k in before if after.get(k) != before[k] and not any(k.startswith(m) for m in case.may_change)
    )
    assert not changed, f"{case.id}: pre-existing files changed or removed: {changed}\n{text}"
    return outcome

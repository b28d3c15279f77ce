from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from federation.processes import children, stop_process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie counts as gone
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children are found through /proc")
@pytest.mark.parametrize("kill", [False, True])
def test_stop_process_takes_the_children_along(kill: bool) -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while len(children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = children(proc.pid)
    assert len(kids) == 2
    stop_process(proc, timeout=5, kill=kill)
    assert proc.poll() is not None
    assert not any(_alive(k) for k in kids)

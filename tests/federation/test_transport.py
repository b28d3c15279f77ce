"""client.supernode_main: Flower's SuperNode, with the object-pull backoff shortened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flwr.supercore.inflatable import inflatable_utils

from federation.transport import shorten_object_pull_backoff

ROOT = Path(__file__).resolve().parents[2]


def test_flowers_object_pull_backoff_can_be_shortened() -> None:
    """Guards the Flower upgrade path: the SuperNode launcher and the ServerApp rely on these names."""
    funcs = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__ or {}) for f in funcs]
    try:
        shorten_object_pull_backoff(0.2, 2.0)
        for f in funcs:
            assert f.__kwdefaults__ is not None
            assert f.__kwdefaults__["initial_backoff"] == 0.2 and f.__kwdefaults__["backoff_cap"] == 2.0
    finally:
        for f, kw in zip(funcs, saved, strict=True):
            f.__kwdefaults__ = kw


def test_it_is_flowers_supernode_cli() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "client.supernode_main", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
    assert "--superlink" in res.stdout and "--auth-supernode-private-key" in res.stdout and "--isolation" in res.stdout

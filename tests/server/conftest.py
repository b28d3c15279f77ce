"""Fixtures of the server tests that drive :func:`server.app.run_server` in-process with a micro model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def init_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro LungVL model package (~100k parameters): what the ServerApp loads and checkpoints."""
    from tests.conftest import micro_checkpoint

    return micro_checkpoint(tmp_path_factory.mktemp("init") / "model")

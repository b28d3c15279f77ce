"""Fixtures of the server tests that drive :func:`server.app.run_server` in-process with a micro model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages need a task identity; Flower's runtimes set it, an in-process test sets its own."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


@pytest.fixture(scope="module")
def init_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro LungVL model package (~100k parameters): what the ServerApp loads and checkpoints."""
    from tests.conftest import micro_checkpoint

    return micro_checkpoint(tmp_path_factory.mktemp("init") / "model")

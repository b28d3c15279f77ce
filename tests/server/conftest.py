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
    from lungvl_model.data.preprocess import PreprocessConfig
    from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig
    from lungvl_model.models.lungvl import LungVLModel
    from lungvl_model.text.tokenizer import train_tokenizer
    from lungvl_model.training.checkpoint import save_checkpoint

    cfg = LungVLConfig(
        preset="test",
        vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
        text=TextConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, visual_scales=(2, 3), dropout=0.0),
        heads=HeadsConfig(hidden=16),
        input=PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(32, 32, 32)),
    )
    texts = ["A 9 mm solid nodule in the right upper lobe. Lung-RADS 4A.", "No pulmonary nodules. Lung-RADS 1."] * 8
    model = LungVLModel(cfg, train_tokenizer(texts, vocab_size=300))
    return save_checkpoint(tmp_path_factory.mktemp("init") / "model", model, {"stage": "init"})

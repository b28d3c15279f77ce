"""The model's identity for report.json ``provenance`` (and the exported SEG/SR's device serial number)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def model_identity(model_dir: str | Path, meta: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """Checkpoint path, sha256 of its model.pt, training stage, preset and the resolved model config.

    Args:
        model_dir: the checkpoint directory.
        meta: its meta.json (as returned by ``load_checkpoint``).
        config: the model's :class:`~lungvl_model.models.config.LungVLConfig`.

    Returns:
        ``{"checkpoint", "model_sha256", "stage", "preset", "config_sha256", "config"}``; ``config_sha256`` is
        the sha256 of the config's canonical JSON (sorted keys), so two reports can be compared by it.
    """
    cfg = config.to_dict()
    text = json.dumps(cfg, sort_keys=True, default=str)
    return {
        "checkpoint": str(model_dir),
        "model_sha256": meta.get("model_sha256"),
        "stage": meta.get("stage"),
        "preset": getattr(config, "preset", None),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "config": cfg,
    }

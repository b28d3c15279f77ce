"""The per-sentence deferral threshold, calibrated on validation data and stored beside a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lungvl_model.errors import CorruptStateError

CALIBRATION_FILE = "calibration.json"


def save_threshold(checkpoint_dir: str | Path, threshold: float, details: dict[str, Any]) -> Path:
    """Write ``calibration.json`` (threshold in nats of mean token entropy) into a checkpoint directory."""
    p = Path(checkpoint_dir) / CALIBRATION_FILE
    value = threshold if math.isfinite(threshold) else 1e9
    p.write_text(json.dumps({"sentence_entropy_threshold": value, **details}, indent=2, default=float))
    return p


def load_threshold(checkpoint_dir: str | Path) -> float | None:
    """The calibrated threshold, or None when the checkpoint has not been calibrated.

    Raises:
        CorruptStateError: the calibration file is damaged (named).
    """
    p = Path(checkpoint_dir) / CALIBRATION_FILE
    if not p.exists():
        return None
    try:
        value = json.loads(p.read_text(encoding="utf-8"))["sentence_entropy_threshold"]
        return float(value)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptStateError(f"{p}: damaged calibration file ({type(e).__name__}: {e})") from None

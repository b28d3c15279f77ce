"""The parts stored beside a LungVL checkpoint that the explanation pipeline uses, loaded in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lungvl_model.inference.candidate_filter import load_from_checkpoint
from lungvl_model.models.fine_detector import load_fine_detector
from lungvl_model.models.nodule_risk import load_nodule_risk


def explain_parts(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments of :func:`~lungvl_model.inference.explain.explain_study` from a checkpoint folder.

    Args:
        checkpoint_dir: the checkpoint directory.

    Returns:
        ``{"candidate_filter", "fine_detector", "nodule_risk"}``, each None when the folder has none.

    Raises:
        CorruptStateError: naming the file, when one of them is damaged.
    """
    risk = load_nodule_risk(checkpoint_dir)
    return {
        "candidate_filter": load_from_checkpoint(checkpoint_dir),
        "fine_detector": load_fine_detector(checkpoint_dir),
        "nodule_risk": risk[0] if risk is not None else None,
    }

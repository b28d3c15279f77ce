"""The parts stored beside a LungVL checkpoint that the explanation pipeline uses, loaded in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.candidate_filter import FILENAME, load_from_checkpoint
from lungvl_model.models.fine_detector import DETECTOR_FILES, load_fine_detector
from lungvl_model.models.nodule_risk import load_nodule_risk


def explain_parts(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments of :func:`~lungvl_model.inference.explain.explain_study` from a checkpoint folder.

    Args:
        checkpoint_dir: the checkpoint directory.

    Returns:
        ``{"candidate_filter", "fine_detector", "nodule_risk"}``, each None when the folder has none.

    Raises:
        CorruptStateError: naming the file, when one of them is damaged, or when the candidate filter
            was fitted on a fine detector's probability and the folder has no fine detector.
    """
    risk = load_nodule_risk(checkpoint_dir)
    flt = load_from_checkpoint(checkpoint_dir)
    detector = load_fine_detector(checkpoint_dir)
    if flt is not None and flt.triage_source == "fine_detector" and detector is None:
        raise CorruptStateError(
            f"{Path(checkpoint_dir) / FILENAME}: the candidate filter was fitted on the fine detector's "
            f"probability (key 'triage_source' is 'fine_detector'), and {checkpoint_dir} has no "
            f"{DETECTOR_FILES[0]}: copy it beside the filter or retrain the filter"
        )
    return {"candidate_filter": flt, "fine_detector": detector, "nodule_risk": risk[0] if risk is not None else None}

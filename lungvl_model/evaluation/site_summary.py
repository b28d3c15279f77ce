"""A site's whole-split summary of the risk heads: the scalar metrics that may leave a site.

Only aggregates over the site's split come out (no per-study value), so the site client can send them
in an evaluate reply (their names are in ``client.ledger.METRIC_WHITELIST``):

============================  ==========================================================================
``val_auc``                   malignancy AUC (studies with a known label; both classes needed)
``val_ece``                   malignancy expected calibration error (10 bins)
``val_sensitivity``           sensitivity for Lung-RADS >= 4A (true >= 4A predicted >= 4A)
``val_specificity``           specificity for Lung-RADS >= 4A (true < 4A predicted < 4A)
``val_concept_f1``            micro F1 of the binary concepts (spiculated, calcified, juxtapleural)
``val_auc_<group>``           malignancy AUC within a slice-thickness group (``thin``/``medium``/``thick``)
============================  ==========================================================================

A metric that is undefined on the split (one class only, no known label) is left out, never sent as
NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lungvl_model.evaluation.classification_metrics import expected_calibration_error, roc_auc

__all__ = ["LUNG_RADS_4A", "site_risk_metrics"]

#: Index of category 4A in ``LUNG_RADS_CLASSES`` (1, 2, 3, 4A, 4B, 4X): ">= 4A" means index >= 3.
LUNG_RADS_4A = 3


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    if y.size == 0:
        return None
    auc = roc_auc(y.astype(bool), p)
    return None if math.isnan(auc) else auc


def site_risk_metrics(
    *,
    malignant: Sequence[float],
    malignancy_prob: Sequence[float],
    lung_rads_true: Sequence[int],
    lung_rads_pred: Sequence[int],
    concepts_true: np.ndarray | None = None,
    concepts_pred: np.ndarray | None = None,
    groups: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """The site-level risk-head metrics of the table in the module docstring.

    Args:
        malignant: ``(N,)`` 1/0 labels, NaN when unknown.
        malignancy_prob: ``(N,)`` predicted probabilities.
        lung_rads_true: ``(N,)`` category indices, -1 when unknown.
        lung_rads_pred: ``(N,)`` predicted category indices.
        concepts_true: ``(N, K)`` binary concept labels, NaN when unknown.
        concepts_pred: ``(N, K)`` predicted 0/1.
        groups: ``(N,)`` slice-thickness group of each study (None: unknown).

    Returns:
        name -> value for the metrics defined on this split.

    Raises:
        ValueError: arrays of different lengths.
    """
    y = np.asarray(malignant, dtype=float)
    p = np.asarray(malignancy_prob, dtype=float)
    lt, lp = np.asarray(lung_rads_true, dtype=int), np.asarray(lung_rads_pred, dtype=int)
    n = y.shape[0]
    if p.shape != (n,) or lt.shape != (n,) or lp.shape != (n,) or (groups is not None and len(groups) != n):
        raise ValueError(
            f"site_risk_metrics: arrays must all have length {n}, got malignancy_prob {p.shape}, lung_rads_true "
            f"{lt.shape}, lung_rads_pred {lp.shape}, groups {None if groups is None else len(groups)}"
        )
    out: dict[str, float] = {}
    known = ~np.isnan(y)
    if (auc := _auc(y[known], p[known])) is not None:
        out["val_auc"] = auc
    if known.any():
        out["val_ece"] = expected_calibration_error(y[known].astype(bool), np.clip(p[known], 0.0, 1.0))
    lr_known = lt >= 0
    pos, pred_pos = lr_known & (lt >= LUNG_RADS_4A), lp >= LUNG_RADS_4A
    if pos.any():
        out["val_sensitivity"] = float((pos & pred_pos).sum() / pos.sum())
    neg = lr_known & (lt < LUNG_RADS_4A)
    if neg.any():
        out["val_specificity"] = float((neg & ~pred_pos).sum() / neg.sum())
    if concepts_true is not None and concepts_pred is not None:
        ct, cp = np.asarray(concepts_true, dtype=float), np.asarray(concepts_pred, dtype=float)
        if ct.shape != cp.shape or ct.shape[:1] != (n,):
            raise ValueError(f"concepts_true {ct.shape} and concepts_pred {cp.shape} must both be ({n}, K)")
        m = ~np.isnan(ct)
        tp = float(((ct == 1) & (cp == 1) & m).sum())
        fp = float(((ct == 0) & (cp == 1) & m).sum())
        fn = float(((ct == 1) & (cp == 0) & m).sum())
        if tp + fp + fn > 0:
            out["val_concept_f1"] = 2 * tp / (2 * tp + fp + fn)
    if groups is not None:
        g = np.asarray([x or "" for x in groups])
        for name in sorted({x for x in groups if x}):
            sel = known & (g == name)
            if (auc := _auc(y[sel], p[sel])) is not None:
                out[f"val_auc_{name}"] = auc
    return out

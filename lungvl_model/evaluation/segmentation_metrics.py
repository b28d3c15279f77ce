"""Nodule segmentation and detection metrics (pure numpy; MONAI for the surface distance).

- :func:`dice`: overlap of two boolean masks.
- :func:`found_nodule_dice`: per reference nodule (connected component) that the prediction touches,
  the Dice of that nodule against the predicted components touching it; and how many were found.
- :func:`hd95`: 95th-percentile symmetric Hausdorff distance in millimetres (MONAI).
- :func:`match_detections` / :func:`detection_summary`: hit-radius matching of predicted nodule
  centroids to reference nodules, summarised as sensitivity and false positives per scan.

All volumes are ``(D, H, W)`` (z, y, x) and spacings ``(sz, sy, sx)`` in mm, the order used by
:class:`lungvl_model.data.volume.CTVolume`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "DetectionMatch",
    "FoundNodules",
    "detection_summary",
    "dice",
    "found_nodule_dice",
    "hd95",
    "match_detections",
]


def _as_mask(name: str, mask: np.ndarray) -> np.ndarray:
    """Check that ``mask`` is a 3-D boolean (or 0/1) array and return it as ``bool``."""
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (D, H, W) mask, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(
                f"{name} must be boolean or contain only 0/1 (threshold probabilities first), "
                f"got values {values[:5].tolist()}{'...' if values.size > 5 else ''}"
            )
    return arr.astype(bool, copy=False)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, r = _as_mask("pred", pred), _as_mask("ref", ref)
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}")
    return p, r


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient ``2|P ∩ R| / (|P| + |R|)`` of two masks.

    Args:
        pred: ``(D, H, W)`` predicted mask, boolean or 0/1.
        ref: ``(D, H, W)`` reference mask, same shape.

    Returns:
        Dice in ``[0, 1]``; ``1.0`` when both masks are empty (agreement that there is nothing),
        ``0.0`` when exactly one is empty.

    Raises:
        ValueError: if a mask is not 3-D, is not boolean/0-1, or the shapes differ.
    """
    p, r = _check_pair(pred, ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


class FoundNodules(NamedTuple):
    """What :func:`found_nodule_dice` measured on one volume.

    Attributes:
        dices: one Dice per found reference nodule, in component order.
        found: reference nodules the prediction touches.
        total: reference nodules (26-connected components of the reference mask).
    """

    dices: list[float]
    found: int
    total: int


def found_nodule_dice(pred: np.ndarray, ref: np.ndarray) -> FoundNodules:
    """Segmentation quality on the nodules a model found, separate from whether it found them.

    Each 26-connected component of ``ref`` is a reference nodule; it is *found* when a predicted voxel
    lies in it. Its Dice is computed between the nodule and the union of the predicted components that
    touch it (so over-segmentation into a vessel counts against it, a false positive elsewhere does
    not). Whole-volume Dice mixes the two questions and rewards empty predictions on nodule-free scans.

    Args:
        pred: ``(D, H, W)`` predicted mask, boolean or 0/1.
        ref: ``(D, H, W)`` reference mask, same shape.

    Returns:
        The per-nodule Dice of the found nodules, the number found and the number of reference nodules.

    Raises:
        ValueError: as :func:`dice`.
    """
    from scipy import ndimage

    p, r = _check_pair(pred, ref)
    full = np.ones((3, 3, 3), dtype=bool)
    ref_lab, total = ndimage.label(r, structure=full)
    if total == 0:
        return FoundNodules([], 0, 0)
    pred_lab, _ = ndimage.label(p, structure=full)
    dices: list[float] = []
    for k in range(1, total + 1):
        nodule = ref_lab == k
        touching = np.unique(pred_lab[nodule & p])
        if touching.size == 0:
            continue
        segment = np.isin(pred_lab, touching)
        dices.append(2.0 * int(np.logical_and(segment, nodule).sum()) / (int(segment.sum()) + int(nodule.sum())))
    return FoundNodules(dices, len(dices), int(total))


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite values (sz, sy, sx) in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm.

    Computed with MONAI's ``compute_hausdorff_distance(percentile=95, spacing=spacing)``: the
    surface of a mask is its foreground voxels that touch the background (MONAI's edge
    extraction), distances are Euclidean between voxel centres scaled by ``spacing``, and the
    result is ``max(P95(d(pred → ref)), P95(d(ref → pred)))`` (the maximum of the two *directed*
    95th percentiles, as in MONAI and nnU-Net evaluations; some tools instead take the percentile of
    the pooled distances, which can be slightly smaller).

    Args:
        pred: ``(D, H, W)`` predicted mask, boolean or 0/1.
        ref: ``(D, H, W)`` reference mask, same shape.
        spacing: ``(sz, sy, sx)`` voxel spacing in mm.

    Returns:
        The distance in mm (MONAI computes in float32, so about 7 significant digits); ``0.0`` for
        identical non-empty masks. ``NaN`` when either mask is
        empty: the distance is undefined, and a finite penalty (for example the image diagonal)
        would depend on the field of view, so callers must decide how to aggregate such cases
        (typically report them separately or count them as detection misses).

    Raises:
        ValueError: on invalid masks (see :func:`dice`) or spacing.
    """
    p, r = _check_pair(pred, ref)
    sp = _check_spacing(spacing)
    if not p.any() or not r.any():
        return float("nan")
    # Imported here: ``import monai`` takes seconds and the other metrics (used by the server and
    # the CLI summaries) do not need it.
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # Empty masks are handled above; MONAI 1.6 also warns about an argument it passes itself.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            p[None, None], r[None, None], include_background=True, percentile=95, spacing=list(sp)
        )
    return float(value.reshape(-1)[0])


class DetectionMatch(NamedTuple):
    """Result of :func:`match_detections` for one scan.

    Attributes:
        tp: predictions matched to a reference nodule.
        fp: unmatched predictions (including duplicates of an already matched nodule).
        fn: reference nodules left unmatched.
        pairs: ``(pred_index, ref_index)`` of each match, sorted by ``pred_index``.
    """

    tp: int
    fp: int
    fn: int
    pairs: list[tuple[int, int]]


def _as_points(name: str, points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) (z, y, x in mm), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr[~np.isfinite(arr).all(axis=1)][:3].tolist()}")
    return arr


def match_detections(
    pred_centroids_mm: np.ndarray | Sequence[Sequence[float]],
    ref_centroids_mm: np.ndarray | Sequence[Sequence[float]],
    ref_diameters_mm: np.ndarray | Sequence[float],
    *,
    radius_factor: float = 0.5,
    min_radius_mm: float = 5.0,
) -> DetectionMatch:
    """Match predicted nodule centroids to reference nodules one-to-one.

    A prediction *can* hit reference nodule ``j`` when its distance to the centroid of ``j`` is at
    most ``max(min_radius_mm, radius_factor * ref_diameters_mm[j])`` (inclusive; with the default
    ``radius_factor=0.5`` the hit region is the nodule's sphere, widened to 5 mm for small ones).
    Among all such candidate pairs, the closest pair is matched first, then the next closest pair
    whose prediction and reference are both still free, and so on (greedy nearest; ties broken by
    prediction index, then reference index). Predictions left over (e.g. a second prediction on an
    already matched nodule) are false positives.

    Args:
        pred_centroids_mm: ``(P, 3)`` predicted centroids in mm (world or voxel-times-spacing
            coordinates, the same frame as the references). ``P`` may be 0.
        ref_centroids_mm: ``(R, 3)`` reference centroids in mm. ``R`` may be 0.
        ref_diameters_mm: ``(R,)`` reference diameters in mm (>= 0).
        radius_factor: hit radius as a fraction of the reference diameter (>= 0).
        min_radius_mm: smallest hit radius in mm (>= 0).

    Returns:
        A :class:`DetectionMatch` ``(tp, fp, fn, pairs)``; it unpacks like a tuple.

    Raises:
        ValueError: on malformed arrays, a diameter count that differs from ``R``, negative or
            non-finite diameters, or a negative ``radius_factor`` / ``min_radius_mm``.
    """
    if not (math.isfinite(radius_factor) and radius_factor >= 0):
        raise ValueError(f"radius_factor must be finite and >= 0, got {radius_factor}")
    if not (math.isfinite(min_radius_mm) and min_radius_mm >= 0):
        raise ValueError(f"min_radius_mm must be finite and >= 0, got {min_radius_mm}")
    pred = _as_points("pred_centroids_mm", pred_centroids_mm)
    ref = _as_points("ref_centroids_mm", ref_centroids_mm)
    diam = np.asarray(ref_diameters_mm, dtype=float).reshape(-1)
    if diam.shape[0] != ref.shape[0]:
        raise ValueError(f"ref_diameters_mm must have one value per reference ({ref.shape[0]}), got {diam.shape[0]}")
    if not (np.isfinite(diam).all() and (diam >= 0).all()):
        raise ValueError(f"ref_diameters_mm must be finite and >= 0, got {diam.tolist()}")

    radius = np.maximum(min_radius_mm, radius_factor * diam)  # (R,)
    dist = np.linalg.norm(pred[:, None, :] - ref[None, :, :], axis=-1)  # (P, R)
    cand_p, cand_r = np.nonzero(dist <= radius[None, :])
    # np.nonzero is row-major, so a stable sort on distance breaks ties by (pred, ref) index.
    order = np.argsort(dist[cand_p, cand_r], kind="stable")
    pred_free = np.ones(pred.shape[0], dtype=bool)
    ref_free = np.ones(ref.shape[0], dtype=bool)
    pairs: list[tuple[int, int]] = []
    for k in order:
        i, j = int(cand_p[k]), int(cand_r[k])
        if pred_free[i] and ref_free[j]:
            pred_free[i] = ref_free[j] = False
            pairs.append((i, j))
    pairs.sort()
    tp = len(pairs)
    return DetectionMatch(tp=tp, fp=pred.shape[0] - tp, fn=ref.shape[0] - tp, pairs=pairs)


def detection_summary(per_scan: Sequence[DetectionMatch | Sequence[int]]) -> dict[str, float]:
    """Pool per-scan detection matches into sensitivity and false positives per scan.

    Args:
        per_scan: one :class:`DetectionMatch` (or any sequence starting with ``tp, fp, fn``) per
            evaluated scan, including scans with neither predictions nor references.

    Returns:
        ``{"sensitivity", "fp_per_scan", "n_ref", "n_pred", "n_tp", "n_scans"}``. ``sensitivity``
        is pooled over nodules (``sum tp / sum (tp + fn)``) and ``NaN`` when there is no reference
        nodule; ``fp_per_scan`` is ``sum fp / n_scans``. Counts are ``int``.

    Raises:
        ValueError: if ``per_scan`` is empty or a count is negative.
    """
    if len(per_scan) == 0:
        raise ValueError("per_scan must contain at least one scan, got 0")
    tp = fp = fn = 0
    for k, item in enumerate(per_scan):
        t, f, n = (int(v) for v in tuple(item)[:3])
        if min(t, f, n) < 0:
            raise ValueError(f"per_scan[{k}] has a negative count: tp={t}, fp={f}, fn={n}")
        tp, fp, fn = tp + t, fp + f, fn + n
    n_ref = tp + fn
    return {
        "sensitivity": tp / n_ref if n_ref else float("nan"),
        "fp_per_scan": fp / len(per_scan),
        "n_ref": n_ref,
        "n_pred": tp + fp,
        "n_tp": tp,
        "n_scans": len(per_scan),
    }

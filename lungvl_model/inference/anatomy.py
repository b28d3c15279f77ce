"""Classical anatomy on the native CT for the explanation pipeline: lungs, emphysema, lobe, pleura.

These run on any chest CT (real exports have no lobe maps): a threshold lung mask, the LAA-950
emphysema index, a positional lobe estimate (documented heuristic, used when no lobe map exists)
and a juxtapleural test.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lungvl_model.data.volume import CTVolume

#: LAA-950 fraction above which emphysema is reported (a common research threshold).
EMPHYSEMA_LAA = 0.06


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Both lungs (airways included) as a boolean ``(Z, Y, X)`` mask.

    Voxels below −400 HU that are not connected to the air outside the body (touching the in-plane
    border of any slice), the two largest components kept, small holes (vessels, nodules) closed.
    """
    low = hu < -400
    lab, n = ndimage.label(low)
    if n == 0:
        return np.zeros_like(low)
    border = np.unique(
        np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    )
    sizes = ndimage.sum_labels(low, lab, index=np.arange(1, n + 1))
    sizes[border[border > 0] - 1] = 0
    keep = [int(i) + 1 for i in np.argsort(-sizes)[:2] if sizes[i] > 0.002 * low.size]
    mask = np.isin(lab, keep)
    closed = np.zeros_like(mask)
    for z in range(mask.shape[0]):  # fill nodules/vessels slice by slice
        closed[z] = ndimage.binary_fill_holes(ndimage.binary_closing(mask[z], iterations=3))
    return closed


def emphysema_index(hu: np.ndarray, lungs: np.ndarray) -> float:
    """Fraction of lung voxels below −950 HU (LAA-950); NaN without lungs."""
    n = int(lungs.sum())
    return float((hu[lungs] < -950).sum() / n) if n else float("nan")


def lobe_from_position(volume: CTVolume, centroid_zyx: np.ndarray, lungs: np.ndarray) -> str:
    """Heuristic lobe of a point from its position in the lungs (no lobe segmentation available).

    Side from LPS x (positive = patient left); level from the fraction of the lung's cranio-caudal
    extent: right lung upper third → RUL, middle third → RML if anterior else RLL, lower third → RLL;
    left lung upper half → LUL, lower half → LLL.

    Args:
        volume: the CT (for geometry).
        centroid_zyx: voxel position ``(z, y, x)``.
        lungs: lung mask of the volume.

    Returns:
        A lobe code.
    """
    lps = volume.voxel_to_lps(np.asarray(centroid_zyx, dtype=float))
    zs = np.nonzero(lungs.any(axis=(1, 2)))[0]
    if len(zs) == 0:
        return "RUL" if lps[0] < 0 else "LUL"
    z_mm = np.array([volume.voxel_to_lps([z, 0, 0])[2] for z in (zs.min(), zs.max())])
    top, bottom = z_mm.max(), z_mm.min()
    frac = (top - lps[2]) / max(top - bottom, 1e-6)  # 0 at apex, 1 at base
    if lps[0] < 0:  # patient right
        if frac < 1 / 3:
            return "RUL"
        if frac < 2 / 3:
            ys = np.nonzero(lungs[int(round(centroid_zyx[0]))].any(axis=1))[0]
            mid = (ys.min() + ys.max()) / 2 if len(ys) else centroid_zyx[1]
            anterior = (
                volume.voxel_to_lps([centroid_zyx[0], centroid_zyx[1], centroid_zyx[2]])[1]
                < volume.voxel_to_lps([centroid_zyx[0], mid, centroid_zyx[2]])[1]
            )
            return "RML" if anterior else "RLL"
        return "RLL"
    return "LUL" if frac < 0.5 else "LLL"


def is_juxtapleural(
    nodule: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float], mm: float = 2.0
) -> bool:
    """True when the nodule lies within ``mm`` of the chest wall / mediastinum (outside the lungs).

    Args:
        nodule: ``(Z, Y, X)`` nodule mask.
        lungs: ``(Z, Y, X)`` lung mask (the nodule need not be inside it).
        spacing: voxel size in mm.
        mm: distance tolerance.
    """
    if not nodule.any():
        return False
    idx = np.nonzero(nodule)
    margin = [int(np.ceil((mm + 3 * s) / s)) + 1 for s in spacing]
    box = tuple(
        slice(max(0, int(i.min()) - m), min(n, int(i.max()) + m + 1))
        for i, m, n in zip(idx, margin, nodule.shape, strict=True)
    )
    nod, lung = nodule[box], lungs[box]
    outside = ~(lung | nod)
    if not outside.any():
        return False
    dist = ndimage.distance_transform_edt(~outside, sampling=spacing)
    return bool(dist[nod].min() <= mm + max(spacing))

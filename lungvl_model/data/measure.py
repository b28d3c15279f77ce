"""Nodule measurements from a binary mask: Lung-RADS/Brock conventions.

Axial diameters are measured on the slice where the nodule's longest in-plane diameter is largest:
the long axis is the maximum Feret diameter of the slice's region, the short axis its largest
extent perpendicular to the long axis on the same slice, and the mean diameter is (long + short)/2
(Lung-RADS v2022). Distances are between pixel centres plus one pixel width, so that a single pixel
measures one pixel across.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

#: HU above which voxels of a subsolid nodule count as its solid component.
SOLID_COMPONENT_HU = -300.0


@dataclass(frozen=True)
class NoduleMeasurement:
    """Size of one nodule.

    Attributes:
        centroid_zyx: centroid in (fractional) voxel indices ``(z, y, x)``.
        longest_diameter_mm: longest axial diameter.
        short_axis_mm: longest diameter perpendicular to it on the same slice.
        mean_diameter_mm: ``(long + short) / 2``.
        volume_mm3: voxel count times voxel volume.
        slice_index: the axial slice the diameters were measured on.
        n_voxels: voxels in the mask.
    """

    centroid_zyx: tuple[float, float, float]
    longest_diameter_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_mm3: float
    slice_index: int
    n_voxels: int

    def to_dict(self) -> dict[str, object]:
        """Plain dict."""
        return asdict(self)


def _axes_2d(points_mm: np.ndarray, pixel_mm: float) -> tuple[float, float]:
    """Long and perpendicular short axis of a 2-D point set (pixel centres in mm)."""
    if len(points_mm) == 1:
        return pixel_mm, pixel_mm
    try:
        hull = points_mm[ConvexHull(points_mm).vertices]
    except (QhullError, ValueError):  # collinear or too few points
        hull = points_mm
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    long_axis = float(d[i, j])
    if long_axis == 0:
        return pixel_mm, pixel_mm
    u = (hull[j] - hull[i]) / long_axis
    perp = np.array([-u[1], u[0]])
    proj = points_mm @ perp
    short_axis = float(proj.max() - proj.min())
    return long_axis + pixel_mm, short_axis + pixel_mm


def measure_nodule(mask: np.ndarray, spacing: tuple[float, float, float]) -> NoduleMeasurement:
    """Measure one nodule.

    Args:
        mask: ``(Z, Y, X)`` boolean mask of the nodule.
        spacing: ``(sz, sy, sx)`` in mm.

    Returns:
        The measurement.

    Raises:
        ValueError: when the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("cannot measure an empty nodule mask")
    sz, sy, sx = spacing
    zz, yy, xx = np.nonzero(mask)
    centroid = (float(zz.mean()), float(yy.mean()), float(xx.mean()))
    pixel_mm = float((sy + sx) / 2)
    best = (-1.0, 0.0, 0)
    for z in np.unique(zz):
        sl = mask[z]
        edge = sl & ~ndimage.binary_erosion(sl)
        ys, xs = np.nonzero(edge)
        pts = np.stack([ys * sy, xs * sx], axis=1).astype(np.float64)
        long_ax, short_ax = _axes_2d(pts, pixel_mm)
        if long_ax > best[0]:
            best = (long_ax, short_ax, int(z))
    long_ax, short_ax, z_best = best
    return NoduleMeasurement(
        centroid_zyx=centroid,
        longest_diameter_mm=round(long_ax, 2),
        short_axis_mm=round(short_ax, 2),
        mean_diameter_mm=round((long_ax + short_ax) / 2, 2),
        volume_mm3=round(n * sz * sy * sx, 1),
        slice_index=z_best,
        n_voxels=n,
    )


def solid_component_mm(
    hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], threshold: float = SOLID_COMPONENT_HU
) -> float:
    """Mean axial diameter of the solid part of a nodule (voxels above ``threshold`` HU), 0 if none.

    Args:
        hu: ``(Z, Y, X)`` Hounsfield units.
        mask: ``(Z, Y, X)`` nodule mask.
        spacing: ``(sz, sy, sx)`` mm.
        threshold: HU threshold of the solid component.
    """
    solid = np.asarray(mask, bool) & (hu > threshold)
    if not solid.any():
        return 0.0
    lab, n = ndimage.label(solid)
    sizes = ndimage.sum_labels(solid, lab, index=np.arange(1, n + 1))
    largest = lab == (int(np.argmax(sizes)) + 1)
    return measure_nodule(largest, spacing).mean_diameter_mm


def equivalent_sphere_diameter(volume_mm3: float) -> float:
    """Diameter (mm) of the sphere of the given volume."""
    return float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0))


def connected_nodules(mask: np.ndarray, min_voxels: int = 1) -> list[np.ndarray]:
    """Split a binary mask into 26-connected components, largest first.

    Args:
        mask: ``(Z, Y, X)`` binary mask.
        min_voxels: drop components smaller than this.

    Returns:
        One boolean ``(Z, Y, X)`` mask per component.
    """
    lab, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    sizes = ndimage.sum_labels(lab > 0, lab, index=np.arange(1, n + 1))
    order = [int(i) + 1 for i in np.argsort(-sizes) if sizes[i] >= min_voxels]
    return [lab == k for k in order]

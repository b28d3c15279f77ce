"""A fixed, documented feature vector of one refined nodule candidate (pure numpy/scipy, all in mm).

The candidate filter (:mod:`lungvl_model.inference.candidate_filter`) scores these features to reject
the anatomy that the coarse triage mistakes for nodules: vessels (tubes that continue beyond the
refined mask), the pleura, mediastinum, heart border and diaphragm (soft tissue on one side), bone and
contrast-enhanced blood (dense, outside the lungs). Every length is in mm and every volume in mm3, so
slice thickness does not change the features beyond partial volume.

Features (:data:`FEATURE_NAMES`, in this order):

size
    ``equiv_diameter_mm``: diameter of the sphere of the mask's volume; ``log_volume_mm3``: ``log(1 + V)``.
shape
    ``sphericity``: ``pi^(1/3) (6V)^(2/3) / A`` with ``A`` the voxel-face surface area times 2/3 (a
    surface with isotropically distributed normals has a face-counted area 3/2 of its true area, so a
    digital ball scores ~1); ``elongation`` ``sqrt(l1 / l2)`` and ``flatness`` ``sqrt(l2 / l3)`` from
    the eigenvalues ``l1 >= l2 >= l3`` of the covariance (inertia) of the voxel positions in mm.
intensity
    ``hu_mean``, ``hu_std``, ``hu_p10``, ``hu_p90`` inside the mask; ``shell_contrast_hu``: mean
    inside minus mean of a shell ``shell_mm`` thick around it.
context
    ``shell_lung_fraction`` (shell voxels < ``lung_hu``, aerated), ``shell_soft_fraction`` (shell voxels
    >= ``soft_hu``: soft tissue, blood, bone); ``lung_distance_mm``: signed distance of the centroid to
    the lung-mask boundary (positive inside the lungs, clipped to ``+-context_mm``);
    ``inside_lung_fraction``: fraction of the mask inside the lung mask.
tubularity
    ``blobness``: mean over the mask of ``|h1| / sqrt(|h2 h3|)`` (Hessian eigenvalues ``|h1| <= |h2| <=
    |h3|`` of the smoothed HU at the candidate's scale ``sigma = max(d_eq / 4, min_sigma_mm)``, Frangi's
    R_B, capped at 1: 1 at a ball's centre and ~0.4 averaged over a 12 mm ball, ~0 for a tube or a
    plate, 0 where the voxel is not a bright structure); ``cut_fraction``: fraction of the mask's outer
    1-voxel boundary that is dense (>= ``soft_hu``), i.e. where the refinement cut the object off a
    larger structure (a vessel, the chest wall); ``border_fraction``: fraction of the mask's voxels on
    the faces of its own crop (a tube that leaves the crop).
triage
    ``triage_probability``: the coarse model's maximum probability over the candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

FEATURE_NAMES: tuple[str, ...] = (
    "equiv_diameter_mm",
    "log_volume_mm3",
    "sphericity",
    "elongation",
    "flatness",
    "hu_mean",
    "hu_std",
    "hu_p10",
    "hu_p90",
    "shell_contrast_hu",
    "shell_lung_fraction",
    "shell_soft_fraction",
    "lung_distance_mm",
    "inside_lung_fraction",
    "blobness",
    "cut_fraction",
    "border_fraction",
    "triage_probability",
)
"""Names of the features, in the order of :func:`candidate_features`' vector."""


@dataclass(frozen=True)
class FeatureConfig:
    """How candidate features are computed.

    Attributes:
        shell_mm: thickness of the shell around the mask for contrast and context fractions.
        lung_hu: shell voxels below this HU count as aerated lung.
        soft_hu: voxels at or above this HU count as soft tissue (vessel wall, pleura, heart, bone).
        context_mm: the lung distance is computed in a box of this half-size and clipped to it.
        min_sigma_mm: smallest Hessian scale (mm).
    """

    shell_mm: float = 3.0
    lung_hu: float = -600.0
    soft_hu: float = -300.0
    context_mm: float = 20.0
    min_sigma_mm: float = 1.0

    def __post_init__(self) -> None:
        for key in ("shell_mm", "context_mm", "min_sigma_mm"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise ValueError(f"FeatureConfig.{key} must be a positive number, got {v!r}")
        if not self.lung_hu < self.soft_hu:
            raise ValueError(f"FeatureConfig.lung_hu must be below soft_hu, got {self.lung_hu!r} >= {self.soft_hu!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def _box(
    offset: tuple[int, int, int], shape: tuple[int, ...], pad: np.ndarray, full: tuple[int, ...]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of the mask crop padded by ``pad`` voxels (clipped to ``full``) and the mask's offset in it."""
    lo = np.maximum(np.asarray(offset) - pad, 0)
    hi = np.minimum(np.asarray(offset) + np.asarray(shape) + pad, full)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), np.asarray(offset) - lo


def surface_area_mm2(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Voxel-face surface area (mm2) of a ``(Z, Y, X)`` bool mask (faces between in and out, array border = out)."""
    m = np.pad(np.asarray(mask, bool), 1)
    sz, sy, sx = spacing
    faces = (
        np.count_nonzero(m[1:] != m[:-1]) * sy * sx
        + np.count_nonzero(m[:, 1:] != m[:, :-1]) * sz * sx
        + np.count_nonzero(m[:, :, 1:] != m[:, :, :-1]) * sz * sy
    )
    return float(faces)


def shape_features(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float, float, float]:
    """Equivalent diameter, sphericity, elongation and flatness of a ``(Z, Y, X)`` mask.

    Returns:
        ``(equiv_diameter_mm, sphericity, elongation, flatness)``; see the module docstring.
    """
    n = int(np.count_nonzero(mask))
    vol = n * float(np.prod(spacing))
    d_eq = float((6.0 * vol / np.pi) ** (1.0 / 3.0))
    area = surface_area_mm2(mask, spacing) * (2.0 / 3.0)
    spher = float(np.pi ** (1.0 / 3.0) * (6.0 * vol) ** (2.0 / 3.0) / area) if area > 0 else 0.0
    pts = np.argwhere(mask) * np.asarray(spacing)
    vox_var = np.asarray(spacing) ** 2 / 12.0  # a voxel's own extent, so one voxel is not a point
    cov = np.cov(pts.T, bias=True) if n > 1 else np.zeros((3, 3))
    ev = np.sort(np.linalg.eigvalsh(cov + np.diag(vox_var)))[::-1]
    ev = np.maximum(ev, 1e-9)
    return d_eq, spher, float(np.sqrt(ev[0] / ev[1])), float(np.sqrt(ev[1] / ev[2]))


def blobness(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float) -> float:
    """Mean Frangi R_B ``|h1| / sqrt(|h2 h3|)`` over ``mask`` where the structure is bright (``h2, h3 < 0``).

    Args:
        hu: ``(Z, Y, X)`` HU with context around the mask (>= 3 sigma where possible).
        mask: ``(Z, Y, X)`` bool, same shape.
        spacing: voxel size mm.
        sigma_mm: Gaussian scale of the Hessian.

    Returns:
        In ``[0, 1]``: ~0.4 for a ball (1 at its centre), ~0 for a tube or a plate; 0 for voxels that
        are not bright.
    """
    sig = [sigma_mm / s for s in spacing]
    img = hu.astype(np.float32)
    h = np.empty(mask.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            d = ndimage.gaussian_filter(img, sig, order=order, mode="nearest") / (spacing[i] * spacing[j])
            h[..., i, j] = d
            h[..., j, i] = d
    ev = np.linalg.eigvalsh(h[mask].astype(np.float64))  # (N, 3)
    ev = np.take_along_axis(ev, np.argsort(np.abs(ev), axis=1), axis=1)
    bright = (ev[:, 1] < 0) & (ev[:, 2] < 0)
    rb = np.abs(ev[:, 0]) / np.sqrt(np.abs(ev[:, 1] * ev[:, 2]) + 1e-12)
    return float(np.mean(np.where(bright, np.minimum(rb, 1.0), 0.0))) if len(ev) else 0.0


def candidate_features(
    hu_volume: np.ndarray,
    spacing: tuple[float, float, float],
    mask: np.ndarray,
    offset: tuple[int, int, int],
    lungs: np.ndarray,
    triage_probability: float,
    config: FeatureConfig | None = None,
) -> np.ndarray:
    """The feature vector of one refined candidate.

    Args:
        hu_volume: ``(Z, Y, X)`` HU of the whole CT (``CTVolume.hu``).
        spacing: voxel size ``(sz, sy, sx)`` mm.
        mask: ``(dz, dy, dx)`` bool mask crop (from ``refine_candidate``).
        offset: the crop's ``(z, y, x)`` offset in the CT.
        lungs: ``(Z, Y, X)`` lung mask (:func:`~lungvl_model.inference.anatomy.lung_mask`).
        triage_probability: the triage's maximum probability over the candidate.
        config: parameters (defaults when None).

    Returns:
        ``(F,)`` float64, ``F = len(FEATURE_NAMES)``.

    Raises:
        ValueError: empty mask, or ``lungs`` / ``hu_volume`` of different shapes.
    """
    cfg = config or FeatureConfig()
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("candidate_features: the mask is empty")
    if lungs.shape != hu_volume.shape:
        raise ValueError(f"candidate_features: lungs has shape {lungs.shape}, the CT has {hu_volume.shape}")
    sp = np.asarray(spacing, float)
    d_eq, spher, elong, flat = shape_features(mask, spacing)
    sigma = max(d_eq / 4.0, cfg.min_sigma_mm)  # a ball of radius r: Hessian scale ~ r / 2
    pad = np.ceil(np.maximum(cfg.shell_mm, 3.0 * sigma) / sp).astype(int) + 1
    box, rel = _box(offset, mask.shape, pad, hu_volume.shape)
    hu = np.asarray(hu_volume[box], np.float32)
    lung = np.asarray(lungs[box], bool)
    m = np.zeros(hu.shape, bool)
    m[tuple(slice(int(r), int(r) + n) for r, n in zip(rel, mask.shape, strict=True))] = mask
    vals = hu[m].astype(np.float64)
    shell = (ndimage.distance_transform_edt(~m, sampling=spacing) <= cfg.shell_mm) & ~m
    sv = hu[shell].astype(np.float64)
    ring = ndimage.binary_dilation(m, ndimage.generate_binary_structure(3, 1)) & ~m
    # signed centroid distance to the lung boundary in a local box
    c = np.argwhere(mask).mean(axis=0) + np.asarray(offset)
    cpad = np.ceil(cfg.context_mm / sp).astype(int) + 1
    ci = np.rint(c).astype(int)
    cbox, crel = _box((int(ci[0]), int(ci[1]), int(ci[2])), (1, 1, 1), cpad, hu_volume.shape)
    local = np.asarray(lungs[cbox], bool)
    p = tuple(int(v) for v in crel)
    if local[p]:
        dist = float(ndimage.distance_transform_edt(local, sampling=spacing)[p]) if not local.all() else cfg.context_mm
    else:
        dist = -float(ndimage.distance_transform_edt(~local, sampling=spacing)[p]) if local.any() else -cfg.context_mm
    face = np.zeros(mask.shape, bool)  # the crop's six faces
    face[[0, -1], :, :] = True
    face[:, [0, -1], :] = True
    face[:, :, [0, -1]] = True
    return np.array(
        [
            d_eq,
            float(np.log1p(vals.size * np.prod(sp))),
            spher,
            elong,
            flat,
            float(vals.mean()),
            float(vals.std()),
            float(np.percentile(vals, 10)),
            float(np.percentile(vals, 90)),
            float(vals.mean() - (sv.mean() if sv.size else vals.mean())),
            float(np.mean(sv < cfg.lung_hu)) if sv.size else 0.0,
            float(np.mean(sv >= cfg.soft_hu)) if sv.size else 0.0,
            float(np.clip(dist, -cfg.context_mm, cfg.context_mm)),
            float(np.mean(lung[m])),
            blobness(hu, m, spacing, sigma),
            float(np.mean(hu[ring] >= cfg.soft_hu)) if ring.any() else 0.0,
            float(np.count_nonzero(mask & face) / np.count_nonzero(mask)),
            float(triage_probability),
        ],
        dtype=np.float64,
    )

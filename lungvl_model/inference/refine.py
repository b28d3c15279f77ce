"""Native-resolution nodule refinement that stays on the nodule (adaptive threshold, no leaks).

The triage pass proposes a candidate on the model's coarse grid (5 mm voxels); this module turns the
native CT around it into a nodule mask:

1. **Adaptive threshold.** ``threshold = background + fraction * (core - background)`` (half-way for
   ``fraction = 0.5``), at least the lung's noise floor (``background + noise_k * noise``) and clipped
   to ``threshold_bounds_hu``. ``background`` is the median (smoothed) HU of the aerated lung around
   the candidate and ``noise`` its robust standard deviation; ``core`` is the 75th percentile of the
   candidate's voxels above the noise floor (the nodule's robust intensity; a high percentile of all
   candidate voxels would be lung for a small nodule in a 5 mm candidate). A -650 HU ground-glass
   nodule in -870 HU lung gets -760 HU and a faint -760 HU one -815 HU, which the old fixed -750 HU
   threshold cut to a third (tests/lungvl_model/test_refine.py); the lower bound -835 HU stays above
   parenchyma (-950..-850 HU). The upper bound -500 HU (halfway would be ~-415 HU for a solid nodule)
   matches the LIDC readers, who draw the partial-volume rim: on LIDC-IDRI-0001 the bound -450 / -500 /
   -550 HU gave 0.85 / 0.91 / 0.98 of the consensus volume; on the synthetic cohort (truth = half
   occupancy) -450 and -500 HU gave the same Dice.
2. **No pleural leak.** The region is restricted to the lung mask closed with a ball of the
   candidate's equivalent-sphere radius (bounded, :func:`lung_envelope`): the closing fills the dent
   that a juxtapleural nodule makes in the lung surface, so the nodule stays whole, while the chest wall
   beyond the lung's convex envelope stays out.
3. **No vessel leak.** The component is the one under the candidate's centre; its core is the central
   candidate voxel farthest from aerated lung (its distance ``r`` is the inscribed radius, also for a
   juxtapleural nodule since the envelope's cut is not a boundary). The nodule is kept within
   ``reach_factor * r`` of the core (cuts vessels as thick as a small nodule), then opened with a ball
   of ``min(opening_fraction * r, opening_max_mm)`` (cuts thinner vessels), and the opening's rounded-off
   boundary given back within that radius.
4. **No partial-volume blow-up on thick slices.** A nodule no wider than two slices whose peak is blurred
   below solid density (a 4 mm nodule on 5 mm slices peaks near -450 HU, so the halfway threshold drops
   to ~-650 HU and takes its blur, the parenchyma and vessel stubs next to it: 2-8x its volume) keeps only
   its densest voxels, 1.5 times the voxel count that its HU integral implies (:func:`partial_volume_cap`;
   the blur conserves the integral, and no threshold separates the nodule's partially filled voxels from
   its blur).

Measured (candidate = the reference mask downsampled to the 5 mm grid, as the triage would give it):

* LIDC-IDRI-0001, the four readers' consensus 33.5 x 27.4 mm, 7,764 mm3: fixed -750 HU 41.5 x 34.4 mm,
  13,594 mm3 (1.75x, Dice 0.72, into the pleura); this module 31.4 x 29.8 mm, 7,086 mm3 (0.91x, Dice 0.90).
* Synthetic screening site (16 studies + 6 priors, matrix 160 = 2 mm pixels, 41 nodule instances),
  median Dice / median volume ratio, fixed -750 HU -> this module: solid 0.51 / 2.8 -> 0.86 / 1.20,
  juxtapleural solid 0.07 / 28.7 -> 0.80 / 1.25, non-solid 0.43 / 2.6 -> 0.87 / 1.10, part-solid
  (2) 0.20 / 9.0 -> 0.47 / 1.85; with the candidate dilated by one model voxel (a sloppier triage),
  all types 0.02 / 24.6 -> 0.80 / 1.32.
* Step 4, synthetic screening + referral + low-resource sites (150 nodules; candidate = the labelled mask
  on the 5 mm grid), median volume ratio / Dice, 5 mm slices: 6-10 mm 1.67 / 0.71 -> 1.17 / 0.75 (ratio
  > 2: 6 -> 3 of 21), > 10 mm 1.12 / 0.87 unchanged, < 6 mm 2.9 -> 1.5 (the 8 of 14 found before and
  after; ratio > 2: 6 -> 3; one voxel is 20 mm3, 25-50 % of these nodules). 1-3 mm slices, ground glass,
  part-solid and LIDC-IDRI-0001 (5,614 mm3 with and without the cap) are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class RefineConfig:
    """How a candidate is refined on the native CT.

    Attributes:
        contrast_fraction: threshold position between the lung background (0) and the core (1).
        threshold_bounds_hu: ``(low, high)`` clip of the adaptive threshold.
        core_percentile: percentile, over the candidate's voxels denser than the noise floor, of the
            smoothed HU taken as the core intensity.
        noise_k: the threshold is at least ``background + noise_k * noise`` (noise: the robust standard
            deviation of the smoothed lung around the candidate), so lung noise never connects up.
        min_contrast_hu: smallest margin of that floor above the background.
        smooth_sigma_mm: Gaussian smoothing (mm) before thresholding (noise on ground glass).
        default_background_hu: lung background when no lung voxel surrounds the candidate.
        lung_hu: HU below which a voxel counts as aerated lung (background estimate).
        closing_bounds_mm: ``(min, max)`` radius of the lung-mask closing.
        opening_fraction: vessel-cutting opening radius as a fraction of the inscribed radius.
        opening_max_mm: largest opening radius.
        core_fraction: the candidate's centre (within this fraction of its equivalent radius of its
            centroid) picks the component and the core: a vessel at the candidate's edge is not taken.
        reach_factor: the nodule is kept within ``reach_factor`` times its inscribed radius (plus one
            voxel) of its core, the candidate voxel farthest from aerated lung (0: no limit); this cuts
            vessels as thick as a small nodule, which the opening cannot.
        regrow_fraction: after the opening, voxels of the thresholded object within this fraction of the
            opening radius of the opened object are given back (boundary detail; vessels are cut there).
        pv_tissue_hu: attenuation of solid nodule tissue, the full-occupancy level of the partial-volume
            cap (:func:`partial_volume_cap`); the object's own peak when denser (calcium).
        pv_cap_factor: a small object on thick slices keeps at most this many times its partial-volume
            voxel count (its densest voxels); 0 disables the cap.
        pv_min_slice_mm: the cap applies on slices at least this thick.
        pv_max_diameter_slices: ... and to objects whose equivalent diameter is at most this many slice
            thicknesses (larger nodules have a plateau at their true density; ground glass stays whole).
        pv_min_peak_hu: ... whose smoothed peak is at least this dense: ground glass (-750..-550 HU) is
            not capped (a small one at -564 HU on 5 mm slices was cut to a third at -600 HU).
    """

    contrast_fraction: float = 0.5
    threshold_bounds_hu: tuple[float, float] = (-835.0, -500.0)
    core_percentile: float = 75.0
    noise_k: float = 2.5
    min_contrast_hu: float = 30.0
    smooth_sigma_mm: float = 0.5
    default_background_hu: float = -870.0
    lung_hu: float = -600.0
    closing_bounds_mm: tuple[float, float] = (3.0, 20.0)
    opening_fraction: float = 0.5
    opening_max_mm: float = 3.0
    regrow_fraction: float = 1.0
    reach_factor: float = 2.0
    core_fraction: float = 0.5
    pv_tissue_hu: float = 0.0
    pv_cap_factor: float = 1.5
    pv_min_slice_mm: float = 2.5
    pv_max_diameter_slices: float = 2.0
    pv_min_peak_hu: float = -550.0

    def __post_init__(self) -> None:
        if not 0.0 < self.contrast_fraction < 1.0:
            raise ValueError(f"RefineConfig.contrast_fraction must be in (0, 1), got {self.contrast_fraction!r}")
        lo, hi = self.threshold_bounds_hu
        if not lo < hi:
            raise ValueError(f"RefineConfig.threshold_bounds_hu must be (low, high), low < high, got {(lo, hi)!r}")
        if not 0.0 <= self.core_percentile <= 100.0:
            raise ValueError(f"RefineConfig.core_percentile must be in [0, 100], got {self.core_percentile!r}")
        if self.smooth_sigma_mm < 0:
            raise ValueError(f"RefineConfig.smooth_sigma_mm must be >= 0, got {self.smooth_sigma_mm!r}")
        c0, c1 = self.closing_bounds_mm
        if not 0.0 <= c0 <= c1:
            raise ValueError(f"RefineConfig.closing_bounds_mm must be 0 <= min <= max, got {(c0, c1)!r}")
        if not 0.0 <= self.opening_fraction < 1.0:
            raise ValueError(f"RefineConfig.opening_fraction must be in [0, 1), got {self.opening_fraction!r}")
        if self.opening_max_mm < 0:
            raise ValueError(f"RefineConfig.opening_max_mm must be >= 0, got {self.opening_max_mm!r}")
        if self.noise_k < 0:
            raise ValueError(f"RefineConfig.noise_k must be >= 0, got {self.noise_k!r}")
        if self.min_contrast_hu < 0:
            raise ValueError(f"RefineConfig.min_contrast_hu must be >= 0, got {self.min_contrast_hu!r}")
        if not 0.0 < self.core_fraction <= 1.0:
            raise ValueError(f"RefineConfig.core_fraction must be in (0, 1], got {self.core_fraction!r}")
        if self.reach_factor < 0:
            raise ValueError(f"RefineConfig.reach_factor must be >= 0, got {self.reach_factor!r}")
        if self.regrow_fraction < 0:
            raise ValueError(f"RefineConfig.regrow_fraction must be >= 0, got {self.regrow_fraction!r}")
        if self.pv_cap_factor != 0 and self.pv_cap_factor < 1.0:
            raise ValueError(f"RefineConfig.pv_cap_factor must be 0 (off) or >= 1, got {self.pv_cap_factor!r}")
        if self.pv_min_slice_mm < 0:
            raise ValueError(f"RefineConfig.pv_min_slice_mm must be >= 0, got {self.pv_min_slice_mm!r}")
        if self.pv_max_diameter_slices <= 0:
            raise ValueError(f"RefineConfig.pv_max_diameter_slices must be > 0, got {self.pv_max_diameter_slices!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def adaptive_threshold(core_hu: float, background_hu: float, config: RefineConfig) -> float:
    """HU threshold between a candidate's core and its lung background.

    Args:
        core_hu: robust intensity of the candidate.
        background_hu: lung background around it.
        config: fraction and bounds.

    Returns:
        ``clip(background + fraction * (core - background), low, high)``.
    """
    lo, hi = config.threshold_bounds_hu
    thr = background_hu + config.contrast_fraction * (core_hu - background_hu)
    return float(np.clip(thr, lo, hi))


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean dilation by a ball of ``radius_mm`` (anisotropic voxels); ``(Z, Y, X)`` bool."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return np.asarray(ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm)


def erode_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean erosion by a ball of ``radius_mm``; the array border is not treated as background."""
    if radius_mm <= 0 or mask.all():
        return mask.copy()
    return np.asarray(ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm)


def close_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Morphological closing by a ball of ``radius_mm``."""
    return erode_mm(dilate_mm(mask, radius_mm, spacing), radius_mm, spacing)


def open_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Morphological opening by a ball of ``radius_mm`` (result is a subset of ``mask``)."""
    return np.asarray(dilate_mm(erode_mm(mask, radius_mm, spacing), radius_mm, spacing) & mask)


def equivalent_radius_mm(n_voxels: int, spacing: tuple[float, ...]) -> float:
    """Radius (mm) of the sphere with the volume of ``n_voxels`` voxels of size ``spacing``."""
    return float((3.0 * n_voxels * float(np.prod(spacing)) / (4.0 * np.pi)) ** (1.0 / 3.0))


def _core_seed(
    obj: np.ndarray, up: np.ndarray, envelope: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[tuple[int, int, int], float]:
    """The candidate voxel of ``obj`` farthest from aerated lung, and that distance (mm).

    The distance is to lung inside the envelope only (the envelope's cut through a juxtapleural nodule
    is not a boundary), so it is the nodule's inscribed radius whether or not it touches the pleura.
    """
    air = envelope & ~obj
    if not air.any():
        idx = np.argwhere(obj & up)
        return tuple(int(v) for v in idx[len(idx) // 2]), float("inf")  # type: ignore[return-value]
    dist = ndimage.distance_transform_edt(~air, sampling=spacing)
    score = np.where(obj & up, dist, -1.0)
    seed = np.unravel_index(int(np.argmax(score)), obj.shape)
    return (int(seed[0]), int(seed[1]), int(seed[2])), float(dist[seed])


def _central(up: np.ndarray, spacing: tuple[float, float, float], fraction: float) -> np.ndarray:
    """The part of ``up`` within ``fraction`` of its equivalent radius (at least 1.5 voxels) of its centroid."""
    c = np.argwhere(up).mean(axis=0)
    r = max(fraction * equivalent_radius_mm(int(up.sum()), spacing), 1.5 * float(max(spacing)))
    axes = [(np.arange(n) - ci) * s for n, ci, s in zip(up.shape, c, spacing, strict=True)]
    zz, yy, xx = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    return np.asarray(up & (zz**2 + yy**2 + xx**2 <= r**2))


def _point(shape: tuple[int, ...], p: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[p] = True
    return out


def _within(
    shape: tuple[int, ...], centre: tuple[int, int, int], radius_mm: float, spacing: tuple[float, float, float]
) -> np.ndarray:
    """``(Z, Y, X)`` bool ball of ``radius_mm`` around voxel ``centre``."""
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing, strict=True)]
    zz, yy, xx = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    return np.asarray(zz**2 + yy**2 + xx**2 <= radius_mm**2)


def _best_overlap(region: np.ndarray, seed: np.ndarray) -> np.ndarray | None:
    """The 26-connected component of ``region`` with the most voxels in ``seed`` (None if none)."""
    lab, n = ndimage.label(region, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return None
    hits = np.bincount(lab[seed & region], minlength=n + 1)[1:]
    if hits.max() == 0:
        return None
    return np.asarray(lab == int(np.argmax(hits)) + 1)


def closing_radius_mm(n_voxels: int, spacing: tuple[float, ...], config: RefineConfig) -> float:
    """Radius of the lung closing for a candidate of ``n_voxels`` voxels: its equivalent-sphere radius, bounded."""
    c0, c1 = config.closing_bounds_mm
    return float(np.clip(equivalent_radius_mm(n_voxels, spacing), c0, c1))


def lung_envelope(lungs: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """The lung mask closed by a ball: juxtapleural nodules inside, chest wall and mediastinum outside.

    Args:
        lungs: ``(Z, Y, X)`` lung mask with at least ``radius_mm`` of context around the region of interest.
        radius_mm: closing radius (about the nodule's radius: the dent it makes in the lung surface).
        spacing: voxel size ``(sz, sy, sx)`` mm.

    Returns:
        ``(Z, Y, X)`` bool envelope.
    """
    return close_mm(np.asarray(lungs, bool), radius_mm, spacing)


def refine_mask(
    hu: np.ndarray,
    up: np.ndarray,
    envelope: np.ndarray,
    allowed: np.ndarray,
    spacing: tuple[float, float, float],
    config: RefineConfig | None = None,
) -> np.ndarray | None:
    """Nodule mask of one candidate on a native-resolution crop.

    Args:
        hu: ``(Z, Y, X)`` HU crop.
        up: ``(Z, Y, X)`` candidate upsampled to the crop.
        envelope: ``(Z, Y, X)`` closed lung mask of the crop (:func:`lung_envelope`).
        allowed: ``(Z, Y, X)`` where the nodule may lie (the candidate plus a margin).
        spacing: voxel size ``(sz, sy, sx)`` mm.
        config: parameters (defaults when None).

    Returns:
        ``(Z, Y, X)`` bool mask, or None when nothing denser than the lung's noise overlaps the candidate.

    Raises:
        ValueError: when the arrays' shapes differ.
    """
    cfg = config or RefineConfig()
    for name, arr in (("up", up), ("envelope", envelope), ("allowed", allowed)):
        if arr.shape != hu.shape:
            raise ValueError(f"refine_mask: {name} has shape {arr.shape}, hu has {hu.shape}")
    if not up.any():
        return None
    sigma = [cfg.smooth_sigma_mm / s for s in spacing]
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), sigma) if cfg.smooth_sigma_mm > 0 else hu
    around = envelope & ~dilate_mm(up, 2.0 * float(max(spacing)), spacing) & (hu < cfg.lung_hu)
    if around.sum() >= 20:
        lung_vals = smooth[around]
        background = float(np.median(lung_vals))
        noise = 1.4826 * float(np.median(np.abs(lung_vals - background)))
    else:
        background, noise = cfg.default_background_hu, 0.0
    floor = background + max(cfg.noise_k * noise, cfg.min_contrast_hu)
    inside = smooth[up & envelope]
    tissue = inside[inside > floor]
    if tissue.size == 0:
        return None
    core = float(np.percentile(tissue, cfg.core_percentile))
    thr = max(adaptive_threshold(core, background, cfg), floor)
    region = (smooth > thr) & envelope & allowed
    centre = _central(up, spacing, cfg.core_fraction)
    obj = _best_overlap(region, centre)
    if obj is None:
        obj = _best_overlap(region, up)
    if obj is None:
        return None
    seed, inscribed = _core_seed(obj, centre if (obj & centre).any() else up, envelope, spacing)
    if cfg.reach_factor > 0 and np.isfinite(inscribed):
        reach = cfg.reach_factor * inscribed + float(max(spacing))
        near = _best_overlap(obj & _within(obj.shape, seed, reach, spacing), _point(obj.shape, seed))
        obj = obj if near is None else near
    if not np.isfinite(inscribed):
        inscribed = float(ndimage.distance_transform_edt(obj, sampling=spacing).max())
    r_open = min(cfg.opening_fraction * inscribed, cfg.opening_max_mm)
    if r_open > 0.5 * float(min(spacing)):
        opened = _best_overlap(open_mm(obj, r_open, spacing), up)
        if opened is not None:  # give back the boundary the opening rounded off; vessels stay cut
            obj = obj & dilate_mm(opened, cfg.regrow_fraction * r_open, spacing)
            obj = _best_overlap(obj, opened) if cfg.regrow_fraction > 0 else opened
    return None if obj is None else partial_volume_cap(obj, smooth, background, spacing, cfg)


def partial_volume_cap(
    obj: np.ndarray,
    smooth: np.ndarray,
    background_hu: float,
    spacing: tuple[float, float, float],
    config: RefineConfig,
) -> np.ndarray:
    """Shrink a small nodule on thick slices to (a multiple of) its partial-volume size.

    A nodule about as small as the slice is thick is blurred over its slice and its neighbours: a 4 mm
    solid nodule on 5 mm slices peaks near -450 HU, so the halfway threshold (-650 HU) takes its whole
    blur and the denser parenchyma next to it, ~3x its volume, and no threshold separates the two (the
    blur is as dense as the nodule's own partially filled voxels). The blur conserves the HU integral,
    so ``sum(min((HU - background) / (tissue - background), 1))`` over the object is its occupied voxel
    count (an underestimate: the fainter tail of the blur is outside); the object keeps its densest
    ``pv_cap_factor`` times that many voxels (connected to its peak).

    Args:
        obj: ``(Z, Y, X)`` bool thresholded nodule.
        smooth: ``(Z, Y, X)`` smoothed HU.
        background_hu: lung background around the nodule.
        spacing: voxel size ``(sz, sy, sx)`` mm.
        config: ``pv_*`` parameters.

    Returns:
        ``(Z, Y, X)`` bool, a subset of ``obj`` (``obj`` itself when the cap does not apply).
    """
    cfg = config
    if cfg.pv_cap_factor == 0 or spacing[0] < cfg.pv_min_slice_mm or not obj.any():
        return obj
    if 2.0 * equivalent_radius_mm(int(obj.sum()), spacing) > cfg.pv_max_diameter_slices * spacing[0]:
        return obj
    vals = smooth[obj]
    peak = float(vals.max())
    if peak < cfg.pv_min_peak_hu:
        return obj
    tissue = max(cfg.pv_tissue_hu, peak)
    if tissue <= background_hu:
        return obj
    occupied = float(np.minimum((vals - background_hu) / (tissue - background_hu), 1.0).sum())
    n_keep = max(int(round(cfg.pv_cap_factor * occupied)), 1)
    if vals.size <= n_keep:
        return obj
    level = float(np.sort(vals)[::-1][n_keep - 1])
    kept = _best_overlap(obj & (smooth >= level), obj & (smooth >= peak))
    return obj if kept is None else kept

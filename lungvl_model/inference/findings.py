"""From a low-resolution nodule probability map to measured findings on the native CT.

Adaptive resolution: the model segments the whole chest on its coarse input grid (the triage pass);
each candidate is then analysed at the CT's native resolution: :func:`refine_candidate` segments the
nodule around the upsampled candidate (adaptive threshold, kept inside the lung and off attached
vessels: :mod:`lungvl_model.inference.refine`), :func:`measure_finding` measures it with the
Lung-RADS/Brock conventions of :mod:`lungvl_model.data.measure`, and :func:`suppress_duplicates`
removes findings that two triage components refined onto the same nodule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from lungvl_model.data.measure import SOLID_COMPONENT_HU, connected_nodules, measure_nodule
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.refine import RefineConfig, closing_radius_mm, lung_envelope, refine_mask

#: HU above which a voxel counts as calcified.
CALCIUM_HU = 200.0
#: Share of a nodule's voxels above ``CALCIUM_HU`` that makes it calcified (diffuse calcification).
CALCIFIED_FRACTION = 0.1
#: Robust peak (mean of the densest few voxels) above which a nodule is calcified (central calcification:
#: an eighth of the volume; soft tissue plus noise stays below ~250 HU).
CALCIUM_PEAK_HU = 300.0
#: Rim allowance of the solid/part-solid decision, in pixels (see :func:`classify_attenuation`).
RIM_TOLERANCE_PX = 1.0
#: Aerated lung (background estimate) is below this HU.
LUNG_HU = -400.0
#: Lung background when no aerated voxel surrounds the nodule.
DEFAULT_LUNG_HU = -870.0
#: Outer radius (mm) of the shell around the nodule where the background is taken.
BACKGROUND_SHELL_MM = 4.0
#: Peak contrast kept per unit of (nodule size / slice thickness), see :func:`peak_fraction`.
PARTIAL_VOLUME_SLOPE = 0.45
#: Smallest partial-volume fraction assumed (bounds the noise amplification of the correction).
MIN_PEAK_FRACTION = 0.35


@dataclass(frozen=True)
class GridMap:
    """Index mapping between the model's resampled grid and the source CT.

    Attributes:
        src_spacing: source voxel size ``(sz, sy, sx)`` mm.
        dst_spacing: model grid voxel size mm.
        start: model grid voxel (0, 0, 0) in resampled-grid indices (crop offset).
    """

    src_spacing: tuple[float, float, float]
    dst_spacing: tuple[float, float, float]
    start: tuple[float, float, float]

    @classmethod
    def from_origin(cls, volume: CTVolume, dst_spacing: tuple[float, ...], origin_zyx_mm: tuple[float, ...]) -> GridMap:
        """Build from :class:`~lungvl_model.data.preprocess.Preprocessed` fields."""
        start = tuple(o / d for o, d in zip(origin_zyx_mm, dst_spacing, strict=True))
        return cls(volume.spacing, tuple(dst_spacing), start)  # type: ignore[arg-type]

    def model_to_src(self, g: np.ndarray) -> np.ndarray:
        """Model-grid indices ``(..., 3)`` → source voxel indices."""
        return (np.asarray(g, float) + self.start) * np.asarray(self.dst_spacing) / np.asarray(self.src_spacing)

    def src_to_model(self, s: np.ndarray) -> np.ndarray:
        """Source voxel indices ``(..., 3)`` → model-grid indices."""
        return np.asarray(s, float) * np.asarray(self.src_spacing) / np.asarray(self.dst_spacing) - self.start


@dataclass
class Finding:
    """One measured nodule.

    Attributes mirror the labels.csv nodule columns; ``mask``/``offset`` hold the native-resolution
    mask crop (not serialised). ``model_probability`` is the maximum probability of the candidate's
    proposer over it (the coarse triage map, or the fine detector's map for a fine candidate);
    ``nodule_probability`` the candidate filter's score (:mod:`lungvl_model.inference.candidate_filter`),
    None when no filter ran; ``malignancy_probability`` the nodule-level risk head's
    (:mod:`lungvl_model.models.nodule_risk`), None when the checkpoint has none.
    """

    centroid_zyx: tuple[float, float, float]
    centroid_lps: tuple[float, float, float]
    longest_diameter_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_mm3: float
    solid_component_mm: float
    type: str
    calcified: bool
    juxtapleural: bool = False
    lobe: str = ""
    model_probability: float = 0.0
    nodule_probability: float | None = None
    malignancy_probability: float | None = None
    index: int = 0
    brock_probability: float | None = None
    lung_rads: str = ""
    context: str = "baseline"
    prior_mean_diameter_mm: float | None = None
    growth_mm: float | None = None
    risk_score: float = 0.0
    notes: list[str] = field(default_factory=list)
    offset: tuple[int, int, int] = (0, 0, 0)
    mask: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the mask)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("mask", "offset")}
        d["centroid_zyx"] = [round(float(v), 2) for v in self.centroid_zyx]
        d["centroid_lps"] = [round(float(v), 2) for v in self.centroid_lps]
        return d

    def full_mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The nodule mask on the whole source grid."""
        out = np.zeros(shape, bool)
        if self.mask is not None:
            z, y, x = self.offset
            dz, dy, dx = self.mask.shape
            out[z : z + dz, y : y + dy, x : x + dx] = self.mask
        return out


def candidates(prob: np.ndarray, threshold: float = 0.5, max_candidates: int = 10) -> list[tuple[np.ndarray, float]]:
    """Connected components of ``prob > threshold`` on the model grid, largest first.

    Args:
        prob: ``(D, H, W)`` nodule probability.
        threshold: probability threshold.
        max_candidates: keep at most this many.

    Returns:
        ``[(mask (D, H, W) bool, max probability)]``.
    """
    comps = connected_nodules(prob > threshold)[:max_candidates]
    return [(c, float(prob[c].max())) for c in comps]


def candidate_points(
    volume: CTVolume, prob: np.ndarray, grid: GridMap, threshold: float, max_candidates: int = 100
) -> list[tuple[tuple[float, float, float], float]]:
    """Every triage candidate as ``(centroid LPS mm, max probability)``, for FROC sweeps.

    Args:
        volume: the source CT (geometry).
        prob: ``(D, H, W)`` nodule probability on the model grid.
        grid: index mapping.
        threshold: probability above which voxels form candidates (26-connected components).
        max_candidates: keep at most this many (largest first).

    Returns:
        One ``((x, y, z) LPS, score)`` per component; the centroid is probability-weighted.
    """
    out: list[tuple[tuple[float, float, float], float]] = []
    for comp, score in candidates(prob, threshold, max_candidates):
        idx = np.argwhere(comp).astype(float)
        w = prob[comp].astype(float)
        g = (idx * w[:, None]).sum(0) / max(float(w.sum()), 1e-12)
        lps = volume.voxel_to_lps(grid.model_to_src(g))
        out.append(((float(lps[0]), float(lps[1]), float(lps[2])), score))
    return out


def _centroid_in(f: Finding, other: Finding) -> bool:
    """True when ``f``'s centroid lies inside ``other``'s extent (its mask, or its longest-diameter sphere)."""
    if other.mask is None or f.mask is None:
        d = float(np.linalg.norm(np.asarray(f.centroid_lps) - np.asarray(other.centroid_lps)))
        return d <= other.longest_diameter_mm / 2
    v = np.rint(np.asarray(f.centroid_zyx) - np.asarray(other.offset)).astype(int)
    if np.any(v < 0) or np.any(v >= other.mask.shape):
        return False
    return bool(other.mask[v[0], v[1], v[2]])


def _mask_overlap(a: Finding, b: Finding) -> float:
    """``|A ∩ B| / min(|A|, |B|)`` of two findings' mask crops on the source grid (0 without masks)."""
    if a.mask is None or b.mask is None or not a.mask.any() or not b.mask.any():
        return 0.0
    lo = np.maximum(a.offset, b.offset)
    hi = np.minimum(np.add(a.offset, a.mask.shape), np.add(b.offset, b.mask.shape))
    if np.any(hi <= lo):
        return 0.0
    sa = tuple(slice(int(p - o), int(q - o)) for p, q, o in zip(lo, hi, a.offset, strict=True))
    sb = tuple(slice(int(p - o), int(q - o)) for p, q, o in zip(lo, hi, b.offset, strict=True))
    inter = int((a.mask[sa] & b.mask[sb]).sum())
    return inter / min(int(a.mask.sum()), int(b.mask.sum()))


def suppress_duplicates(
    findings: Sequence[Finding], scores: Sequence[float] | None = None, max_overlap: float = 0.5
) -> list[Finding]:
    """3-D non-maximum suppression of measured findings.

    Findings are visited by decreasing score (ties: input order); one is dropped when its centroid lies
    inside a kept (higher-scored) finding's extent (its mask; without masks, the sphere of its longest
    diameter), or when the two masks overlap by more than ``max_overlap`` of the smaller one (which also
    drops a low-scored finding that swallows a kept one).

    Args:
        findings: measured findings (masks and offsets on the same source grid).
        scores: one score per finding (default: ``model_probability``).
        max_overlap: overlap fraction (of the smaller mask) above which two findings are duplicates.

    Returns:
        The kept findings, by decreasing score.

    Raises:
        ValueError: when ``scores`` and ``findings`` differ in length or ``max_overlap`` is not in [0, 1].
    """
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"suppress_duplicates: max_overlap must be in [0, 1], got {max_overlap!r}")
    sc = [f.model_probability for f in findings] if scores is None else [float(s) for s in scores]
    if len(sc) != len(findings):
        raise ValueError(f"suppress_duplicates: {len(sc)} scores for {len(findings)} findings")
    kept: list[Finding] = []
    for i in sorted(range(len(findings)), key=lambda k: -sc[k]):
        f = findings[i]
        if any(_centroid_in(f, k) or _mask_overlap(f, k) > max_overlap for k in kept):
            continue
        kept.append(f)
    return kept


def union_mask(parts: Sequence[Finding]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The union of findings' mask crops (same source grid) as one crop: ``(mask, offset)``.

    Raises:
        ValueError: no finding, or one without a mask.
    """
    if not parts or any(f.mask is None for f in parts):
        raise ValueError("union_mask: needs findings that all have masks")
    lo = np.min([f.offset for f in parts], axis=0)
    hi = np.max([np.add(f.offset, f.mask.shape) for f in parts if f.mask is not None], axis=0)
    out = np.zeros(tuple(int(v) for v in hi - lo), bool)
    for f in parts:
        assert f.mask is not None
        s = tuple(slice(int(o - b), int(o - b) + n) for o, b, n in zip(f.offset, lo, f.mask.shape, strict=True))
        out[s] |= f.mask
    return out, (int(lo[0]), int(lo[1]), int(lo[2]))


def merge_duplicates(
    kept: Sequence[Finding], measured: Sequence[Finding], volume: CTVolume, max_overlap: float = 0.5
) -> list[Finding]:
    """Measure each kept finding on the union of its own mask and its suppressed duplicates' masks.

    Two proposals refined onto one nodule (the coarse triage's and the fine detector's) are each bounded
    by their proposal's box plus a margin, so each may cut off a different part of a large nodule
    (LIDC-IDRI-0001's 25 mm nodule: 0.91 and 0.86 of the readers' volume). A suppressed finding is a
    duplicate of the first (highest-scored) kept one whose mask it overlaps by more than ``max_overlap``
    of the smaller mask (the centroid-inside rule of :func:`suppress_duplicates` alone, e.g. a short vessel
    segment beside a nodule, does not merge). The merged finding keeps the kept one's proposer probability
    and filter score; its measurements (and mask) come from the union.

    Args:
        kept: findings kept by :func:`suppress_duplicates`, by decreasing score.
        measured: every measured finding (kept and suppressed).
        volume: the source CT.
        max_overlap: as :func:`suppress_duplicates`.

    Returns:
        The kept findings, in the same order, re-measured where they had duplicates.
    """
    ids = {id(f) for f in kept}
    extra: list[list[Finding]] = [[] for _ in kept]
    for g in measured:
        if id(g) in ids:
            continue
        for i, f in enumerate(kept):
            if _mask_overlap(f, g) > max_overlap:
                extra[i].append(g)
                break
    out = []
    for f, dups in zip(kept, extra, strict=True):
        if not dups or f.mask is None or any(g.mask is None for g in dups):
            out.append(f)
            continue
        mask, offset = union_mask([f, *dups])
        merged = measure_finding(volume, mask, offset, f.model_probability)
        merged.nodule_probability = f.nodule_probability
        out.append(merged)
    return out


def classify_attenuation(mean_mm: float, solid_mm: float, tolerance_mm: float = 0.0) -> str:
    """Nodule type from its solid-component size (≥ 80 % solid, < 20 % or < 1.5 mm non-solid).

    Args:
        mean_mm: mean diameter of the whole nodule (mm).
        solid_mm: mean diameter of its solid component (mm).
        tolerance_mm: partial-volume rim allowance: a solid component within ``tolerance_mm`` of 80 % of
            the nodule still counts as solid (the solid-component threshold sits inside the nodule's
            blurred edge, so a solid nodule's solid part measures about one pixel less than the nodule).

    Returns:
        ``solid``, ``part_solid`` or ``non_solid``.
    """
    if solid_mm + tolerance_mm >= 0.8 * mean_mm:
        return "solid"
    if solid_mm < max(1.5, 0.2 * mean_mm):
        return "non_solid"
    return "part_solid"


def refine_candidate(
    volume: CTVolume,
    cand: np.ndarray,
    grid: GridMap,
    margin_mm: float | None = None,
    *,
    lungs: np.ndarray | None = None,
    config: RefineConfig | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """Native-resolution nodule mask for one model-grid candidate (see :mod:`lungvl_model.inference.refine`).

    Args:
        volume: the source CT.
        cand: ``(D, H, W)`` candidate mask on the model grid.
        grid: index mapping.
        margin_mm: how far (mm) beyond the upsampled candidate the nodule may extend (default: one
            model voxel).
        lungs: ``(Z, Y, X)`` lung mask of the whole CT (:func:`~lungvl_model.inference.anatomy.lung_mask`);
            None: aerated voxels (< -400 HU, holes filled per slice) around the candidate.
        config: refinement parameters.

    Returns:
        ``(mask crop, crop offset (z, y, x))`` or None when nothing of the candidate is inside the CT or
        nothing denser than the lung around it overlaps it.

    Raises:
        ValueError: when ``lungs`` does not have the CT's shape.
    """
    cfg = config or RefineConfig()
    if lungs is not None and lungs.shape != volume.shape:
        raise ValueError(f"refine_candidate: lungs has shape {lungs.shape}, the CT has {volume.shape}")
    spacing = volume.spacing
    margin = float(max(grid.dst_spacing)) if margin_mm is None else margin_mm
    idx = np.argwhere(cand)
    if len(idx) == 0:
        return None
    lo = np.floor(grid.model_to_src(idx.min(0) - 1)).astype(int)
    hi = np.ceil(grid.model_to_src(idx.max(0) + 2)).astype(int)
    pad = np.ceil(margin / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(lo - pad, 0)
    hi = np.minimum(hi + pad, volume.shape)
    if np.any(hi <= lo):
        return None
    zz, yy, xx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    g = np.rint(grid.src_to_model(np.stack([zz, yy, xx], -1))).astype(int)
    inside = np.all((g >= 0) & (g < cand.shape), axis=-1)
    up = np.zeros(zz.shape, bool)
    gi = g[inside]
    up[inside] = cand[gi[:, 0], gi[:, 1], gi[:, 2]]
    if not up.any():
        return None
    radius = closing_radius_mm(int(up.sum()), spacing, cfg)
    ctx = np.ceil(2 * radius / np.asarray(spacing)).astype(int) + 1  # the closing sees 2 radii around
    clo, chi = np.maximum(lo - ctx, 0), np.minimum(hi + ctx, volume.shape)
    outer = tuple(slice(int(a), int(b)) for a, b in zip(clo, chi, strict=True))
    inner = tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(lo, hi, clo, strict=True))
    if lungs is None:
        lung = np.stack([ndimage.binary_fill_holes(s) for s in volume.hu[outer] < -400])
    else:
        lung = lungs[outer]
    envelope = lung_envelope(lung, radius, spacing)[inner]
    allowed = ndimage.distance_transform_edt(~up, sampling=spacing) <= margin
    hu = volume.hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    mask = refine_mask(hu, up, envelope, allowed, spacing, cfg)
    if mask is None:
        return None
    return mask, (int(lo[0]), int(lo[1]), int(lo[2]))


@dataclass(frozen=True)
class Attenuation:
    """Intensity of a nodule against its lung background, corrected for partial volume.

    Attributes:
        background_hu: median HU of the aerated lung in a shell around the nodule.
        peak_hu: mean of the nodule's few densest voxels (a noise-robust maximum).
        peak_fraction: expected fraction of the true contrast the peak keeps (slice-thickness partial
            volume), in ``[MIN_PEAK_FRACTION, 1]``.
        corrected_peak_hu: ``background + (peak - background) / peak_fraction``, the nodule's densest
            tissue as it would read on thin slices.
    """

    background_hu: float
    peak_hu: float
    peak_fraction: float
    corrected_peak_hu: float


def peak_fraction(size_mm: float, slice_mm: float) -> float:
    """Expected fraction of a nodule's contrast kept at its densest voxel on slices ``slice_mm`` thick.

    A nodule about ``size_mm`` across in z shares its central slice with lung: averaged over the slice
    phase, the densest voxel keeps about ``PARTIAL_VOLUME_SLOPE * size / thickness`` of the contrast
    (measured on synthetic solid nodules: ~0.45 at size = thickness, ~0.65 at 1.5x, ~1 beyond 2.2x).

    Args:
        size_mm: the nodule's short axial axis (its z extent is not measurable on thick slices).
        slice_mm: slice spacing.

    Returns:
        The fraction, clipped to ``[MIN_PEAK_FRACTION, 1]``.
    """
    return float(np.clip(PARTIAL_VOLUME_SLOPE * size_mm / max(slice_mm, 1e-6), MIN_PEAK_FRACTION, 1.0))


def _peak(vals: np.ndarray) -> float:
    """Mean of the densest ``clip(n // 10, 1, 5)`` values: a maximum that one noisy voxel cannot set."""
    k = int(np.clip(vals.size // 10, 1, 5))
    return float(np.mean(np.partition(vals, vals.size - k)[vals.size - k :]))


def nodule_attenuation(
    hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], size_mm: float
) -> Attenuation:
    """Background, peak and partial-volume-corrected peak of a nodule.

    Args:
        hu: ``(Z, Y, X)`` HU of a window around the nodule (a few mm of lung on every side).
        mask: ``(Z, Y, X)`` nodule mask on the window (not empty).
        spacing: ``(sz, sy, sx)`` mm.
        size_mm: nodule size for the partial-volume model (its short axial axis).

    Returns:
        The attenuation.
    """
    near = ndimage.distance_transform_edt(~mask, sampling=spacing)
    outside = ~ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))
    shell = outside & (near <= BACKGROUND_SHELL_MM + max(spacing)) & (hu < LUNG_HU)
    bg = float(np.median(hu[shell])) if int(shell.sum()) >= 5 else DEFAULT_LUNG_HU
    peak = _peak(hu[mask].astype(np.float64))
    f = peak_fraction(size_mm, spacing[0])
    return Attenuation(bg, peak, f, bg + (peak - bg) / f)


def _mean_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Mean axial diameter of a mask, 0 when empty."""
    return measure_nodule(mask, spacing).mean_diameter_mm if mask.any() else 0.0


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component (empty stays empty)."""
    comps = connected_nodules(mask)
    return comps[0] if comps else mask


def _body(mask: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """The nodule without thin attached tails (vessels): in-plane opening, the solid part kept.

    Each slice is opened with a 3x3 square (removes structures at most two pixels wide, which an attached
    vessel is and a nodule's body is not); the component that holds the solid part (or the largest) is
    kept, with the solid part. A nodule that the opening would halve (a small one, a few pixels across)
    keeps its mask.
    """
    opened = np.stack([ndimage.binary_opening(s, structure=np.ones((3, 3), bool)) for s in mask])
    comps = connected_nodules(opened)
    if not comps:
        return mask
    body = max(comps, key=lambda c: (int((c & solid).sum()), int(c.sum())))
    body = body | solid
    return body if int(body.sum()) >= 0.5 * int(mask.sum()) else mask


def _half_peak_region(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The nodule at half its peak contrast: the labels' half-occupancy boundary of a solid nodule.

    Voxels of ``mask`` at or above ``background + 0.5 * (peak - background)``, the component holding the
    densest voxel, holes filled slice by slice; the whole mask when that leaves nothing.
    """
    att = nodule_attenuation(hu, mask, spacing, 0.0)
    half = att.background_hu + 0.5 * (att.peak_hu - att.background_hu)
    above = mask & (hu >= half)
    if not above.any():
        return mask
    comps = connected_nodules(above)
    peak_at = np.unravel_index(int(np.argmax(np.where(mask, hu, -np.inf))), hu.shape)
    region = next((c for c in comps if c[peak_at]), comps[0])
    return np.stack([ndimage.binary_fill_holes(s) for s in region]) & mask


def measure_finding(volume: CTVolume, mask: np.ndarray, offset: tuple[int, int, int], prob: float) -> Finding:
    """Measure a native-resolution nodule mask crop (Lung-RADS/Brock attributes).

    Steps (each mirrors how the synthetic labels and the LIDC consensus are defined):

    1. **Half-peak region** (:func:`_half_peak_region`): the mask's voxels above half the contrast
       between the lung background and the nodule's robust peak, the component holding the peak: the
       labels' half-occupancy boundary of a solid nodule (the refinement's threshold, up to -500 HU, sits
       lower, on the blurred rim, which made diameters ~1.15x too large).
    2. **Attenuation** (:func:`nodule_attenuation`, sized by the half-peak region): the peak corrected
       for slice-thickness partial volume (a 5 mm solid nodule on 5 mm slices peaks near -450 HU, like
       ground glass; corrected, it is soft tissue). A corrected peak below ``SOLID_COMPONENT_HU`` (-300)
       means no solid part: **non-solid**, measured on the body (step 3).
    3. **Body**: the refined mask without thin attached vessels (:func:`_body`). When the half-peak
       region is as large as the body (within 80 % and a one-pixel rim allowance, as
       :func:`classify_attenuation`), there is no ground glass around it: **solid**, measured on the
       half-peak region.
    4. Otherwise the **solid component** is the largest component above ``background + f *
       (SOLID_COMPONENT_HU - background)`` (the -300 HU convention scaled by the same partial-volume
       fraction ``f``), and the type follows from it and the body (usually **part-solid**).
    5. **Calcification** when ``CALCIFIED_FRACTION`` of the voxels exceed ``CALCIUM_HU`` or the robust
       peak exceeds ``CALCIUM_PEAK_HU`` (central calcification is an eighth of the volume, which the old
       15 % rule missed).

    Args:
        volume: the source CT.
        mask: ``(dz, dy, dx)`` refined nodule mask crop (not empty).
        offset: crop origin ``(z, y, x)`` in source voxels.
        prob: the triage probability, stored as ``model_probability``.

    Returns:
        The finding (``mask``/``offset`` are the input crop; the measured body may be smaller).
    """
    mask = np.asarray(mask, bool)
    spacing = volume.spacing
    pad = np.ceil((BACKGROUND_SHELL_MM + max(spacing)) / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(np.asarray(offset) - pad, 0)
    hi = np.minimum(np.asarray(offset) + mask.shape + pad, volume.shape)
    hu = volume.hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
    win = np.zeros(hu.shape, bool)
    s0 = np.asarray(offset) - lo
    win[s0[0] : s0[0] + mask.shape[0], s0[1] : s0[1] + mask.shape[1], s0[2] : s0[2] + mask.shape[2]] = mask
    core = _half_peak_region(hu, win, spacing)
    att = nodule_attenuation(hu, win, spacing, measure_nodule(core, spacing).short_axis_mm)
    solid_thr = att.background_hu + att.peak_fraction * (SOLID_COMPONENT_HU - att.background_hu)
    solid = _largest(win & (hu > solid_thr))
    body = _body(win, solid & core)
    m_body, m_core = measure_nodule(body, spacing), measure_nodule(core, spacing)
    pixel = RIM_TOLERANCE_PX * float(np.mean(spacing[1:]))
    if att.corrected_peak_hu < SOLID_COMPONENT_HU:
        typ, m, solid_mm = "non_solid", m_body, 0.0
    elif classify_attenuation(m_body.mean_diameter_mm, m_core.mean_diameter_mm, pixel) == "solid":
        typ, m = "solid", m_core  # no ground glass beyond the nodule's half-peak boundary
        solid_mm = m.mean_diameter_mm
    else:
        m = m_body
        glass = body & ~core
        if glass.any():  # the solid part ends half-way between the ground glass and the peak
            half_glass = 0.5 * (float(np.median(hu[glass])) + att.peak_hu)
            solid = _largest(win & (hu > max(solid_thr, half_glass)))
        solid_mm = min(_mean_mm(solid, spacing), m.mean_diameter_mm)
        typ = classify_attenuation(m.mean_diameter_mm, solid_mm, pixel)
        if typ == "solid":  # a solid part as large as the body: the body is the nodule
            solid_mm = m.mean_diameter_mm
    vals = hu[win]
    calcified = bool(np.mean(vals > CALCIUM_HU) >= CALCIFIED_FRACTION or att.peak_hu >= CALCIUM_PEAK_HU)
    cz, cy, cx = m.centroid_zyx
    centroid = (cz + float(lo[0]), cy + float(lo[1]), cx + float(lo[2]))
    return Finding(
        centroid_zyx=centroid,
        centroid_lps=tuple(float(v) for v in volume.voxel_to_lps(np.array(centroid))),  # type: ignore[arg-type]
        longest_diameter_mm=m.longest_diameter_mm,
        short_axis_mm=m.short_axis_mm,
        mean_diameter_mm=m.mean_diameter_mm,
        volume_mm3=m.volume_mm3,
        solid_component_mm=0.0 if typ == "non_solid" else solid_mm,
        type=typ,
        calcified=calcified,
        model_probability=prob,
        offset=offset,
        mask=mask,
    )


def match_prior(
    current: list[Finding], prior: list[Finding], shift_lps: np.ndarray, min_radius_mm: float = 10.0
) -> None:
    """Pair current findings with prior ones (nearest within max(10 mm, diameter)); sets growth/context.

    Args:
        current: findings of the current study (updated in place).
        prior: findings of the prior study.
        shift_lps: translation (mm) that maps prior LPS positions onto the current study.
        min_radius_mm: smallest matching radius.
    """
    used: set[int] = set()
    for f in current:
        best, best_d = None, np.inf
        for j, p in enumerate(prior):
            if j in used:
                continue
            d = float(np.linalg.norm(np.asarray(f.centroid_lps) - (np.asarray(p.centroid_lps) + shift_lps)))
            if d < best_d and d <= max(min_radius_mm, f.mean_diameter_mm):
                best, best_d = j, d
        if best is None:
            f.notes.append("not seen on the prior study")
            _set_context(f, None)
            continue
        used.add(best)
        p = prior[best]
        f.prior_mean_diameter_mm = p.mean_diameter_mm
        f.growth_mm = round(f.mean_diameter_mm - p.mean_diameter_mm, 2)
        _set_context(f, p.mean_diameter_mm)


def _set_context(f: Finding, prior_mean_mm: float | None) -> None:
    """Lung-RADS context from the prior; a measurement the rules refuse (e.g. > 300 mm) is noted, not fatal."""
    from lungvl_model.clinical.lung_rads import InvalidFieldError, context_from_prior

    try:
        f.context = context_from_prior(prior_mean_mm, f.mean_diameter_mm, True)
    except InvalidFieldError as e:
        f.notes.append(f"no comparison context: {e}")

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

from lungvl_model.data.measure import connected_nodules, measure_nodule, solid_component_mm
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.refine import RefineConfig, closing_radius_mm, lung_envelope, refine_mask

#: HU above which a voxel counts as calcified.
CALCIUM_HU = 200.0


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
    mask crop (not serialised). ``model_probability`` is the triage's maximum probability over the
    candidate; ``nodule_probability`` the candidate filter's score
    (:mod:`lungvl_model.inference.candidate_filter`), None when no filter ran.
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


def classify_attenuation(mean_mm: float, solid_mm: float) -> str:
    """Nodule type from its solid-component size (≥ 80 % solid, < 20 % or < 1.5 mm non-solid)."""
    if solid_mm >= 0.8 * mean_mm:
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


def measure_finding(volume: CTVolume, mask: np.ndarray, offset: tuple[int, int, int], prob: float) -> Finding:
    """Measure a native-resolution nodule mask crop."""
    m = measure_nodule(mask, volume.spacing)
    z0, y0, x0 = offset
    hu = volume.hu[z0 : z0 + mask.shape[0], y0 : y0 + mask.shape[1], x0 : x0 + mask.shape[2]]
    solid = solid_component_mm(hu, mask, volume.spacing)
    cz, cy, cx = m.centroid_zyx
    centroid = (cz + z0, cy + y0, cx + x0)
    vals = hu[mask]
    calcified = bool(vals.size and np.mean(vals > CALCIUM_HU) >= 0.15 and vals.max() >= 300)
    return Finding(
        centroid_zyx=centroid,
        centroid_lps=tuple(float(v) for v in volume.voxel_to_lps(np.array(centroid))),  # type: ignore[arg-type]
        longest_diameter_mm=m.longest_diameter_mm,
        short_axis_mm=m.short_axis_mm,
        mean_diameter_mm=m.mean_diameter_mm,
        volume_mm3=m.volume_mm3,
        solid_component_mm=solid,
        type=classify_attenuation(m.mean_diameter_mm, solid),
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

"""Hard-negative points of a synthetic study: where a nodule detector is tempted but no nodule is.

Real false positives of the detector come from the heart border, hilar vessels, contrast-filled aorta
and pulmonary arteries, sternum and costal cartilage, chest wall, diaphragm, bronchial walls and
mediastinal soft tissue. :func:`sample_hard_negatives` picks points inside those rendered structures
from the tissue map of :func:`~.phantom.render_anatomy` (so each point lies in the structure it is
named after by construction); the generator writes them per series as JSON (see
:mod:`.generator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..volume import CTVolume
from .anatomy import AnatomyParams, Grid, hilum_points
from .phantom import TISSUES

#: In-plane stride of the candidate voxels (every point is still a voxel of the fine grid).
STRIDE = 2
#: Format tag of the sidecar file.
HARD_NEGATIVE_FORMAT = "lungvl.hard_negatives 1"


def hard_negative_path(site_dir: str | Path, series_uid: str) -> Path:
    """``<site>/annotations/<SeriesInstanceUID>_hard_negatives.json`` (non-DICOM metadata area)."""
    return Path(site_dir) / "annotations" / f"{series_uid}_hard_negatives.json"


def read_hard_negatives(site_dir: str | Path, volume: CTVolume) -> list[tuple[tuple[int, int, int], str]]:
    """The generator's named hard-negative points of a series (``[]`` without its sidecar file).

    Returns:
        ``[((z, y, x) voxel inside the CT, structure name)]``; points outside the volume are dropped.
    """
    import json

    path = hard_negative_path(site_dir, volume.series_uid)
    if not path.is_file():
        return []
    out = []
    for pt in json.loads(path.read_text(encoding="utf-8")).get("points", []):
        v = np.rint(volume.lps_to_voxel(np.asarray(pt["lps"], float))).astype(int)
        if np.all(v >= 0) and np.all(v < volume.shape):
            out.append(((int(v[0]), int(v[1]), int(v[2])), str(pt["structure"])))
    return out


def hard_negative_map(site_dir: str | Path, volume: CTVolume) -> np.ndarray | None:
    """A ``(Z, Y, X)`` uint8 map of the series' hard-negative points (1 at each), None without a sidecar.

    Resampled like the nodule mask (small objects kept), it tells the segmentation stage's patch
    sampler where the tempting non-nodule anatomy is (:class:`~lungvl_model.data.crops.ForegroundCrops`).
    """
    if not hard_negative_path(site_dir, volume.series_uid).is_file():
        return None
    out = np.zeros(volume.shape, dtype=np.uint8)
    for (z, y, x), _ in read_hard_negatives(site_dir, volume):
        out[z, y, x] = 1
    return out


@dataclass(frozen=True)
class StructureRule:
    """How the points of one structure are chosen.

    Attributes:
        name: structure name written to the sidecar.
        tissues: tissue codes (names of :data:`~.phantom.TISSUES`) the point must have.
        near_lung_mm: if > 0, the point has lung within this distance (in-plane or along z); the
            lung-facing border is where the detector fires.
        hilar_mm: if > 0, the point is within this distance of a hilum root (hilar vessels).
        in_lung: the point must be inside the lung mask (intrapulmonary vessels).
        interior_mm: if > 0, the structure's tissues are also found this far away along ±x and ±y
            (the point is not on a partial-volume edge).
    """

    name: str
    tissues: tuple[str, ...]
    near_lung_mm: float = 0.0
    hilar_mm: float = 0.0
    in_lung: bool = False
    interior_mm: float = 0.0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tissues if t not in TISSUES]
        if unknown:
            raise ValueError(f"StructureRule.tissues has unknown tissue(s) {unknown}; known: {TISSUES}")
        for key in ("near_lung_mm", "hilar_mm", "interior_mm"):
            if getattr(self, key) < 0:
                raise ValueError(f"StructureRule.{key} must be >= 0, got {getattr(self, key)!r}")


#: The structures exported, in file order.
RULES: tuple[StructureRule, ...] = (
    StructureRule("heart_border", ("heart",), near_lung_mm=5.0),
    StructureRule("hilar_vessel", ("vessel",), hilar_mm=35.0, in_lung=True),
    StructureRule("aorta", ("aorta",), interior_mm=2.5),
    StructureRule("pulmonary_artery", ("pulmonary_artery",), interior_mm=2.5),
    StructureRule("pulmonary_vein", ("pulmonary_vein",), interior_mm=2.0),
    StructureRule("sternum", ("sternum",), interior_mm=1.5),
    StructureRule("costal_cartilage", ("cartilage",)),
    StructureRule("rib", ("bone",), near_lung_mm=6.0),
    StructureRule("chest_wall", ("muscle",), near_lung_mm=4.0),
    StructureRule("diaphragm", ("diaphragm", "liver", "spleen"), near_lung_mm=6.0),
    StructureRule("bronchial_wall", ("airway_wall",)),
    StructureRule("mediastinal_soft_tissue", ("lymph_node", "esophagus", "svc"), interior_mm=1.5),
    StructureRule("vertebra", ("vertebra",), near_lung_mm=12.0),
)


def _near(mask: np.ndarray, idx: np.ndarray, grid: Grid, dist_mm: float) -> np.ndarray:
    """Whether ``mask`` is True at any of 12 offsets (±d/2, ±d along x, y and z) of the voxels ``idx`` ``(N, 3)``."""
    hit = np.zeros(len(idx), bool)
    shape = np.asarray(mask.shape)
    for ax in range(3):
        for frac in (-1.0, -0.5, 0.5, 1.0):
            step = int(round(frac * dist_mm / grid.spacing[ax]))
            if step == 0:
                continue
            j = idx.copy()
            j[:, ax] += step
            ok = (j[:, ax] >= 0) & (j[:, ax] < shape[ax])
            hit[ok] |= mask[j[ok, 0], j[ok, 1], j[ok, 2]]
    return hit


def _interior(tissues: np.ndarray, idx: np.ndarray, grid: Grid, dist_mm: float, codes: list[int]) -> np.ndarray:
    """Whether the voxels ``idx`` ``(N, 3)`` have a tissue of ``codes`` at ±``dist_mm`` along y and x too."""
    ok = np.ones(len(idx), bool)
    for ax in (1, 2):
        step = max(1, int(round(dist_mm / grid.spacing[ax])))
        for sign in (-1, 1):
            j = idx.copy()
            j[:, ax] = np.clip(j[:, ax] + sign * step, 0, tissues.shape[ax] - 1)
            ok &= np.isin(tissues[j[:, 0], j[:, 1], j[:, 2]], codes)
    return ok


def sample_hard_negatives(
    tissues: np.ndarray,
    lobes: np.ndarray,
    grid: Grid,
    anatomy: AnatomyParams,
    rng: np.random.Generator,
    per_structure: int = 6,
    pool: int = 4000,
) -> list[tuple[str, np.ndarray]]:
    """Pick points inside the rendered false-positive-prone structures.

    Args:
        tissues: ``(Z, Y, X)`` uint8 tissue codes of the fine rendering grid.
        lobes: ``(Z, Y, X)`` uint8 lobe codes on the same grid.
        grid: the fine grid.
        anatomy: the patient (hilum positions).
        rng: the study's stream for the choice.
        per_structure: points per structure (fewer when the structure has fewer qualifying voxels).
        pool: voxels of a structure drawn before the border / hilum criteria are applied.

    Returns:
        ``(structure name, patient-frame (z, y, x) mm)`` pairs, structures in :data:`RULES` order.
    """
    lung = lobes > 0
    coarse = tissues[:, ::STRIDE, ::STRIDE]  # candidates on every other row and column: 4x fewer voxels to scan
    hila = np.stack(list(hilum_points(anatomy).values()))
    out: list[tuple[str, np.ndarray]] = []
    for rule in RULES:
        flat = np.concatenate([np.flatnonzero(coarse == TISSUES.index(t)) for t in rule.tissues])
        if not len(flat):
            continue
        if len(flat) > pool:
            flat = np.sort(rng.choice(flat, pool, replace=False))
        idx = np.stack(np.unravel_index(flat, coarse.shape), axis=1) * np.array([1, STRIDE, STRIDE])
        keep = np.ones(len(idx), bool)
        if rule.near_lung_mm > 0:
            keep &= _near(lung, idx, grid, rule.near_lung_mm)
        if rule.interior_mm > 0:
            keep &= _interior(tissues, idx, grid, rule.interior_mm, [TISSUES.index(t) for t in rule.tissues])
        if rule.in_lung:
            keep &= lung[idx[:, 0], idx[:, 1], idx[:, 2]]
        mm = grid.to_mm(idx)
        if rule.hilar_mm > 0:
            d = np.linalg.norm(mm[:, None, :] - hila[None], axis=2).min(axis=1)
            keep &= d < rule.hilar_mm
        cand = np.flatnonzero(keep)
        if not len(cand):
            continue
        pick = np.sort(rng.choice(cand, min(per_structure, len(cand)), replace=False))
        out += [(rule.name, mm[k]) for k in pick]
    return out


def hard_negative_doc(
    points: list[tuple[str, np.ndarray]],
    shift_lps: tuple[float, float, float],
    study_uid: str,
    series_uid: str,
    contrast: bool,
) -> dict[str, object]:
    """The sidecar JSON document of one series.

    Args:
        points: output of :func:`sample_hard_negatives` (patient-frame ``(z, y, x)`` mm).
        shift_lps: ``(dx, dy, dz)`` from the patient frame to the series' LPS frame (table position).
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        contrast: whether the study is contrast-enhanced.

    Returns:
        ``{"format", "study_uid", "series_uid", "frame", "contrast", "structures", "points"}`` with
        ``points = [{"structure": name, "lps": [x, y, z]}, ...]`` (mm, 2 decimals).
    """
    dx, dy, dz = shift_lps
    pts = [
        {"structure": name, "lps": [round(float(p[2] + dx), 2), round(float(p[1] + dy), 2), round(float(p[0] + dz), 2)]}
        for name, p in points
    ]
    return {
        "format": HARD_NEGATIVE_FORMAT,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame": "LPS mm (DICOM patient coordinates of this series)",
        "contrast": bool(contrast),
        "structures": [r.name for r in RULES],
        "points": pts,
    }

"""Training data and fitting of the nodule-candidate filter (:mod:`lungvl_model.inference.candidate_filter`).

No trained triage model is needed: candidates are seeded on the 5 mm triage grid and refined by the
same :func:`~lungvl_model.inference.findings.refine_candidate` that the explanation pipeline uses.
With the checkpoint's fine detector (``detector=``), the filter is fitted on what the pipeline will give
it: every row's ``triage_probability`` is the detector's maximum probability over the refined mask, and
the detector's own candidates are rows too (:func:`detector_rows`: the shipped filter's 1,106 detector
false positives of the training sites were the hardest negatives, out-of-fold AUC 0.968 → 0.949 with them).

* **Positives**: each reference nodule of a synthetic site (its label map), seeded twice: as the triage
  would give it (the 5 mm grid voxels that hold any nodule voxel) and as a point seed at its centroid.
* **Hard negatives**: point seeds (the 5 mm voxel under the point and its 6 face neighbours: the size
  of a small triage component) at random points at least ``exclusion_mm`` from every nodule voxel:
  ``vessel`` (dense voxels inside the lung mask: vessels, airway walls, fissures), ``pleura`` (dense
  voxels within ``boundary_mm`` outside the lungs: chest wall, diaphragm), ``medial`` (the same on the
  medial side: hilum, mediastinum, heart border, aorta) and, in real CT, ``lidc`` points (every kind,
  at least ``exclusion_mm`` from every reader-marked nodule); where the synthetic generator wrote its
  named hard negatives (``annotations/<series>_hard_negatives.json``: heart border, hilar vessels,
  aorta, pulmonary vessels, sternum, costal cartilage, ribs, chest wall, vertebra, diaphragm, bronchial
  walls, mediastinal soft tissue), these too (kind ``anatomy_<structure>``).
* A seed whose refinement gives nothing is already rejected by the pipeline: it is counted (``None``
  rate) but yields no training row.

Model selection: grouped (by study) k-fold out-of-fold probabilities for each model kind; the kind
that keeps the fewest out-of-fold negatives at the threshold for ``target_sensitivity`` (ties: the
higher AUC) is refitted on all rows, and that out-of-fold threshold is stored as the operating point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lungvl_model.data.synth.hard_negatives import read_hard_negatives
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.anatomy import lung_mask
from lungvl_model.inference.candidate_features import FEATURE_NAMES, FeatureConfig, candidate_features
from lungvl_model.inference.candidate_filter import (
    CandidateFilter,
    CandidateFilterConfig,
    choose_threshold,
    fit_candidate_filter,
    roc_auc,
    save_candidate_filter,
)
from lungvl_model.inference.findings import GridMap, refine_candidate
from lungvl_model.inference.fine_detection import REFINE_MARGIN_MM, DetectorMap
from lungvl_model.models.fine_detector import FineDetector

Log = Callable[[str], None]
#: Fewer nodule rows than this: the threshold for 95 % sensitivity rests on one or two nodules (a
#: 10-patient referral site, 9 nodules, gave threshold 0.0005 and kept 20 of 21 held-out LIDC negatives;
#: 42 nodules gave 0.078 and kept 1).
MIN_POSITIVES = 60


@dataclass(frozen=True)
class SeedConfig:
    """Where training candidates are seeded.

    Attributes:
        grid_mm: triage grid spacing (mm), as the model's input grid.
        negatives_per_kind: hard-negative seeds per kind and study.
        exclusion_mm: negatives lie at least this far from every nodule voxel / reader mark.
        dense_hu: a negative seed point is at or above this HU (a structure, not aerated lung).
        boundary_mm: pleural/medial seeds lie within this distance outside the lung mask.
        medial_fraction: the medial kind is the central fraction of the lungs' left-right extent.
    """

    grid_mm: float = 5.0
    negatives_per_kind: int = 8
    exclusion_mm: float = 20.0
    dense_hu: float = -300.0
    boundary_mm: float = 4.0
    medial_fraction: float = 0.4

    def __post_init__(self) -> None:
        for key in ("grid_mm", "exclusion_mm", "boundary_mm"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"SeedConfig.{key} must be > 0, got {v!r}")
        if not isinstance(self.negatives_per_kind, int) or self.negatives_per_kind < 0:
            raise ValueError(f"SeedConfig.negatives_per_kind must be an int >= 0, got {self.negatives_per_kind!r}")
        if not 0.0 < self.medial_fraction < 1.0:
            raise ValueError(f"SeedConfig.medial_fraction must be in (0, 1), got {self.medial_fraction!r}")


@dataclass
class CandidateSet:
    """Feature rows of refined candidates.

    Attributes:
        x: ``(N, F)`` features.
        y: ``(N,)`` 1 = nodule.
        kind: ``(N,)`` seed kind (``nodule``, ``nodule_point``, ``vessel``, ``pleura``, ``medial``, ...).
        group: ``(N,)`` study identifier (folds never split a study).
        seeds: seeds tried per kind (refined or not).
        feature_seconds: time (s) of :func:`candidate_features` per refined candidate.
    """

    x: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FEATURE_NAMES))))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    seeds: dict[str, int] = field(default_factory=dict)
    feature_seconds: list[float] = field(default_factory=list)

    def extend(self, other: CandidateSet) -> None:
        """Append another set's rows and counts."""
        self.x = np.vstack([self.x, other.x])
        self.y = np.concatenate([self.y, other.y])
        self.kind = np.concatenate([self.kind, other.kind])
        self.group = np.concatenate([self.group, other.group])
        for k, v in other.seeds.items():
            self.seeds[k] = self.seeds.get(k, 0) + v
        self.feature_seconds += other.feature_seconds


def triage_grid(volume: CTVolume, grid_mm: float) -> tuple[GridMap, tuple[int, int, int]]:
    """A triage grid of ``grid_mm`` voxels over the whole CT (origin at voxel 0) and its shape."""
    grid = GridMap(volume.spacing, (grid_mm, grid_mm, grid_mm), (0.0, 0.0, 0.0))
    shape = tuple(int(math.ceil(n * s / grid_mm)) for n, s in zip(volume.shape, volume.spacing, strict=True))
    return grid, shape  # type: ignore[return-value]


def point_candidate(point_zyx: Sequence[float], grid: GridMap, shape: tuple[int, int, int]) -> np.ndarray:
    """``(D, H, W)`` candidate: the grid voxel under a source voxel point and its 6 face neighbours."""
    g = np.clip(np.rint(grid.src_to_model(np.asarray(point_zyx, float))).astype(int), 0, np.array(shape) - 1)
    cand = np.zeros(shape, bool)
    cand[tuple(g)] = True
    return np.asarray(ndimage.binary_dilation(cand, ndimage.generate_binary_structure(3, 1)))


def coarse_candidate(mask: np.ndarray, grid: GridMap, shape: tuple[int, int, int]) -> np.ndarray:
    """``(D, H, W)`` candidate: the grid voxels that hold any voxel of a source ``(Z, Y, X)`` mask."""
    cand = np.zeros(shape, bool)
    g = np.clip(np.rint(grid.src_to_model(np.argwhere(mask))).astype(int), 0, np.array(shape) - 1)
    cand[g[:, 0], g[:, 1], g[:, 2]] = True
    return cand


def negative_points(
    volume: CTVolume,
    lungs: np.ndarray,
    far: np.ndarray,
    rng: np.random.Generator,
    config: SeedConfig,
    allowed: np.ndarray | None = None,
) -> list[tuple[tuple[int, int, int], str]]:
    """Random hard-negative seed points by kind (see the module docstring).

    Args:
        volume: the CT.
        lungs: ``(Z, Y, X)`` lung mask.
        far: ``(Z, Y, X)`` bool, True where a seed may lie (at least ``exclusion_mm`` from every nodule).
        rng: random generator.
        config: seeding parameters.
        allowed: optional extra ``(Z, Y, X)`` restriction (e.g. a slab of the CT).

    Returns:
        ``[((z, y, x), kind)]``, ``negatives_per_kind`` per kind where that many points exist.
    """
    dense = (volume.hu >= config.dense_hu) & far
    if allowed is not None:
        dense &= allowed
    near_out = ~lungs & (ndimage.distance_transform_edt(~lungs, sampling=volume.spacing) <= config.boundary_mm)
    xs = np.nonzero(lungs.any(axis=(0, 1)))[0]
    medial_x = np.zeros(lungs.shape[2], bool)
    if len(xs):
        mid, half = (xs.min() + xs.max()) / 2, config.medial_fraction * (xs.max() - xs.min()) / 2
        medial_x[int(max(0, math.floor(mid - half))) : int(math.ceil(mid + half)) + 1] = True
    pools = {
        "vessel": dense & lungs,
        "pleura": dense & near_out & ~medial_x[None, None, :],
        "medial": dense & near_out & medial_x[None, None, :],
    }
    out: list[tuple[tuple[int, int, int], str]] = []
    for kind, pool in pools.items():
        idx = np.flatnonzero(pool)
        if idx.size == 0:
            continue
        pick = rng.choice(idx, size=min(config.negatives_per_kind, idx.size), replace=False)
        zz, yy, xx = np.unravel_index(pick, pool.shape)
        out.extend(((int(a), int(b), int(c)), kind) for a, b, c in zip(zz, yy, xx, strict=True))
    return out


def seed_rows(
    volume: CTVolume,
    lungs: np.ndarray,
    seeds: Iterable[tuple[np.ndarray, str, int]],
    group: str,
    grid: GridMap,
    features: FeatureConfig | None = None,
    detector: DetectorMap | None = None,
) -> CandidateSet:
    """Refine each seed candidate and compute its features.

    Args:
        volume: the CT.
        lungs: its lung mask.
        seeds: ``(candidate (D, H, W) on grid, kind, label)``.
        group: study identifier.
        grid: the triage grid.
        features: feature parameters.
        detector: the fine detector's map of this CT: ``triage_probability`` is its maximum over each
            refined mask (as :func:`~lungvl_model.inference.explain.analyse_candidates` gives it). None:
            1.0 for every row (the filter learns no weight for a constant).

    Returns:
        The refined candidates' rows.
    """
    rows, ys, kinds, secs = [], [], [], []
    counts: dict[str, int] = {}
    for cand, kind, label in seeds:
        counts[kind] = counts.get(kind, 0) + 1
        refined = refine_candidate(volume, cand, grid, lungs=lungs)
        if refined is None:
            continue
        mask, off = refined
        t1 = time.perf_counter()
        triage = detector.over(mask, off) if detector is not None else 1.0
        rows.append(candidate_features(volume.hu, volume.spacing, mask, off, lungs, triage, features))
        secs.append(time.perf_counter() - t1)
        ys.append(label)
        kinds.append(kind)
    return CandidateSet(
        np.asarray(rows, float).reshape(-1, len(FEATURE_NAMES)),
        np.asarray(ys, float),
        np.asarray(kinds, dtype=object),
        np.asarray([group] * len(ys), dtype=object),
        counts,
        secs,
    )


def synthetic_study_rows(
    volume: CTVolume,
    labels: np.ndarray,
    group: str,
    rng: np.random.Generator,
    config: SeedConfig,
    anatomy_points: Sequence[tuple[tuple[int, int, int], str]] = (),
    detector: FineDetector | None = None,
) -> CandidateSet:
    """Positive and hard-negative rows of one synthetic study.

    Args:
        volume: the CT.
        labels: ``(Z, Y, X)`` its nodule label map.
        group: study identifier.
        rng: random generator of the negative points.
        config: seeding parameters.
        anatomy_points: named hard negatives ``((z, y, x), structure)`` (the generator's sidecar,
            :func:`~lungvl_model.data.synth.hard_negatives.read_hard_negatives`); seeded as kind
            ``anatomy_<structure>`` where ``exclusion_mm`` from every nodule.
        detector: the checkpoint's fine detector: every row's ``triage_probability`` is its maximum
            over the refined mask, and its own candidates are rows too (:func:`detector_rows`).
    """
    lungs = lung_mask(volume.hu)
    dmap = DetectorMap.of(detector, volume, lungs) if detector is not None else None
    grid, shape = triage_grid(volume, config.grid_mm)
    nod = labels > 0
    far = (
        ndimage.distance_transform_edt(~nod, sampling=volume.spacing) >= config.exclusion_mm
        if nod.any()
        else np.ones(nod.shape, bool)
    )
    seeds: list[tuple[np.ndarray, str, int]] = []
    comp, n = ndimage.label(nod, structure=np.ones((3, 3, 3), bool))
    for k in range(1, n + 1):
        m = comp == k
        seeds.append((coarse_candidate(m, grid, shape), "nodule", 1))
        seeds.append((point_candidate(np.argwhere(m).mean(0), grid, shape), "nodule_point", 1))
    for p, kind in negative_points(volume, lungs, far, rng, config):
        seeds.append((point_candidate(p, grid, shape), kind, 0))
    for p, structure in anatomy_points:
        if far[p]:
            seeds.append((point_candidate(p, grid, shape), "anatomy_" + structure, 0))
    out = seed_rows(volume, lungs, seeds, group, grid, detector=dmap)
    if dmap is not None:
        out.extend(detector_rows(volume, lungs, dmap, group, nod, far))
    return out


def detector_rows(
    volume: CTVolume,
    lungs: np.ndarray,
    dmap: DetectorMap,
    group: str,
    nodules: np.ndarray,
    far: np.ndarray,
    prefix: str = "",
) -> CandidateSet:
    """Rows of the detector's own candidates, refined as the explanation pipeline refines them.

    A refined candidate that overlaps a nodule voxel is kind ``detector_nodule`` (label 1); one whose
    centroid is ``far`` from every nodule is kind ``detector`` (label 0); the others (beside a nodule,
    not on it) give no row.

    Args:
        volume: the CT.
        lungs: its lung mask.
        dmap: the detector's map of it.
        group: study identifier.
        nodules: ``(Z, Y, X)`` bool nodule voxels (all False for a negatives-only case).
        far: ``(Z, Y, X)`` bool where a negative may lie.
        prefix: prepended to the kinds (``"lidc_"``).
    """
    rows, ys, kinds, secs = [], [], [], []
    cands = dmap.candidates()
    for cand, _peak in cands:
        refined = refine_candidate(volume, cand, dmap.fine.grid, REFINE_MARGIN_MM, lungs=lungs)
        if refined is None:
            continue
        mask, off = refined
        box = tuple(slice(o, o + n) for o, n in zip(off, mask.shape, strict=True))
        if (mask & nodules[box]).any():
            label, kind = 1, "detector_nodule"
        elif far[tuple(np.rint(np.argwhere(mask).mean(0) + np.asarray(off)).astype(int))]:
            label, kind = 0, "detector"
        else:
            continue
        t1 = time.perf_counter()
        rows.append(candidate_features(volume.hu, volume.spacing, mask, off, lungs, dmap.over(mask, off)))
        secs.append(time.perf_counter() - t1)
        ys.append(label)
        kinds.append(prefix + kind)
    return CandidateSet(
        np.asarray(rows, float).reshape(-1, len(FEATURE_NAMES)),
        np.asarray(ys, float),
        np.asarray(kinds, dtype=object),
        np.asarray([group] * len(ys), dtype=object),
        {prefix + "detector": len(cands)},
        secs,
    )


def read_synthetic_site(site_dir: str | Path) -> list[tuple[str, CTVolume, np.ndarray]]:
    """``(study uid, CT, nodule label map)`` of each usable study of a site with masks (a generator would do)."""
    from lungvl_model.data.catalogue import build_catalogue
    from lungvl_model.data.dicom_io import read_series
    from lungvl_model.data.nifti_io import read_label_nifti

    out = []
    for e in build_catalogue(site_dir).usable:
        if e.series is None or e.mask is None:
            continue
        vol = read_series(e.series.files)
        out.append((e.study_uid, vol, np.asarray(read_label_nifti(e.mask, vol))))
    return out


def is_lidc_site(directory: str | Path) -> bool:
    """True for a LIDC case folder (reader XML below it) or a site imported from one (``site.toml`` cohort ``lidc``).

    Such folders give negatives only: the case is an evaluation case, its nodule never a training row.
    """
    from lungvl_model.data.lidc import find_lidc_xml
    from lungvl_model.data.site_layout import SiteManifest

    if find_lidc_xml(directory):
        return True
    toml = Path(directory) / "site.toml"
    try:
        return toml.is_file() and SiteManifest.from_toml(toml).cohort == "lidc"
    except (OSError, ValueError):
        return False


def _read_imported_lidc(site_dir: Path) -> tuple[CTVolume, list[np.ndarray], np.ndarray]:
    """An imported LIDC site (``lungvl data import-lidc``): CT, labelled nodule centroids ``(z, y, x)``, label map."""
    from lungvl_model.data.catalogue import build_catalogue
    from lungvl_model.data.dicom_io import read_series
    from lungvl_model.data.nifti_io import read_label_nifti

    usable = [e for e in build_catalogue(site_dir).usable if e.series is not None]
    if not usable:
        raise ValueError(f"{site_dir}: no usable CT series in this LIDC site")
    e = usable[0]
    assert e.series is not None
    vol = read_series(e.series.files)
    lab = np.asarray(read_label_nifti(e.mask, vol)) if e.mask is not None else np.zeros(vol.shape, np.uint8)
    marks = []
    for r in e.nodule_labels:
        try:
            lps = np.array([float(r[k]) for k in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")])
        except (KeyError, ValueError):
            continue
        if np.all(np.isfinite(lps)):
            marks.append(np.asarray(vol.lps_to_voxel(lps), float))
    return vol, marks, lab


def read_lidc(lidc_dir: str | Path) -> tuple[CTVolume, list[np.ndarray], np.ndarray]:
    """The first LIDC case below ``lidc_dir``: CT, every reader mark's ``(z, y, x)`` and the consensus label map.

    ``lidc_dir`` is a case folder with the readers' XML, or a site imported from one (its labels.csv
    centroids stand for the marks).
    """
    from lungvl_model.data.dicom_io import read_series, scan_dicom_tree
    from lungvl_model.data.lidc import find_lidc_xml
    from lungvl_model.data.lidc_consensus import annotate_series, reader_nodules, slice_sop_uids
    from lungvl_model.data.lidc_xml import parse_lidc_xml

    found = find_lidc_xml(lidc_dir)
    if not found:
        return _read_imported_lidc(Path(lidc_dir))
    xml = found[0]
    info = list(scan_dicom_tree(xml.parent).series.values())[0]
    vol = read_series(info.files)
    sops = slice_sop_uids(info.files, vol)
    msg = parse_lidc_xml(xml)
    marks = [np.asarray(m.centroid_zyx, float) for m in reader_nodules(msg, vol, sops, [])]
    return vol, marks, annotate_series(msg, vol, sops).label_map


def lidc_far_mask(volume: CTVolume, marks: Sequence[np.ndarray], labels: np.ndarray, exclusion_mm: float) -> np.ndarray:
    """``(Z, Y, X)`` True at least ``exclusion_mm`` from every reader mark and consensus nodule voxel."""
    near = labels > 0
    for m in marks:
        near[tuple(np.clip(np.rint(m).astype(int), 0, np.array(volume.shape) - 1))] = True
    return np.asarray(ndimage.distance_transform_edt(~near, sampling=volume.spacing) >= exclusion_mm)


def lidc_slabs(volume: CTVolume, slab_mm: float = 40.0, gap_mm: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Alternating cranio-caudal slabs of the CT: ``(train, held-out)`` ``(Z, Y, X)`` bool masks.

    Slab ``k = floor(z_mm / slab_mm)``; even slabs train, odd slabs are held out; ``gap_mm`` at each slab
    edge belongs to neither, so a structure is rarely seeded in both.
    """
    z = np.arange(volume.shape[0]) * volume.spacing[0]
    k = np.floor(z / slab_mm)
    edge = np.minimum(z - k * slab_mm, (k + 1) * slab_mm - z) >= gap_mm
    train = ((k % 2) == 0) & edge
    held = ((k % 2) == 1) & edge
    shape = (volume.shape[0], 1, 1)
    return np.broadcast_to(train.reshape(shape), volume.shape), np.broadcast_to(held.reshape(shape), volume.shape)


def lidc_negative_rows(
    volume: CTVolume,
    far: np.ndarray,
    allowed: np.ndarray,
    rng: np.random.Generator,
    config: SeedConfig,
    lungs: np.ndarray | None = None,
    group: str = "lidc",
    detector: FineDetector | None = None,
) -> CandidateSet:
    """Hard-negative rows of a real CT, seeded only where ``far & allowed``.

    With a fine detector, ``triage_probability`` is its maximum over each refined mask, and its own
    candidates whose centroid lies where ``far & allowed`` are rows too (kind ``lidc_detector``).
    """
    lungs = lung_mask(volume.hu) if lungs is None else lungs
    dmap = DetectorMap.of(detector, volume, lungs) if detector is not None else None
    grid, shape = triage_grid(volume, config.grid_mm)
    pts = negative_points(volume, lungs, far, rng, config, allowed)
    seeds = [(point_candidate(p, grid, shape), "lidc_" + k, 0) for p, k in pts]
    out = seed_rows(volume, lungs, seeds, group, grid, detector=dmap)
    if dmap is not None:
        out.extend(detector_rows(volume, lungs, dmap, group, np.zeros(volume.shape, bool), far & allowed, "lidc_"))
    return out


def grouped_oof(
    x: np.ndarray, y: np.ndarray, group: np.ndarray, config: CandidateFilterConfig, k: int = 5
) -> np.ndarray:
    """Out-of-fold probabilities ``(N,)``: studies dealt round-robin into ``k`` folds.

    Raises:
        ValueError: a training fold without both classes.
    """
    uniq = list(dict.fromkeys(group.tolist()))
    if len(uniq) < 2:
        raise ValueError(f"candidate filter: {len(uniq)} study in the training rows; folds need at least 2")
    fold_of = {g: i % k for i, g in enumerate(uniq)}
    fold = np.array([fold_of[g] for g in group.tolist()])
    out = np.zeros(len(y))
    for f in range(k):
        te = fold == f
        if not te.any():
            continue
        if len(np.unique(y[~te])) < 2:
            raise ValueError(f"candidate filter: fold {f} leaves training rows of one class; add studies with nodules")
        flt = fit_candidate_filter(x[~te], y[~te], config)
        out[te] = flt.predict_proba(x[te])
    return out


def fit_from_rows(
    data: CandidateSet, config: CandidateFilterConfig | None = None, kinds: Sequence[str] = ("logistic", "stumps")
) -> CandidateFilter:
    """Select the model kind by out-of-fold AUC, set the threshold on out-of-fold scores, refit on all rows.

    Args:
        data: training rows.
        config: base hyper-parameters (``kind`` is overridden by the selection).
        kinds: the kinds compared.

    Returns:
        The fitted filter; ``metrics`` holds each kind's out-of-fold AUC and the chosen threshold's
        out-of-fold sensitivity and specificity.
    """
    base = config or CandidateFilterConfig()
    neg = data.y == 0
    results: dict[str, tuple[float, float, np.ndarray]] = {}
    for kind in kinds:
        cfg = CandidateFilterConfig(**{**asdict(base), "kind": kind})
        oof = grouped_oof(data.x, data.y, data.group, cfg)
        kept = float(np.mean(oof[neg] >= choose_threshold(oof, data.y, cfg.target_sensitivity)))
        results[kind] = (kept, roc_auc(oof, data.y), oof)
    best = min(results, key=lambda kk: (results[kk][0], -results[kk][1]))
    cfg = CandidateFilterConfig(**{**asdict(base), "kind": best})
    oof = results[best][2]
    thr = choose_threshold(oof, data.y, cfg.target_sensitivity)
    flt = fit_candidate_filter(data.x, data.y, cfg)
    flt.threshold = thr
    pos = data.y == 1
    flt.metrics = {
        "oof_auc": {kk: round(v[1], 4) for kk, v in results.items()},
        "oof_negatives_kept": {kk: round(v[0], 4) for kk, v in results.items()},
        "kind": best,
        "oof_sensitivity": round(float(np.mean(oof[pos] >= thr)), 4),
        "oof_specificity": round(float(np.mean(oof[neg] < thr)), 4),
        "n_positive": int(pos.sum()),
        "n_negative": int(neg.sum()),
    }
    return flt


def train_candidate_filter(
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    lidc_dirs: Sequence[str | Path] = (),
    seed: int = 0,
    seeds: SeedConfig | None = None,
    config: CandidateFilterConfig | None = None,
    detector: FineDetector | None = None,
    log: Log | None = None,
) -> CandidateFilter:
    """Build training rows (synthetic sites + LIDC negatives of the training slabs), fit, save.

    Args:
        site_dirs: synthetic site directories (CT, nodule masks).
        out_dir: where ``candidate_filter.json`` is written (a checkpoint directory).
        lidc_dirs: LIDC case folders: negatives only (training slabs of :func:`lidc_slabs`), never the nodule.
        seed: random seed of the negative points.
        seeds: seeding parameters.
        config: classifier hyper-parameters.
        detector: the fine detector of the checkpoint the filter belongs beside: the filter is then
            fitted on its probability (``triage_source`` ``"fine_detector"``) and on its own candidates.
        log: progress messages.

    Returns:
        The saved filter.
    """
    sc = seeds or SeedConfig()
    rng = np.random.default_rng(seed)
    say = log or (lambda _m: None)
    data = CandidateSet()
    for site in site_dirs:
        for uid, vol, lab in read_synthetic_site(site):
            data.extend(synthetic_study_rows(vol, lab, uid, rng, sc, read_hard_negatives(site, vol), detector))
        say(f"{site}: {len(data.y)} candidates so far ({int(data.y.sum())} nodules)")
    for d in lidc_dirs:
        vol, marks, lab = read_lidc(d)
        far = lidc_far_mask(vol, marks, lab, sc.exclusion_mm)
        train_slabs, _ = lidc_slabs(vol)
        lidc_cfg = SeedConfig(**{**asdict(sc), "negatives_per_kind": 4 * sc.negatives_per_kind})
        data.extend(lidc_negative_rows(vol, far, train_slabs, rng, lidc_cfg, group=f"lidc:{d}", detector=detector))
        say(f"{d}: {len(data.y)} candidates so far")
    flt = fit_from_rows(data, config)
    if flt.metrics["n_positive"] < MIN_POSITIVES:
        say(
            f"warning: only {flt.metrics['n_positive']} nodule rows; the operating threshold rests on a few "
            f"nodules (>= {MIN_POSITIVES} advised: add sites with nodules)"
        )
    if detector is not None:
        flt.triage_source = "fine_detector"
    flt.metrics["seeds"] = data.seeds
    flt.metrics["rows_by_kind"] = {str(k): int((data.kind == k).sum()) for k in np.unique(data.kind)}
    save_candidate_filter(flt, Path(out_dir) / "candidate_filter.json")
    say(f"candidate filter ({flt.config.kind}) -> {Path(out_dir) / 'candidate_filter.json'}: {flt.metrics}")
    return flt


def summarize(flt: CandidateFilter, data: CandidateSet) -> dict[str, Any]:
    """Held-out numbers: AUC, sensitivity at the threshold, negatives kept per study and per kind."""
    p = flt.predict_proba(data.x) if len(data.y) else np.zeros(0)
    keep = p >= flt.threshold
    pos, neg = data.y == 1, data.y == 0
    n_studies = max(len(set(data.group.tolist())), 1)
    return {
        "auc": round(roc_auc(p, data.y), 4),
        "sensitivity": round(float(keep[pos].mean()), 4) if pos.any() else math.nan,
        "negatives_per_study_before": round(float(neg.sum()) / n_studies, 3),
        "negatives_per_study_after": round(float((keep & neg).sum()) / n_studies, 3),
        "kept_by_kind": {
            str(k): f"{int((keep & (data.kind == k)).sum())}/{int((data.kind == k).sum())}"
            for k in np.unique(data.kind)
        },
        "seeds_tried": data.seeds,
    }

"""LIDC-IDRI reader contours -> consensus nodules on the series grid.

1. Each reader's nodule >= 3 mm (one with contours, not a single point) is rasterised onto the series
   grid (:func:`reader_nodules`): a roi's slice is found by ``imageSOP_UID`` (nearest
   ``imageZposition`` as fallback), its polygon is filled with the edge-map pixels included, and
   ``inclusion=FALSE`` rois are holes whose interior is cut out.
2. Readers' nodules are clustered across sessions by centroid distance (:func:`cluster_nodules`), at
   most one nodule per reader per cluster.
3. Each cluster's consensus mask keeps the voxels included by >= 50 % of the readers who marked that
   nodule (:func:`consensus_mask`); it is measured with
   :func:`~lungvl_model.data.measure.measure_nodule` and the readers' ratings are averaged
   (:func:`summarize_ratings`).

Conventions of this module (choices, not LIDC or ACR rules):
    * nodule type from the rounded mean LIDC texture rating: 1-2 non_solid, 3 part_solid, 4-5 solid;
    * ``spiculation`` = 1 when the mean spiculation rating >= 3; ``margin`` is spiculated when mean
      spiculation >= 3, else lobulated when mean lobulation >= 3, else smooth;
    * ``calcification`` = 1 when most raters (strictly more than half) chose a calcified pattern
      (LIDC 1-5: popcorn, laminated, solid, non-central, central; 6 = absent); Lung-RADS
      ``benign_pattern`` additionally excludes non-central (4), which is not a benign pattern;
    * Lung-RADS is the baseline category (``context="baseline"``); juxtapleural position and 4X
      features are not assessed (False).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

from lungvl_model.data.lidc_xml import LidcNodule, LidcReadMessage, LidcRoi
from lungvl_model.data.measure import NoduleMeasurement, measure_nodule, solid_component_mm
from lungvl_model.data.volume import CTVolume

#: Fraction of a nodule's readers that must include a voxel for it to be in the consensus mask.
CONSENSUS_FRACTION = 0.5
#: Smallest centroid distance (mm) under which two readers' nodules are the same nodule.
CLUSTER_MIN_DISTANCE_MM = 5.0

# ----------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------


def _polyline_pixels(pts_yx: np.ndarray) -> np.ndarray:
    """8-connected pixels of the closed polyline through ``pts_yx`` (``(N, 2)`` int), ``(M, 2)``."""
    if len(pts_yx) == 1:
        return pts_yx.copy()
    a, b = pts_yx, np.roll(pts_yx, -1, axis=0)
    n = np.maximum(np.abs(b - a).max(axis=1), 1) + 1
    t = np.concatenate([np.linspace(0.0, 1.0, k) for k in n])
    ia = np.repeat(np.arange(len(a)), n)
    return np.rint(a[ia] + (b[ia] - a[ia]) * t[:, None]).astype(np.int64)


def fill_contour(edge_map: np.ndarray, shape: tuple[int, int], *, include_boundary: bool = True) -> np.ndarray:
    """Fill an LIDC edge map on an image grid.

    The edge map is closed (last point joined to the first) and drawn as an 8-connected line; the
    region it encloses is filled. LIDC edge maps trace the nodule's outer boundary pixels, so by
    default the boundary pixels are part of the region.

    Args:
        edge_map: ``(N, 2)`` ``(x, y)`` = (column, row) pixel coordinates; clipped to the grid.
        shape: image shape ``(Y, X)``.
        include_boundary: False returns the strict interior (used for ``inclusion=FALSE`` holes).

    Returns:
        ``(Y, X)`` boolean mask.
    """
    out = np.zeros(shape, dtype=bool)
    pts = np.asarray(edge_map, dtype=np.int64).reshape(-1, 2)[:, ::-1]
    pts = np.clip(pts, 0, np.asarray(shape) - 1)
    y0, x0 = pts.min(axis=0)
    y1, x1 = pts.max(axis=0)
    line = _polyline_pixels(pts - (y0, x0))
    boundary = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
    boundary[line[:, 0], line[:, 1]] = True
    filled = ndimage.binary_fill_holes(boundary)
    out[y0 : y1 + 1, x0 : x1 + 1] = filled if include_boundary else filled & ~boundary
    return out


def slice_sop_uids(files: Sequence[str | Path], volume: CTVolume) -> dict[str, int]:
    """Map each slice's SOPInstanceUID to its index along the volume's ``z`` axis.

    Args:
        files: the series' slice files (as given to ``read_series``).
        volume: the volume read from them.

    Returns:
        ``{SOPInstanceUID: slice index}``.
    """
    out: dict[str, int] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "ImagePositionPatient"])
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        out[str(ds.SOPInstanceUID)] = int(round(float(volume.lps_to_voxel(ipp)[0])))
    return out


def _slice_z(volume: CTVolume) -> np.ndarray:
    """Patient z (mm) of each slice's first voxel, ``(Z,)``."""
    idx = np.zeros((volume.shape[0], 3))
    idx[:, 0] = np.arange(volume.shape[0])
    return volume.voxel_to_lps(idx)[:, 2]


def roi_slice(roi: LidcRoi, sop_to_slice: Mapping[str, int], slice_z: np.ndarray, tol_mm: float) -> int | None:
    """Slice index of a roi: by SOP UID, else the nearest slice z within ``tol_mm``, else None."""
    k = sop_to_slice.get(roi.sop_uid)
    if k is not None and 0 <= k < len(slice_z):
        return k
    k = int(np.argmin(np.abs(slice_z - roi.z_position)))
    return k if abs(slice_z[k] - roi.z_position) <= tol_mm else None


@dataclass
class ReaderNodule:
    """One reader's nodule on the series grid.

    Attributes:
        reader: index of the reading session (identifies the reader within the file).
        reader_id: the anonymised ``servicingRadiologistID``.
        nodule_id: the reader's ``noduleID``.
        characteristics: the reader's ratings (may be empty).
        centroid_zyx: centroid, fractional voxel indices ``(z, y, x)``.
        centroid_lps: centroid in LPS mm, ``(3,)``.
        longest_diameter_mm: the reader's longest axial diameter (0 for a < 3 mm point).
        offset: ``(z0, y0, x0)`` of ``mask`` in the volume.
        mask: ``(dz, dy, dx)`` boolean crop of the reader's mask; None for a < 3 mm point.
    """

    reader: int
    reader_id: str
    nodule_id: str
    characteristics: dict[str, int]
    centroid_zyx: tuple[float, float, float]
    centroid_lps: np.ndarray
    longest_diameter_mm: float = 0.0
    offset: tuple[int, int, int] = (0, 0, 0)
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_small(self) -> bool:
        """True for a < 3 mm point mark."""
        return self.mask is None


def _rasterize_nodule(
    nod: LidcNodule, shape: tuple[int, int, int], slices: list[int | None]
) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """Crop offset and ``(dz, dy, dx)`` mask of a contoured nodule, None when nothing is left."""
    used = [(r, k) for r, k in zip(nod.rois, slices, strict=True) if k is not None]
    if not used:
        return None
    _, ny, nx = shape
    pts = np.concatenate([r.edge_map for r, _ in used])
    x0, y0 = np.clip(pts.min(axis=0), 0, (nx - 1, ny - 1))
    x1, y1 = np.clip(pts.max(axis=0), 0, (nx - 1, ny - 1))
    z0, z1 = min(k for _, k in used), max(k for _, k in used)
    crop = np.zeros((z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
    cshape = crop.shape[1:]
    for keep in (True, False):  # all inclusions of every slice first, then the holes
        for r, k in used:
            if r.inclusion != keep:
                continue
            region = fill_contour(r.edge_map - (x0, y0), cshape, include_boundary=keep)
            if keep:
                crop[k - z0] |= region
            else:
                crop[k - z0] &= ~region
    if not crop.any():
        return None
    return (int(z0), int(y0), int(x0)), crop


def reader_nodules(
    message: LidcReadMessage,
    volume: CTVolume,
    sop_to_slice: Mapping[str, int],
    warnings: list[str] | None = None,
) -> list[ReaderNodule]:
    """Place every reader's nodule on the series grid.

    Args:
        message: the parsed XML.
        volume: the CT series (its geometry).
        sop_to_slice: from :func:`slice_sop_uids`.
        warnings: problems (unplaceable rois, contours off the grid) are appended here.

    Returns:
        Contoured nodules (with masks) and < 3 mm point marks (``mask=None``), in file order.
    """
    warnings = warnings if warnings is not None else []
    slice_z = _slice_z(volume)
    tol = 0.5 * volume.spacing[0] + 1e-3
    nz, ny, nx = volume.shape
    out: list[ReaderNodule] = []
    for sess in message.sessions:
        for nod in sess.nodules:
            where = f"{message.path.name}: reader {sess.index} nodule {nod.nodule_id!r}"
            slices = [roi_slice(r, sop_to_slice, slice_z, tol) for r in nod.rois]
            if any(k is None for k in slices):
                warnings.append(f"{where}: {slices.count(None)} roi(s) match no slice of the series, ignored")
            pts = np.concatenate([r.edge_map for r in nod.rois])
            if np.any(pts < 0) or np.any(pts[:, 0] >= nx) or np.any(pts[:, 1] >= ny):
                warnings.append(f"{where}: edge map outside the {ny}x{nx} image, clipped")
            common: dict[str, Any] = {
                "reader": sess.index,
                "reader_id": sess.reader_id,
                "nodule_id": nod.nodule_id,
                "characteristics": dict(nod.characteristics),
            }
            if nod.is_small:
                k = next((s for s in slices if s is not None), None)
                if k is None:
                    continue
                x, y = (float(v) for v in nod.rois[0].edge_map[0])
                zyx = (float(k), y, x)
                lps = volume.voxel_to_lps(np.array(zyx))
                out.append(ReaderNodule(centroid_zyx=zyx, centroid_lps=lps, **common))
                continue
            placed = _rasterize_nodule(nod, volume.shape, slices)
            if placed is None:
                warnings.append(f"{where}: empty mask after rasterisation, ignored")
                continue
            offset, crop = placed
            m = measure_nodule(crop, volume.spacing)
            zyx = tuple(float(c + o) for c, o in zip(m.centroid_zyx, offset, strict=True))
            out.append(
                ReaderNodule(
                    centroid_zyx=zyx,  # type: ignore[arg-type]
                    centroid_lps=volume.voxel_to_lps(np.array(zyx)),
                    longest_diameter_mm=m.longest_diameter_mm,
                    offset=offset,
                    mask=crop,
                    **common,
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Clustering and consensus
# ----------------------------------------------------------------------------------------------


def cluster_nodules(
    centroids_mm: np.ndarray,
    readers: Sequence[int],
    diameters_mm: Sequence[float],
    *,
    min_distance_mm: float = CLUSTER_MIN_DISTANCE_MM,
) -> list[list[int]]:
    """Group readers' nodules that are the same nodule (greedy agglomerative clustering).

    The closest pair of clusters is merged while the distance between their mean centroids is below
    ``max(min_distance_mm, half the larger diameter of their members)`` and no reader is in both.

    Args:
        centroids_mm: ``(N, 3)`` centroids in mm.
        readers: ``(N,)`` reader of each nodule.
        diameters_mm: ``(N,)`` longest diameter of each nodule (0 for points).
        min_distance_mm: the distance threshold for small nodules.

    Returns:
        Clusters as sorted lists of indices into the inputs, ordered by their first index.
    """
    pts = np.asarray(centroids_mm, dtype=np.float64).reshape(-1, 3)
    clusters: list[list[int]] = [[i] for i in range(len(pts))]
    while True:
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                ca, cb = clusters[a], clusters[b]
                if {readers[i] for i in ca} & {readers[i] for i in cb}:
                    continue
                d = float(np.linalg.norm(pts[ca].mean(axis=0) - pts[cb].mean(axis=0)))
                thr = max(min_distance_mm, 0.5 * max(float(diameters_mm[i]) for i in ca + cb))
                if d < thr and (best is None or d < best[0]):
                    best = (d, a, b)
        if best is None:
            break
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


def consensus_mask(masks: Sequence[np.ndarray], min_fraction: float = CONSENSUS_FRACTION) -> np.ndarray:
    """Voxels included by at least ``min_fraction`` of the readers.

    Args:
        masks: one boolean mask per reader, all of the same shape ``(Z, Y, X)``.
        min_fraction: e.g. 0.5: 2 of 3 or 2 of 4 readers, 1 of 2.

    Returns:
        ``(Z, Y, X)`` boolean consensus mask.
    """
    if not masks:
        raise ValueError("consensus_mask needs at least one reader mask")
    count = np.sum([np.asarray(m, dtype=bool) for m in masks], axis=0, dtype=np.int32)
    need = max(1, math.ceil(min_fraction * len(masks) - 1e-9))
    return count >= need


def _union_crops(members: Sequence[ReaderNodule]) -> tuple[tuple[int, int, int], list[np.ndarray]]:
    """Paste the members' crops into their common bounding box."""
    lo = np.min([m.offset for m in members], axis=0)
    hi = np.max([np.add(m.offset, m.mask.shape) for m in members if m.mask is not None], axis=0)
    out = []
    for m in members:
        assert m.mask is not None
        full = np.zeros(tuple(hi - lo), dtype=bool)
        s = tuple(slice(o - lo_, o - lo_ + n) for o, lo_, n in zip(m.offset, lo, m.mask.shape, strict=True))
        full[s] = m.mask
        out.append(full)
    return (int(lo[0]), int(lo[1]), int(lo[2])), out


def texture_to_type(mean_texture: float) -> str:
    """Nodule type from the mean LIDC texture rating (convention, not an ACR rule).

    The mean is rounded half up: 1-2 non_solid, 3 part_solid, 4-5 solid.
    """
    r = math.floor(mean_texture + 0.5)
    return "non_solid" if r <= 2 else "part_solid" if r == 3 else "solid"


@dataclass(frozen=True)
class ClusterRatings:
    """Readers' characteristics summarised over a cluster (None when no reader rated it).

    Attributes:
        n_rated: readers of the cluster with at least one rating.
        malignancy_score: mean malignancy rating 1-5.
        texture_mean: mean texture rating 1-5.
        type: from :func:`texture_to_type`.
        spiculation: 1 when the mean spiculation rating >= 3.
        lobulation_mean: mean lobulation rating.
        margin: spiculated / lobulated / smooth.
        calcification: 1 when most raters chose a calcified pattern (1-5), 0 when most chose 6.
        benign_pattern: most raters chose popcorn, laminated, solid or central calcification.
    """

    n_rated: int
    malignancy_score: float | None
    texture_mean: float | None
    type: str | None
    spiculation: int | None
    lobulation_mean: float | None
    margin: str | None
    calcification: int | None
    benign_pattern: bool


def summarize_ratings(characteristics: Sequence[Mapping[str, int]]) -> ClusterRatings:
    """Average the readers' LIDC ratings of one nodule (see the module conventions).

    Args:
        characteristics: one dict of ratings per reader (missing ratings are skipped).
    """

    def mean(name: str) -> float | None:
        vals = [c[name] for c in characteristics if name in c]
        return float(np.mean(vals)) if vals else None

    malig, tex, spic, lob = mean("malignancy"), mean("texture"), mean("spiculation"), mean("lobulation")
    calc = [c["calcification"] for c in characteristics if "calcification" in c]
    calcified = sum(1 for v in calc if v <= 5)
    benign = sum(1 for v in calc if v in (1, 2, 3, 5))
    margin = None
    if spic is not None or lob is not None:
        margin = "spiculated" if (spic or 0) >= 3 else "lobulated" if (lob or 0) >= 3 else "smooth"
    return ClusterRatings(
        n_rated=sum(1 for c in characteristics if c),
        malignancy_score=malig,
        texture_mean=tex,
        type=texture_to_type(tex) if tex is not None else None,
        spiculation=None if spic is None else int(spic >= 3),
        lobulation_mean=lob,
        margin=margin,
        calcification=None if not calc else int(2 * calcified > len(calc)),
        benign_pattern=bool(calc) and 2 * benign > len(calc),
    )


@dataclass
class ConsensusNodule:
    """A nodule >= 3 mm agreed on by the readers who marked it.

    Attributes:
        nodule_id: value in the label map (1 = largest).
        measurement: consensus-mask measurement (centroid and slice index in volume voxels).
        centroid_lps: ``(3,)`` LPS mm.
        n_readers: readers who marked it.
        reader_ids: their ``servicingRadiologistID``.
        reader_nodule_ids: their ``noduleID``.
        ratings: the averaged characteristics.
        solid_component_mm: solid part (part_solid), the mean diameter (solid) or 0 (non_solid).
        lung_rads: baseline Lung-RADS category ("" when not available).
        offset: ``(z0, y0, x0)`` of ``mask``.
        mask: ``(dz, dy, dx)`` consensus crop.
    """

    nodule_id: int
    measurement: NoduleMeasurement
    centroid_lps: np.ndarray
    n_readers: int
    reader_ids: list[str]
    reader_nodule_ids: list[str]
    ratings: ClusterRatings
    solid_component_mm: float | None
    lung_rads: str = ""
    offset: tuple[int, int, int] = (0, 0, 0)
    mask: np.ndarray | None = field(default=None, repr=False)

    def label_row(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        """Its ``level="nodule"`` row of labels.csv."""
        m, r = self.measurement, self.ratings
        return {
            "study_uid": study_uid,
            "level": "nodule",
            "series_uid": series_uid,
            "nodule_id": self.nodule_id,
            "centroid_x_mm": round(float(self.centroid_lps[0]), 2),
            "centroid_y_mm": round(float(self.centroid_lps[1]), 2),
            "centroid_z_mm": round(float(self.centroid_lps[2]), 2),
            "longest_diameter_mm": m.longest_diameter_mm,
            "short_axis_mm": m.short_axis_mm,
            "mean_diameter_mm": m.mean_diameter_mm,
            "volume_mm3": m.volume_mm3,
            "type": r.type,
            "solid_component_mm": self.solid_component_mm,
            "margin": r.margin,
            "spiculation": r.spiculation,
            "calcification": r.calcification,
            "context": "baseline",
            "n_readers": self.n_readers,
            "malignancy_score": None if r.malignancy_score is None else round(r.malignancy_score, 2),
            "lung_rads": self.lung_rads or None,
        }


def _lung_rads_module() -> Any:
    try:
        from lungvl_model.clinical import lung_rads
    except ImportError:
        return None
    return lung_rads


def nodule_lung_rads(nod: ConsensusNodule, warnings: list[str] | None = None) -> str:
    """Baseline Lung-RADS category of a consensus nodule, "" when unavailable or not covered."""
    lr = _lung_rads_module()
    if lr is None or nod.ratings.type is None:
        return ""
    comp = nod.solid_component_mm if nod.ratings.type == "part_solid" else None
    if comp is not None:
        comp = min(comp, nod.measurement.mean_diameter_mm)
    try:
        finding = lr.NoduleFinding(
            nod.ratings.type,
            nod.measurement.mean_diameter_mm,
            solid_component_mm=comp if comp else None,
            context="baseline",
            benign_pattern=nod.ratings.benign_pattern,
        )
        return str(lr.categorize_nodule(finding))
    except ValueError as e:
        if warnings is not None:
            warnings.append(f"nodule {nod.nodule_id}: no Lung-RADS category ({e})")
        return ""


def exam_lung_rads(nodules: Sequence[ConsensusNodule]) -> str:
    """Exam category: the most suspicious nodule, "1" with none, "" when a nodule has no category."""
    lr = _lung_rads_module()
    if lr is None or any(not n.lung_rads for n in nodules):
        return ""
    return str(lr.max_category([n.lung_rads for n in nodules])) if nodules else "1"


@dataclass
class LidcAnnotation:
    """Consensus annotation of one series.

    Attributes:
        nodules: consensus nodules >= 3 mm, largest first (``nodule_id`` 1, 2, ...).
        label_map: ``(Z, Y, X)`` uint8, 0 background, k = nodule k.
        n_readers: reading sessions in the file.
        n_small: clusters of < 3 mm point marks away from every consensus nodule.
        warnings: tolerated problems.
    """

    nodules: list[ConsensusNodule]
    label_map: np.ndarray = field(repr=False)
    n_readers: int
    n_small: int = 0
    warnings: list[str] = field(default_factory=list)


def annotate_series(
    message: LidcReadMessage,
    volume: CTVolume,
    sop_to_slice: Mapping[str, int],
    *,
    min_fraction: float = CONSENSUS_FRACTION,
) -> LidcAnnotation:
    """Consensus nodules and label map of one series from its reader annotations.

    Args:
        message: the parsed XML.
        volume: the series.
        sop_to_slice: from :func:`slice_sop_uids`.
        min_fraction: consensus fraction (see :func:`consensus_mask`).

    Returns:
        The annotation.
    """
    warnings = list(message.warnings)
    marks = reader_nodules(message, volume, sop_to_slice, warnings)
    big = [m for m in marks if not m.is_small]
    small = [m for m in marks if m.is_small]
    found: list[ConsensusNodule] = []
    for cl in cluster_nodules(
        np.array([m.centroid_lps for m in big]).reshape(-1, 3),
        [m.reader for m in big],
        [m.longest_diameter_mm for m in big],
    ):
        members = [big[i] for i in cl]
        offset, crops = _union_crops(members)
        mask = consensus_mask(crops, min_fraction)
        if not mask.any():
            warnings.append(f"readers' nodules {[m.nodule_id for m in members]}: empty consensus, ignored")
            continue
        m = measure_nodule(mask, volume.spacing)
        zyx = tuple(float(c + o) for c, o in zip(m.centroid_zyx, offset, strict=True))
        m = dataclasses.replace(m, centroid_zyx=zyx, slice_index=m.slice_index + offset[0])
        ratings = summarize_ratings([mm.characteristics for mm in members])
        comp: float | None = None
        if ratings.type == "part_solid":
            box = tuple(slice(o, o + n) for o, n in zip(offset, mask.shape, strict=True))
            comp = solid_component_mm(volume.hu[box], mask, volume.spacing)
        elif ratings.type == "solid":
            comp = m.mean_diameter_mm
        elif ratings.type == "non_solid":
            comp = 0.0
        found.append(
            ConsensusNodule(
                nodule_id=0,
                measurement=m,
                centroid_lps=volume.voxel_to_lps(np.array(zyx)),
                n_readers=len(members),
                reader_ids=[mm.reader_id for mm in members],
                reader_nodule_ids=[mm.nodule_id for mm in members],
                ratings=ratings,
                solid_component_mm=comp,
                offset=offset,
                mask=mask,
            )
        )
    found.sort(key=lambda n: (-n.measurement.volume_mm3, -n.measurement.longest_diameter_mm))
    if len(found) > 255:
        raise ValueError(f"{message.path}: {len(found)} nodules do not fit a uint8 label map")
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    for k, nod in enumerate(found, start=1):
        nod.nodule_id = k
        nod.lung_rads = nodule_lung_rads(nod, warnings)
        assert nod.mask is not None
        box = tuple(slice(o, o + n) for o, n in zip(nod.offset, nod.mask.shape, strict=True))
        view = label_map[box]
        view[nod.mask & (view == 0)] = k
    n_small = 0
    small_pts = np.array([m.centroid_lps for m in small]).reshape(-1, 3)
    for cl in cluster_nodules(small_pts, [m.reader for m in small], [0.0] * len(small)):
        c = small_pts[cl].mean(axis=0)
        near = any(
            np.linalg.norm(c - n.centroid_lps) < max(CLUSTER_MIN_DISTANCE_MM, n.measurement.longest_diameter_mm / 2)
            for n in found
        )
        n_small += not near
    return LidcAnnotation(found, label_map, len(message.sessions), n_small, warnings)

"""Pulmonary vessel and airway trees, and the tube renderer they share with nodule spicules.

Each lung's tree fills its territory (random points in the lung): a branch runs from the hilum
toward the centroid of the points it serves and splits them in two across their principal axis
(space-filling, asymmetric binary tree; radius from the number of points served, Murray-like).
Bronchi run beside the arteries thicker than 1.6 mm, plus the trachea and main bronchi. Everything is
in patient-frame millimetres, independent of any grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import AnatomyParams, Grid, hilum_points, lobes_at, lung_bbox

#: Columns of a segment array: start (z, y, x), end (z, y, x), radius at start, radius at end.
SEGMENT_COLUMNS = ("z0", "y0", "x0", "z1", "y1", "x1", "r0", "r1")


@dataclass(frozen=True)
class Trees:
    """Vessel and airway segments of one patient.

    Attributes:
        vessels: ``(N, 8)`` segments (see :data:`SEGMENT_COLUMNS`).
        airways: ``(M, 8)`` airway lumens.
        airway_wall: ``(M,)`` wall thickness of each airway segment (mm).
    """

    vessels: np.ndarray
    airways: np.ndarray
    airway_wall: np.ndarray


def _grow_side(
    pts: np.ndarray,
    hilum: np.ndarray,
    r0: float,
    rng: np.random.Generator,
    with_airways: bool = True,
    airway_offset: np.ndarray | None = None,
) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Space-filling tree over the territory ``pts`` ``(N, 3)`` rooted at ``hilum``.

    A branch runs from its start part of the way toward the centroid of its territory, then the
    territory is cut by a plane across its principal axis at a random quantile and each part gets a
    child. Radii follow ``r0 * (n / N) ** 0.37`` (n = points served), so a leaf serving one point is
    about ``r0 / 15``. Bronchi follow branches thicker than 1.6 mm (when ``with_airways``), displaced sideways
    by a per-node offset so that consecutive airway segments stay connected; ``airway_offset`` places
    the root bronchus beside (not inside) the root artery.
    """
    n_total = len(pts)
    vessels: list[list[float]] = []
    airways: list[list[float]] = []
    walls: list[float] = []
    zero = np.zeros(3)
    off_root = zero if airway_offset is None else np.asarray(airway_offset, np.float64)
    stack: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(hilum, np.arange(n_total), off_root)]
    while stack:
        start, idx, off0 = stack.pop()
        p = pts[idx]
        n = len(idx)
        c = p.mean(axis=0)
        r = r0 * (n / n_total) ** 0.37
        frac = 1.0 if n <= 2 else rng.uniform(0.35, 0.6)
        end = start + frac * (c - start)
        vessels.append([*start, *end, r, 0.93 * r])
        if with_airways and r >= 1.6:
            d = end - start
            side = np.cross(d, rng.normal(size=3))
            off1 = side / max(np.linalg.norm(side), 1e-9) * (1.9 * r + 1.0)
            ra = 0.8 * r
            airways.append([*(start + off0), *(end + off1), ra, 0.93 * ra])
            walls.append(max(0.7, 0.22 * ra))
        else:
            off1 = zero
        if n <= 2:
            continue
        q = p - c
        if n > 24:
            axis = np.linalg.eigh(q.T @ q)[1][:, -1]
        else:  # small territories: the axis of largest extent is close enough and much cheaper
            axis = np.eye(3)[int(np.argmax(np.ptp(q, axis=0)))]
        proj = q @ (axis + 0.35 * rng.normal(size=3))
        cut = np.sort(proj)[min(n - 2, max(0, int(rng.uniform(0.3, 0.7) * n)))]
        left = proj <= cut
        if left.all() or not left.any():
            continue
        stack.append((end, idx[left], off1))
        stack.append((end, idx[~left], off1))
    return vessels, airways, walls


def grow_trees(a: AnatomyParams, n_points: int = 4000, r_hilum: float = 6.5) -> Trees:
    """Grow the vessel and airway trees of a patient (deterministic in ``a.tree_seed``).

    Each lung gets a pulmonary-artery tree rooted where the right/left pulmonary artery of
    :func:`~.anatomy.great_vessels` enters the lung and a pulmonary-vein tree rooted at the inferior
    pulmonary vein (:func:`~.anatomy.hilum_points`), each filling the whole lung with half of the
    territory points, so the largest intrapulmonary vessels at the hilum are ``2 * r_hilum * s`` mm
    (about 11-14 mm; ``s = cav_ax / 118``) and taper to sub-millimetre branches at the periphery. The
    bronchi follow the arteries (bronchovascular bundles); the trachea and main bronchi join them.

    Args:
        a: anatomy.
        n_points: territory points per lung (about ``2 * n_points`` vessel segments per lung).
        r_hilum: radius (mm) of the first branch at each hilum (scaled with the patient).

    Returns:
        The trees.
    """
    rng = np.random.default_rng(a.tree_seed)
    scale = a.cav_ax / 118.0
    lo, hi = lung_bbox(a)
    cand = rng.uniform(lo, hi, size=(12 * n_points, 3))
    lob = lobes_at(a, cand)
    hila = hilum_points(a)
    ves: list[list[float]] = []
    air: list[list[float]] = []
    wall: list[float] = []
    yt = a.cav_yc + 0.42 * a.cav_ay
    tr = 8.0 * scale
    air.append([a.z_extent + 5.0, yt, 0.0, a.carina_z, yt, 0.0, tr, tr])
    wall.append(1.8)
    half = max(2, n_points // 2)
    for side, codes, rb, key in ((-1.0, (1, 2, 3), 5.6, "r"), (1.0, (4, 5), 5.0, "l")):
        pts = cand[np.isin(lob, codes)][: 2 * half]
        bronchus = np.array([-12.0, 9.0, 0.0]) * scale  # main bronchus below and behind the pulmonary artery
        v, aw, w = _grow_side(pts[0::2], hila["artery_" + key], r_hilum * scale, rng, airway_offset=bronchus)
        vv, _, _ = _grow_side(pts[1::2], hila["vein_" + key], r_hilum * scale, rng, with_airways=False)
        ves += v + vv
        air.append([a.carina_z, yt, side * tr * 0.5, *aw[0][:3], rb * scale, aw[0][6]])
        wall.append(1.5)
        air += aw
        wall += w
    return Trees(vessels=np.asarray(ves, np.float64), airways=np.asarray(air, np.float64), airway_wall=np.asarray(wall))


def render_tubes(
    occ: np.ndarray, grid: Grid, segs: np.ndarray, pad: float | np.ndarray = 0.0, min_radius: float = 0.25
) -> None:
    """Max-composite the partial-volume occupancy of tapered tubes (capsules) into ``occ``.

    Occupancy is a linear ramp one voxel wide around the tube surface; tubes thinner than a voxel
    get a peak occupancy scaled by ``(2 r / h)²`` so that their partial-volume signal stays realistic.

    Args:
        occ: ``(Z, Y, X)`` float32 occupancy in ``[0, 1]``, updated in place.
        grid: the grid of ``occ``.
        segs: ``(N, 8)`` segments (see :data:`SEGMENT_COLUMNS`).
        pad: added to every radius (mm), e.g. an airway wall thickness; may be an ``(N,)`` array.
        min_radius: tubes thinner than this (mm) are skipped (their signal is below the noise).
    """
    if len(segs) == 0:
        return
    sp = np.asarray(grid.spacing)
    first = np.asarray(grid.first)
    shape = np.asarray(grid.shape)
    h = float(np.prod(sp) ** (1.0 / 3.0))
    pads = np.broadcast_to(np.asarray(pad, np.float64), (len(segs),))
    for s, pd in zip(segs, pads, strict=True):
        p0, p1 = s[0:3], s[3:6]
        r0, r1 = s[6] + pd, s[7] + pd
        if max(r0, r1) < min_radius:
            continue
        rmax = max(r0, r1) + h
        lo = np.floor((np.minimum(p0, p1) - rmax - first) / sp).astype(int)
        hi = np.ceil((np.maximum(p0, p1) + rmax - first) / sp).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, shape)
        if np.any(hi <= lo):
            continue
        zc = (first[0] + sp[0] * np.arange(lo[0], hi[0]) - p0[0]).astype(np.float32)[:, None, None]
        yc = (first[1] + sp[1] * np.arange(lo[1], hi[1]) - p0[1]).astype(np.float32)[None, :, None]
        xc = (first[2] + sp[2] * np.arange(lo[2], hi[2]) - p0[2]).astype(np.float32)[None, None, :]
        d = (p1 - p0).astype(np.float32)
        l2 = float(d @ d) or 1e-9
        t = np.clip((zc * d[0] + yc * d[1] + xc * d[2]) / l2, 0.0, 1.0)
        dist = np.sqrt((zc - t * d[0]) ** 2 + (yc - t * d[1]) ** 2 + (xc - t * d[2]) ** 2)
        r = r0 + (r1 - r0) * t
        o = np.clip(0.5 - (dist - r) / h, 0.0, 1.0) * np.minimum(1.0, 2.0 * r / h) ** 2
        view = occ[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(view, o, out=view)


def splat_tubes(occ: np.ndarray, grid: Grid, segs: np.ndarray, step_mm: float = 0.5) -> None:
    """Max-composite thin tubes into ``occ`` by mass-conserving point splatting (fast, vectorised).

    Each segment is sampled every ``step_mm``; every sample deposits its tube volume (``pi r² step``)
    as a fraction of a voxel at the nearest voxel, and the deposit is blurred by a 0.7-voxel Gaussian
    (the partial-volume spread of a sub-voxel tube). Meant for tubes thinner than about a voxel.

    Args:
        occ: ``(Z, Y, X)`` float32 occupancy, updated in place.
        grid: its grid.
        segs: ``(N, 8)`` segments.
        step_mm: sampling step along the centre line.
    """
    if len(segs) == 0:
        return
    p0, p1 = segs[:, 0:3], segs[:, 3:6]
    length = np.linalg.norm(p1 - p0, axis=1)
    n = np.maximum(1, np.ceil(length / step_mm).astype(int))
    seg = np.repeat(np.arange(len(segs)), n)
    t = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + 0.5) / n[seg]
    pts = p0[seg] + t[:, None] * (p1 - p0)[seg]
    r = segs[seg, 6] + t * (segs[seg, 7] - segs[seg, 6])
    w = np.pi * r**2 * (length / n)[seg] / float(np.prod(grid.spacing))
    idx = np.rint(grid.to_index(pts)).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.asarray(grid.shape)), axis=1)
    if not ok.any():
        return
    idx, w = idx[ok], w[ok]
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    lo = np.maximum(lo - 3, 0)
    hi = np.minimum(hi + 3, grid.shape)
    shape = tuple(int(v) for v in hi - lo)
    flat = np.ravel_multi_index(tuple((idx - lo).T), shape)
    acc = np.bincount(flat, weights=w, minlength=int(np.prod(shape))).astype(np.float32).reshape(shape)
    acc = ndimage.gaussian_filter(acc, 0.7, truncate=2.5)
    np.minimum(acc, 1.0, out=acc)
    view = occ[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    np.maximum(view, acc, out=view)

"""Analytic thorax geometry of a synthetic patient: the grid, the anatomy parameters, lungs and lobes.

All geometry lives in a *patient frame* in millimetres with the LPS axes of DICOM: ``x`` toward the
patient's left, ``y`` posterior, ``z`` superior; ``x = 0`` is the midline and the scanned range is
``0 <= z <= z_extent``. The patient's right lung is at ``x < 0``. Because the anatomy is analytic
(ellipses, fissure planes, periodic ribs), every predicate can be evaluated on any grid or at any set
of points, so a prior and a current study of one patient (different slice thickness, different table
position) show the same person, and nodules can be placed without rendering a volume.

Shapes: coordinate arguments broadcast against each other; on a grid they are ``(Z, 1, 1)``,
``(1, Y, 1)``, ``(1, 1, X)`` and results are ``(Z, Y, X)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lungvl_model.data.site_layout import LOBE_LABELS

#: Gap (mm) between the lung surface and the inner chest wall (pleura).
PLEURA_MM = 1.5


@dataclass(frozen=True)
class Grid:
    """A regular axial grid in the patient frame.

    Attributes:
        shape: ``(Z, Y, X)``.
        spacing: ``(sz, sy, sx)`` mm.
        first: patient-frame position ``(z, y, x)`` (mm) of the centre of voxel ``(0, 0, 0)``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    first: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 coordinates ``(Z, 1, 1)``, ``(1, Y, 1)``, ``(1, 1, X)`` in mm."""
        out = []
        for ax in range(3):
            c = self.first[ax] + self.spacing[ax] * np.arange(self.shape[ax], dtype=np.float64)
            shp = [1, 1, 1]
            shp[ax] = self.shape[ax]
            out.append(c.astype(np.float32).reshape(shp))
        return out[0], out[1], out[2]

    def to_index(self, zyx_mm: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of patient-frame points ``(..., 3)`` in ``(z, y, x)`` order."""
        return (np.asarray(zyx_mm, np.float64) - np.asarray(self.first)) / np.asarray(self.spacing)

    def to_mm(self, zyx_idx: np.ndarray) -> np.ndarray:
        """Patient-frame mm of (fractional) voxel indices ``(..., 3)``."""
        return np.asarray(zyx_idx, np.float64) * np.asarray(self.spacing) + np.asarray(self.first)


def make_grid(matrix: int, fov_mm: float, z_extent_mm: float, slice_mm: float, sub: int = 1) -> Grid:
    """Axial grid covering ``[-fov/2, fov/2]²`` in-plane and ``[0, z_extent]`` along z.

    Args:
        matrix: pixels per row and column.
        fov_mm: field of view (mm).
        z_extent_mm: scanned length (mm).
        slice_mm: slice spacing of the output series (mm).
        sub: sub-slices per output slice (partial-volume rendering); slice ``i`` of the output is the
            mean of fine slices ``i*sub ... i*sub+sub-1``.

    Returns:
        The grid (``Z = n_slices * sub``).
    """
    px = fov_mm / matrix
    n = max(1, int(round(z_extent_mm / slice_mm)))
    dz = slice_mm / sub
    return Grid(
        shape=(n * sub, matrix, matrix),
        spacing=(dz, px, px),
        first=(dz / 2, -fov_mm / 2 + px / 2, -fov_mm / 2 + px / 2),
    )


@dataclass(frozen=True)
class AnatomyParams:
    """Size and shape of one synthetic thorax (all mm unless stated).

    Attributes:
        z_extent: scanned length.
        base: lowest lung level (diaphragm at its lateral recesses).
        apex: highest lung level.
        cav_ax: lateral semi-axis of the thoracic cavity (inner chest wall) at its widest.
        cav_ay: antero-posterior semi-axis of the cavity.
        cav_yc: y of the cavity centre.
        wall: chest-wall muscle thickness (ribs lie in it).
        fat: subcutaneous fat thickness.
        back_extra: extra posterior body depth (paraspinal muscles).
        dome: height of the diaphragm dome above ``base``; the right one is ``right_dome`` higher.
        right_dome: extra height of the right hemidiaphragm (liver).
        apex_drop: how much lower the apex is laterally.
        med_hw: half-width of the mediastinum.
        heart: heart ellipsoid ``(x, y, z, ax, ay, az)``.
        carina_z: level of the carina.
        vert_y: y of the vertebral-body centre.
        vert_r: vertebral-body radius.
        vert_period: vertebral height including the disc.
        rib_period: rib spacing along z.
        rib_slope: how much lower a rib's anterior end is than its posterior end (mm).
        rib_phase: z offset of the rib pattern.
        rib_height: rib height along z.
        rib_depth: rib thickness (radial).
        r_oblique: right oblique fissure ``(level, slope)`` as fractions of lung height.
        r_horizontal: right horizontal fissure level (fraction of lung height).
        l_oblique: left oblique fissure ``(level, slope)``.
        fissure_curve: curvature of the oblique fissures along x.
        lung_hu: mean parenchyma HU.
        lung_gradient: dependent-density gradient (HU from anterior to posterior edge, supine).
        tree_seed: seed of the vessel/airway tree and of emphysema holes.
    """

    z_extent: float
    base: float
    apex: float
    cav_ax: float
    cav_ay: float
    cav_yc: float
    wall: float
    fat: float
    back_extra: float
    dome: float
    right_dome: float
    apex_drop: float
    med_hw: float
    heart: tuple[float, float, float, float, float, float]
    carina_z: float
    vert_y: float
    vert_r: float
    vert_period: float
    rib_period: float
    rib_slope: float
    rib_phase: float
    rib_height: float
    rib_depth: float
    r_oblique: tuple[float, float]
    r_horizontal: float
    l_oblique: tuple[float, float]
    fissure_curve: float
    lung_hu: float
    lung_gradient: float
    tree_seed: int

    @property
    def height(self) -> float:
        """Lung height ``apex - base``."""
        return self.apex - self.base


def sample_anatomy(rng: np.random.Generator, z_extent_mm: float, fov_mm: float, female: bool) -> AnatomyParams:
    """Draw a thorax that fits the field of view and the scanned length.

    Args:
        rng: random generator (the patient's anatomy stream).
        z_extent_mm: scanned length; the lungs span about 80-90 % of it.
        fov_mm: in-plane field of view; the body is shrunk to fit inside 94 % of it.
        female: sex (women are smaller on average).

    Returns:
        The parameters.
    """
    u = rng.uniform
    size = u(0.88, 1.0) if female else u(0.95, 1.08)
    cav_ax, cav_ay = 118.0 * size * u(0.93, 1.07), 82.0 * size * u(0.92, 1.08)
    wall, fat, back = u(14.0, 20.0), u(5.0, 28.0) * (1.2 if female else 1.0), u(30.0, 38.0)
    half_w = cav_ax + wall + fat
    half_ap = cav_ay + wall + fat + back / 2
    fit = min(1.0, 0.47 * fov_mm / max(half_w, half_ap))
    cav_ax, cav_ay, wall, fat, back = (v * fit for v in (cav_ax, cav_ay, wall, fat, back))
    base = z_extent_mm * u(0.05, 0.10)
    apex = z_extent_mm * u(0.92, 0.97)
    h = apex - base
    cav_yc = -u(4.0, 10.0) * fit
    heart = (
        u(12.0, 22.0) * fit,
        cav_yc - 0.32 * cav_ay,
        base + u(0.18, 0.26) * h,
        0.46 * cav_ax * u(0.9, 1.1),
        0.52 * cav_ay * u(0.9, 1.1),
        0.26 * h * u(0.9, 1.1),
    )
    vert_r = u(15.0, 18.5) * fit
    return AnatomyParams(
        z_extent=float(z_extent_mm),
        base=base,
        apex=apex,
        cav_ax=cav_ax,
        cav_ay=cav_ay,
        cav_yc=cav_yc,
        wall=wall,
        fat=fat,
        back_extra=back,
        dome=u(0.14, 0.22) * h,
        right_dome=u(0.03, 0.07) * h,
        apex_drop=u(0.06, 0.12) * h,
        med_hw=u(19.0, 25.0) * fit,
        heart=heart,
        carina_z=base + u(0.58, 0.66) * h,
        vert_y=cav_yc + cav_ay + 0.1 * vert_r,
        vert_r=vert_r,
        vert_period=u(25.0, 30.0) * math.sqrt(fit),
        rib_period=u(26.0, 32.0) * math.sqrt(fit),
        rib_slope=u(60.0, 95.0),
        rib_phase=u(0.0, 30.0),
        rib_height=u(8.0, 11.0),
        rib_depth=u(7.0, 9.5),
        r_oblique=(u(0.40, 0.46), u(0.26, 0.32)),
        r_horizontal=u(0.52, 0.58),
        l_oblique=(u(0.42, 0.48), u(0.26, 0.32)),
        fissure_curve=u(-0.05, 0.05),
        lung_hu=u(-872.0, -848.0),
        lung_gradient=u(30.0, 60.0),
        tree_seed=int(rng.integers(0, 2**31 - 1)),
    )


def taper(a: AnatomyParams, z: np.ndarray) -> np.ndarray:
    """Cavity scale factor along z (1 in the lower chest, about 0.6 at the apex)."""
    t = (np.asarray(z, np.float32) - a.base) / a.height
    s = np.clip((t - 0.45) / 0.55, 0.0, 1.25)
    return np.sqrt(np.clip(1.0 - 0.65 * s * s, 0.15, 1.0)).astype(np.float32)


def cavity(a: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptical radius of the thoracic cavity and the radial depth inside its wall.

    Returns:
        ``(rho, depth)``: ``rho < 1`` inside the cavity; ``depth`` (mm) is the radial distance to the
        cavity boundary, positive inside and negative outside.
    """
    g = taper(a, z)
    cx, cy = a.cav_ax * g, a.cav_ay * g
    dy = y - np.float32(a.cav_yc)
    rho = np.sqrt((x / cx) ** 2 + (dy / cy) ** 2)
    r = np.sqrt(x * x + dy * dy)
    depth = r * (1.0 / np.maximum(rho, 1e-3) - 1.0)
    return rho, depth


def mediastinum_halfwidth(a: AnatomyParams, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Half-width (mm) of the mediastinal band: narrow anteriorly (anterior junction), full behind."""
    yn = (y - np.float32(a.cav_yc)) / (a.cav_ay * taper(a, z))
    return a.med_hw * (0.5 + 0.5 * np.clip((yn + 0.7) / 0.8, 0.0, 1.0))


def diaphragm_z(a: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height (mm) of the diaphragm surface (the lung base) above the point ``(y, x)``.

    Two domes, one under each lung, peaking ``a.dome`` above ``a.base`` half-way out; the right one is
    ``a.right_dome`` higher (liver). ``z`` only sets the cavity size (taper) used to normalise.
    """
    g = taper(a, z)
    cx, cy = a.cav_ax * g, a.cav_ay * g
    yn = (y - np.float32(a.cav_yc)) / cy
    rs2 = ((np.abs(x) - 0.5 * cx) / (0.5 * cx)) ** 2 + yn**2
    return a.base + a.dome * np.maximum(0.0, 1.0 - rs2) + np.where(x < 0, a.right_dome, 0.0)


def _is_grid(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> bool:
    """Whether ``(z, y, x)`` are grid axes shaped ``(Z, 1, 1)``, ``(1, Y, 1)``, ``(1, 1, X)``."""
    if not z.ndim == y.ndim == x.ndim == 3:
        return False
    return z.shape[1:] == (1, 1) and (y.shape[0], y.shape[2]) == (1, 1) and x.shape[:2] == (1, 1)


def _in_box(
    z: np.ndarray, y: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, fn: Callable[..., np.ndarray]
) -> np.ndarray:
    """Evaluate the boolean predicate ``fn(z, y, x)`` inside the ``(z, y, x)`` box ``[lo, hi]`` only.

    Outside the box the result is False. On grid axes ``(Z,1,1), (1,Y,1), (1,1,X)`` the box is cropped first (fast);
    on points the predicate runs everywhere and is masked.
    """
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
    if not _is_grid(z, y, x):
        inb = (z >= lo[0]) & (z <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (x >= lo[2]) & (x <= hi[2])
        return np.broadcast_to(inb, shape) & np.broadcast_to(fn(z, y, x), shape)
    out = np.zeros(shape, bool)
    sl = []
    for ax, c in enumerate((z.ravel(), y.ravel(), x.ravel())):
        idx = np.flatnonzero((c >= lo[ax]) & (c <= hi[ax]))
        if not len(idx):
            return out
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    out[sl[0], sl[1], sl[2]] = fn(z[sl[0]], y[:, sl[1]], x[:, :, sl[2]])
    return out


def heart_rho(a: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Normalised radius of the heart (pericardial surface at 1).

    The ellipsoid ``a.heart`` with a border that changes with z (two angular harmonics whose phase turns along z, so
    the outline against the lung is lobulated differently on each slice, like atria and ventricles).
    """
    hx, hy, hz, hax, hay, haz = a.heart
    dx, dy, dz = x - np.float32(hx), y - np.float32(hy), z - np.float32(hz)
    rho = np.sqrt((dx / hax) ** 2 + (dy / hay) ** 2 + (dz / haz) ** 2)
    th = np.arctan2(dy, dx)
    m = 1.0 + 0.06 * np.cos(2.0 * th + 0.035 * dz + 0.5) + 0.04 * np.cos(3.0 * th - 0.05 * dz)
    return rho / m


def heart_box(a: AnatomyParams) -> tuple[np.ndarray, np.ndarray]:
    """``(z, y, x)`` corners of a box holding the heart (modulation included)."""
    hx, hy, hz, hax, hay, haz = a.heart
    c, r = np.array([hz, hy, hx]), 1.12 * np.array([haz, hay, hax])
    return c - r, c + r


def hilum_points(a: AnatomyParams) -> dict[str, np.ndarray]:
    """Patient-frame ``(z, y, x)`` roots (mm) of the intrapulmonary trees, 4 mm lateral to the mediastinum.

    ``artery_r`` / ``artery_l``: where the right / left pulmonary artery enters the lung (the left one is
    higher: it arches over the left main bronchus); ``vein_r`` / ``vein_l``: the inferior pulmonary
    veins, about 3 cm lower and more posterior, which drain into the left atrium.
    """
    s = a.cav_ax / 118.0
    hz = a.carina_z - 0.06 * a.height
    yh = a.cav_yc + 0.1 * a.cav_ay
    xh = a.med_hw + 4.0
    return {
        "artery_r": np.array([hz, yh, -xh]),
        "artery_l": np.array([hz + 8.0 * s, yh + 8.0 * s, xh]),
        "vein_r": np.array([hz - 28.0 * s, yh + 18.0 * s, -(xh + 2.0)]),
        "vein_l": np.array([hz - 28.0 * s, yh + 18.0 * s, xh + 2.0]),
    }


def _seg(p0: np.ndarray | list[float], p1: np.ndarray | list[float], r0: float, r1: float) -> list[float]:
    return [*map(float, p0), *map(float, p1), float(r0), float(r1)]


@functools.lru_cache(maxsize=64)
def great_vessels(a: AnatomyParams) -> dict[str, np.ndarray]:
    """Mediastinal tubes of a patient: ``name -> (K, 8)`` capsule segments (``vessels.SEGMENT_COLUMNS``).

    Geometry (mm, scaled with the cavity width ``s = cav_ax / 118``; adult CT reference diameters):
    ``aorta`` ascending (diameter 30 s, from the aortic root in the heart, anterior), arch (26 s, peaking
    about 24 s above the carina, passing left of the trachea) and descending (24 s, left-anterior of the
    spine down through the hiatus); ``pulmonary_artery`` trunk (26 s, from the right-ventricular outflow
    up-back-left to a bifurcation 12 s below the carina) and right/left pulmonary arteries (20 s) that end
    at :func:`hilum_points`; ``pulmonary_vein`` inferior veins (14 s) from the venous hila into the left
    atrium; ``svc`` superior vena cava (18 s) right of the trachea into the right atrium; ``esophagus``
    (14 s) behind the trachea.
    """
    s = a.cav_ax / 118.0
    hx, hy, hz, hax, hay, haz = a.heart
    cz, yt = a.carina_z, a.cav_yc + 0.42 * a.cav_ay
    vy, vr = a.vert_y, a.vert_r
    hil = hilum_points(a)
    root = [hz + 0.55 * haz, hy + 0.05 * hay, hx - 0.35 * hax]
    a1 = [cz + 10 * s, yt - 52 * s, -12 * s]
    a2 = [cz + 24 * s, yt - 28 * s, 2 * s]
    a3 = [cz + 22 * s, yt - 6 * s, 20 * s]
    a4 = [cz + 8 * s, yt + 16 * s, 21 * s]
    d0 = [cz - 10 * s, vy - 0.95 * vr - 3.0, 0.85 * vr + 8.0]
    d1 = [a.base - 10.0, vy - 1.1 * vr - 3.0, 0.6 * vr + 6.0]
    aorta = [
        _seg(root, a1, 15 * s, 15 * s),
        _seg(a1, a2, 15 * s, 13 * s),
        _seg(a2, a3, 13 * s, 12.5 * s),
        _seg(a3, a4, 12.5 * s, 12 * s),
        _seg(a4, d0, 12 * s, 12 * s),
        _seg(d0, d1, 12 * s, 11 * s),
    ]
    p0 = [hz + 0.75 * haz, hy - 0.35 * hay, hx - 0.1 * hax]
    p1 = [cz - 12 * s, yt - 28 * s, 10 * s]
    pa = [
        _seg(p0, p1, 13 * s, 12 * s),
        _seg(p1, hil["artery_r"], 10 * s, 7 * s),
        _seg(p1, hil["artery_l"], 10 * s, 7 * s),
    ]
    la = [hz + 0.35 * haz, hy + 0.8 * hay, hx - 0.25 * hax]
    pv = [_seg(la, hil["vein_r"], 7 * s, 6.5 * s), _seg(la, hil["vein_l"], 7 * s, 6.5 * s)]
    ra = [hz + 0.6 * haz, hy + 0.2 * hay, hx - 0.75 * hax]
    svc = [_seg([a.z_extent + 10.0, yt - 20 * s, -20 * s], ra, 9 * s, 9 * s)]
    eso = [_seg([a.z_extent + 10.0, yt + 16 * s, 3 * s], [a.base - 10.0, vy - vr - 6 * s, 8 * s], 7 * s, 7 * s)]
    out = {"aorta": aorta, "pulmonary_artery": pa, "pulmonary_vein": pv, "svc": svc, "esophagus": eso}
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


@functools.lru_cache(maxsize=64)
def mediastinal_nodes(a: AnatomyParams) -> np.ndarray:
    """Normal-sized mediastinal lymph nodes ``(K, 4)`` ``(z, y, x, radius)`` mm in the mediastinal fat.

    Right paratracheal (4R, 10 s), aortopulmonary window (5, 8 s) and subcarinal (7, 10 s) stations (short axis < 10
    mm).
    """
    s = a.cav_ax / 118.0
    cz, yt = a.carina_z, a.cav_yc + 0.42 * a.cav_ay
    return np.array(
        [
            [cz + 15 * s, yt - 4 * s, -17 * s, 5 * s],
            [cz + 6 * s, yt - 18 * s, 16 * s, 4 * s],
            [cz - 18 * s, yt + 2 * s, 3 * s, 5 * s],
        ]
    )


def capsules_mask(z: np.ndarray, y: np.ndarray, x: np.ndarray, segs: np.ndarray, pad: float = 0.0) -> np.ndarray:
    """True within ``radius + pad`` of any capsule of ``segs`` ``(K, 8)``; broadcast shape of the inputs."""
    out = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), bool)
    for sg in segs:
        p0, p1 = sg[0:3], sg[3:6]
        r = max(sg[6], sg[7]) + pad
        d = (p1 - p0).astype(np.float32)
        l2 = float(d @ d) or 1e-9

        def inside(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, p0=p0, d=d, l2=l2, sg=sg) -> np.ndarray:
            dz, dy, dx = zz - np.float32(p0[0]), yy - np.float32(p0[1]), xx - np.float32(p0[2])
            t = np.clip((dz * d[0] + dy * d[1] + dx * d[2]) / l2, 0.0, 1.0)
            rr = sg[6] + (sg[7] - sg[6]) * t + pad
            return (dz - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dx - t * d[2]) ** 2 < rr * rr

        out |= _in_box(z, y, x, np.minimum(p0, p1) - r, np.maximum(p0, p1) + r, inside)
    return out


def mediastinal_structures(a: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray, pad: float) -> np.ndarray:
    """Heart, great vessels, oesophagus and mediastinal nodes, each grown by ``pad`` mm (lung exclusion)."""
    lo, hi = heart_box(a)
    out = _in_box(z, y, x, lo - pad, hi + pad, lambda zz, yy, xx: heart_rho(a, zz, yy, xx) < 1.0 + pad / 40.0)
    for segs in great_vessels(a).values():
        out |= capsules_mask(z, y, x, segs, pad)
    nodes = mediastinal_nodes(a)
    out |= capsules_mask(z, y, x, np.concatenate([nodes, nodes], axis=1)[:, [0, 1, 2, 0, 1, 2, 3, 3]], pad)
    return out


def _mediastinum(a: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    spine = (x / (1.15 * a.vert_r + 5.0)) ** 2 + ((y - a.vert_y) / (a.vert_r + 5.0)) ** 2 < 1.0
    return (np.abs(x) < mediastinum_halfwidth(a, z, y)) | spine | mediastinal_structures(a, z, y, x, 1.0)


def lung_lobes(a: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Lobe code at each point: 0 outside the lungs, else :data:`LOBE_LABELS` (RUL=1 ... LLL=5).

    Right lung: upper/middle/lower lobes split by the oblique fissure (higher posteriorly) and the
    horizontal fissure; left lung: upper (with lingula) and lower lobes split by the oblique fissure.

    Args:
        a: anatomy.
        z: patient-frame z (mm), broadcastable.
        y: y (mm).
        x: x (mm).

    Returns:
        uint8 lobe codes, broadcast shape.
    """
    z, y, x = (np.asarray(v, np.float32) for v in (z, y, x))
    g = taper(a, z)
    cx, cy = a.cav_ax * g, a.cav_ay * g
    rho, depth = cavity(a, z, y, x)
    inside = (depth > PLEURA_MM) & ~_mediastinum(a, z, y, x)
    ax_ = np.abs(x)
    yn = (y - np.float32(a.cav_yc)) / cy
    rs2 = ((ax_ - 0.5 * cx) / (0.5 * cx)) ** 2 + yn**2
    right = x < 0
    dome = diaphragm_z(a, z, y, x)
    inside &= (z > dome) & (z < a.apex - a.apex_drop * np.minimum(1.0, rs2))
    h = a.height
    xn2 = (ax_ / cx) ** 2
    r_obl = a.base + h * (a.r_oblique[0] + a.r_oblique[1] * yn + a.fissure_curve * xn2)
    l_obl = a.base + h * (a.l_oblique[0] + a.l_oblique[1] * yn + a.fissure_curve * xn2)
    r_hor = a.base + h * a.r_horizontal
    code_r = np.where(z < r_obl, LOBE_LABELS["RLL"], np.where(z < r_hor, LOBE_LABELS["RML"], LOBE_LABELS["RUL"]))
    code_l = np.where(z < l_obl, LOBE_LABELS["LLL"], LOBE_LABELS["LUL"])
    code = np.where(right, code_r, code_l)
    return np.where(inside, code, 0).astype(np.uint8)


def lobes_at(a: AnatomyParams, pts_zyx: np.ndarray) -> np.ndarray:
    """Lobe codes at points ``(N, 3)`` given as patient-frame ``(z, y, x)`` mm; returns ``(N,)``."""
    p = np.asarray(pts_zyx, np.float32).reshape(-1, 3)
    return lung_lobes(a, p[:, 0], p[:, 1], p[:, 2])


def lung_bbox(a: AnatomyParams) -> tuple[np.ndarray, np.ndarray]:
    """Patient-frame ``(z, y, x)`` lower and upper corners of a box containing both lungs."""
    lo = np.array([a.base, a.cav_yc - a.cav_ay, -a.cav_ax])
    hi = np.array([a.apex, a.cav_yc + a.cav_ay, a.cav_ax])
    return lo, hi

"""Render the thorax phantom of a patient to Hounsfield units on a grid.

Tissues (HU before scanner noise): air -1000; skin and chest-wall muscle +45; subcutaneous fat -100;
mediastinal fat -90; heart, aorta and liver +40..+58; ribs (cortex +750, marrow +280, costal
cartilage +120) periodic along z and sloping down anteriorly; sternum; vertebral bodies (cortex +650,
cancellous +320, discs +85) with spinal canal and posterior arch; lung parenchyma about -860 with a
dependent (posterior) density gradient and texture; vessels +40 and airways (lumen -1000, wall +45)
from :mod:`.vessels`; optional emphysema (-985) as centrilobular (upper-lobe predominant) or
paraseptal (subpleural) low-attenuation clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import (
    AnatomyParams,
    Grid,
    cavity,
    lobes_at,
    lung_bbox,
    lung_lobes,
    mediastinum_halfwidth,
    taper,
)
from .vessels import Trees, render_tubes, splat_tubes

#: Vessels thinner than this (mm) are splatted rather than drawn as tubes.
THIN_VESSEL_MM = 0.9

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -90.0
HU_MUSCLE = 45.0
HU_SOFT = 40.0
HU_LIVER = 58.0
HU_VESSEL = 40.0
HU_CORTEX = 750.0
HU_MARROW = 280.0
HU_CARTILAGE = 120.0
HU_VERT_CORTEX = 650.0
HU_VERT_CANCELLOUS = 320.0
HU_DISC = 85.0
HU_CSF = 20.0
HU_EMPHYSEMA = -985.0

EMPHYSEMA_KINDS: tuple[str, ...] = ("none", "centrilobular", "paraseptal")
#: Codes of the optional tissue map of :func:`render_anatomy` (index = code).
TISSUES: tuple[str, ...] = (
    "air", "muscle", "fat", "soft_tissue", "mediastinal_fat", "bone", "lung", "emphysema", "vessel", "airway",
)  # fmt: skip


@dataclass(frozen=True)
class EmphysemaSpec:
    """Emphysema of a patient.

    Attributes:
        kind: ``none``, ``centrilobular`` or ``paraseptal``.
        extent: designed fraction of the lung volume that is emphysematous (0-0.3).
    """

    kind: str = "none"
    extent: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in EMPHYSEMA_KINDS:
            raise ValueError(f"EmphysemaSpec.kind must be one of {EMPHYSEMA_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.extent <= 0.5:
            raise ValueError(f"EmphysemaSpec.extent must be in [0, 0.5], got {self.extent}")


def _box(grid: Grid, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice, slice]:
    """Index slices of the grid covering the patient-frame box ``[lo, hi]`` ``(z, y, x)``."""
    i0 = np.floor(grid.to_index(lo_mm)).astype(int)
    i1 = np.ceil(grid.to_index(hi_mm)).astype(int) + 1
    i0 = np.clip(i0, 0, grid.shape)
    i1 = np.clip(i1, 0, grid.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1, strict=True))  # type: ignore[return-value]


def _sub_axes(grid: Grid, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = grid.axes()
    return z[box[0]], y[:, box[1]], x[:, :, box[2]]


def lobe_map(a: AnatomyParams, grid: Grid) -> np.ndarray:
    """Lobe codes on a grid, ``(Z, Y, X)`` uint8 (0 outside the lungs)."""
    out = np.zeros(grid.shape, np.uint8)
    lo, hi = lung_bbox(a)
    box = _box(grid, lo - 2.0, hi + 2.0)
    out[box] = lung_lobes(a, *_sub_axes(grid, box))
    return out


def texture(grid: Grid, rng: np.random.Generator, corr_mm: float = 1.8) -> np.ndarray:
    """Unit-variance smooth random field ``(Z, Y, X)`` float32 (correlation length ``corr_mm``)."""
    white = rng.standard_normal(grid.shape, dtype=np.float32)
    sig = [max(0.3, corr_mm / s) for s in grid.spacing]
    field = ndimage.gaussian_filter(white, sig, truncate=3.0)
    field /= max(float(field.std()), 1e-6)
    return field


def _bones(
    a: AnatomyParams, grid: Grid, hu: np.ndarray, depth_c: np.ndarray, body: np.ndarray, tex: np.ndarray
) -> None:
    z, y, x = grid.axes()
    g = taper(a, z)
    cy = a.cav_ay * g
    # ribs: an elliptical tube just outside the cavity, repeating along z; each rib descends from
    # its posterior end to its anterior end (angle theta around the chest), so a slice cuts arcs
    out = -depth_c
    zlim = (z > a.base - 0.08 * a.height) & (z < a.apex + 0.03 * a.height)
    zone = body & (out > 0.3) & (out < a.rib_depth + 0.7) & zlim
    iz, iy, ix = np.nonzero(zone)
    zz, yy, xx = z.ravel()[iz], y.ravel()[iy], x.ravel()[ix]
    gg = g.ravel()[iz]
    o = out[iz, iy, ix]
    yn1 = np.clip((yy - a.cav_yc) / (a.cav_ay * gg), -1.0, 1.0)
    theta = np.arctan2(np.abs(xx) / (a.cav_ax * gg), yn1) / np.float32(np.pi)  # 0 posterior ... 1 anterior
    phase = np.mod(zz + a.rib_slope * theta**1.2 - a.rib_phase, a.rib_period) - a.rib_period / 2
    q2 = ((o - 0.5 - a.rib_depth / 2) / (a.rib_depth / 2)) ** 2 + (phase / (a.rib_height / 2)) ** 2
    rib = (q2 < 1.0) & ~((np.abs(xx) < 16.0) & (yn1 < 0))
    cart = rib & (yn1 < -0.55) & (np.abs(xx) < 0.5 * a.cav_ax * gg)
    cortex = rib & ~cart & (q2 > 0.45)
    marrow = rib & ~cart & ~cortex
    t1 = tex[iz, iy, ix]
    for sel, base, amp in ((cart, HU_CARTILAGE, 15.0), (cortex, HU_CORTEX, 90.0), (marrow, HU_MARROW, 30.0)):
        hu[iz[sel], iy[sel], ix[sel]] = base + amp * t1[sel]
    yn = (y - a.cav_yc) / cy
    # sternum
    st = body & (np.abs(x) < 14.0) & (out > 1.0) & (out < 11.0) & (yn < 0) & (z > a.base + 0.25 * a.height)
    st &= z < a.apex
    st_cortex = st & ((np.abs(x) > 11.5) | (out < 2.5) | (out > 9.5))
    hu[st] = HU_MARROW + 30.0 * tex[st]
    hu[st_cortex] = HU_CORTEX
    # spine, in a box around it
    vr, vy = a.vert_r, a.vert_y
    canal_y = vy + vr + 8.0
    lo = np.array([-1e3, vy - vr - 2.0, -1.2 * vr - 4.0])
    hi = np.array([1e4, canal_y + 28.0, 1.2 * vr + 4.0])
    box = _box(grid, lo, hi)
    zs, ys, xs = _sub_axes(grid, box)
    sub = hu[box]
    tx = tex[box]
    inb = body[box]
    rv = np.sqrt((xs / (1.15 * vr)) ** 2 + ((ys - vy) / vr) ** 2)
    vz = np.mod(zs - a.rib_phase, a.vert_period)
    vbody = inb & (rv < 1.0)
    disc = vbody & (vz < 5.0)
    rim = vbody & ~disc & (rv > 0.86)
    canc = vbody & ~disc & ~rim
    sub[disc] = HU_DISC + 10.0 * tx[disc]
    sub[rim] = HU_VERT_CORTEX + 60.0 * tx[rim]
    sub[canc] = HU_VERT_CANCELLOUS + 35.0 * tx[canc]
    rc = np.sqrt(xs**2 + (ys - canal_y) ** 2)
    arch = inb & (rc >= 7.5) & (rc < 12.5) & (ys > vy + 0.6 * vr)
    spinous = inb & (np.abs(xs) < 3.5) & (ys > canal_y + 10.0) & (ys < canal_y + 26.0)
    post = (arch | spinous) & (vz > 3.0)
    sub[post] = HU_VERT_CORTEX + 60.0 * tx[post]
    canal = inb & (rc < 7.5)
    sub[canal] = HU_CSF + 8.0 * tx[canal]


def render_anatomy(
    a: AnatomyParams,
    grid: Grid,
    trees: Trees,
    emphysema: EmphysemaSpec,
    rng: np.random.Generator,
    tissues: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the phantom (no nodules, no scanner effects).

    Args:
        a: anatomy.
        grid: the (fine) rendering grid.
        trees: vessel and airway trees of the patient.
        emphysema: emphysema of the patient.
        rng: stream for the tissue texture (study-specific).
        tissues: optional ``(Z, Y, X)`` uint8 array filled with :data:`TISSUES` codes (the dominant
            tissue of each voxel), for checks and statistics.

    Returns:
        ``(hu, lobes)``: ``(Z, Y, X)`` float32 HU and uint8 lobe codes on ``grid``.
    """
    z, y, x = grid.axes()
    tex = texture(grid, rng)
    _, depth_c = cavity(a, z, y, x)
    byc = a.cav_yc + a.back_extra / 2
    bx = a.cav_ax + a.wall + a.fat
    by = a.cav_ay + a.wall + a.fat + a.back_extra / 2
    dyb = y - byc
    rho_b = np.sqrt((x / bx) ** 2 + (dyb / by) ** 2)  # (1, Y, X): the body does not taper
    depth_b = np.sqrt(x * x + dyb * dyb) * (1.0 / np.maximum(rho_b, 1e-3) - 1.0)
    body2 = rho_b < 1.0
    fat2 = body2 & (depth_b > 2.0) & (depth_b < 2.0 + a.fat)
    hu = np.where(body2, np.float32(HU_MUSCLE), np.float32(HU_AIR)) + np.zeros(grid.shape, np.float32)
    fat = np.broadcast_to(fat2, grid.shape)
    hu[fat] = HU_FAT + 12.0 * tex[fat]
    body = np.broadcast_to(body2, grid.shape)
    cav = depth_c > 0
    hu[cav] = HU_SOFT
    liver = cav & (x < 10.0) & (z < a.base + a.dome + a.right_dome)
    hu[liver] = HU_LIVER
    med = cav & (np.abs(x) < mediastinum_halfwidth(a, z, y) + 6.0) & (z > a.base + 0.5 * a.dome)
    hu[med] = HU_MEDIASTINAL_FAT + 10.0 * tex[med]
    hx, hy, hz, hax, hay, haz = a.heart
    heart = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2 < 0.92
    hu[heart] = HU_SOFT
    ay_, ax_ = a.vert_y - a.vert_r - 11.0, a.med_hw * 0.55 + 6.0
    aorta = ((x - ax_) ** 2 + (y - ay_) ** 2 < 11.0**2) & (z > a.base) & (z < a.carina_z + 0.08 * a.height)
    hu[aorta] = HU_SOFT + 5.0
    if tissues is not None:
        tissues[:] = np.where(body2, TISSUES.index("muscle"), TISSUES.index("air"))
        tissues[fat] = TISSUES.index("fat")
        tissues[cav] = TISSUES.index("soft_tissue")
        tissues[med & ~heart & ~aorta] = TISSUES.index("mediastinal_fat")
    _bones(a, grid, hu, depth_c, body, tex)
    # lungs
    lobes = lobe_map(a, grid)
    lung = lobes > 0
    if tissues is not None:
        tissues[hu >= 200.0] = TISSUES.index("bone")
        tissues[lung] = TISSUES.index("lung")
    yn = (y - a.cav_yc) / (a.cav_ay * taper(a, z))
    par = a.lung_hu + 0.5 * a.lung_gradient * yn + 16.0 * tex
    hu[lung] = np.broadcast_to(par, grid.shape)[lung]
    if emphysema.kind != "none" and emphysema.extent > 0:
        frac = emphysema_field(a, grid, emphysema)
        frac *= lung
        hu += frac * (HU_EMPHYSEMA + 8.0 * tex - hu)
        if tissues is not None:
            tissues[frac > 0.5] = TISSUES.index("emphysema")
    occ = np.zeros(grid.shape, np.float32)
    thin = trees.vessels[:, 6] < THIN_VESSEL_MM
    render_tubes(occ, grid, trees.vessels[~thin])
    splat_tubes(occ, grid, trees.vessels[thin])
    occ *= cav
    hu += occ * (HU_VESSEL - hu)
    if tissues is not None:
        tissues[occ > 0.5] = TISSUES.index("vessel")
    occ[:] = 0.0
    render_tubes(occ, grid, trees.airways, pad=trees.airway_wall)
    hu += occ * (HU_MUSCLE - hu)
    occ[:] = 0.0
    render_tubes(occ, grid, trees.airways)
    hu += occ * (HU_AIR - hu)
    if tissues is not None:
        tissues[occ > 0.5] = TISSUES.index("airway")
    return hu, lobes


def emphysema_field(a: AnatomyParams, grid: Grid, spec: EmphysemaSpec) -> np.ndarray:
    """Soft emphysema occupancy ``(Z, Y, X)`` in ``[0, 1]`` (not yet restricted to the lungs).

    Holes are drawn in patient millimetres from the anatomy's own stream, so a prior and a current
    study of the patient show the same clusters: centrilobular holes (r ~ 2.5-4 mm) with an
    upper-zone predominance, or paraseptal cysts (r ~ 3-6 mm) within 10 mm of the costal pleura.
    Each hole is a weighted point splat blurred by a Gaussian; the field is thresholded softly.
    """
    rng = np.random.default_rng(a.tree_seed + 7919)
    lo, hi = lung_bbox(a)
    cand = rng.uniform(lo, hi, size=(60000, 3))
    inside = lobes_at(a, cand) > 0
    t = (cand[:, 0] - a.base) / a.height
    if spec.kind == "centrilobular":
        sigma, w_lo, w_hi = 2.0, 1.0, 3.0
        p = np.clip(0.15 + 1.4 * (t - 0.25), 0.05, 1.0)
    else:
        sigma, w_lo, w_hi = 2.3, 1.5, 4.5
        _, d = cavity(a, cand[:, 0], cand[:, 1], cand[:, 2])
        p = np.where(d < 10.0, 1.0, 0.0) * np.clip(0.4 + t, 0.2, 1.0)
    acc = inside & (rng.random(len(cand)) < p)
    v_lung = float(np.prod(hi - lo)) * inside.mean()
    w = rng.uniform(w_lo, w_hi, len(cand))
    r_hole = sigma * np.sqrt(2.0 * np.log(2.0 * w))
    v_hole = float(np.mean(4.0 / 3.0 * math.pi * r_hole**3))
    n = int(round(spec.extent * v_lung / v_hole * 1.15))
    idx = np.flatnonzero(acc)[:n]
    splat = np.zeros(grid.shape, np.float32)
    vox = np.rint(grid.to_index(cand[idx])).astype(int)
    ok = np.all((vox >= 0) & (vox < np.asarray(grid.shape)), axis=1)
    np.add.at(splat, tuple(vox[ok].T), w[idx][ok].astype(np.float32))
    sig_vox = [sigma / s for s in grid.spacing]
    box = _box(grid, lo - 10.0, hi + 10.0)
    field = ndimage.gaussian_filter(splat[box], sig_vox, truncate=3.0)
    field *= np.float32((2 * math.pi) ** 1.5 * float(np.prod(sig_vox)))
    out = np.zeros(grid.shape, np.float32)
    out[box] = np.clip((field - 0.5) / 0.35 + 0.5, 0.0, 1.0)
    return out

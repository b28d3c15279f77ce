"""Render the thorax phantom of a patient to Hounsfield units on a grid.

Tissues (HU before scanner noise; adult chest-CT reference values, e.g. Hofer, *CT Teaching Manual*,
and Bae, Radiology 2010;256:32-61 for contrast enhancement):

* air -1000; skin and chest-wall muscle +45; subcutaneous fat -100; mediastinal fat -90;
* heart (:func:`.anatomy.heart_rho`, border against the lung changing with z): myocardium +40 without
  contrast, about +100 with; blood pool of the right / left chambers = pulmonary artery / aorta blood;
* blood (:class:`BloodHU`): +35..+50 without contrast; with intravenous contrast aorta and left heart
  +180..+280, pulmonary arteries and right heart +150..+300, superior vena cava +250..+450 (inflow);
* great vessels (:func:`.anatomy.great_vessels`): aorta (ascending, arch, descending), pulmonary trunk
  and right/left pulmonary arteries to the hila, inferior pulmonary veins, superior vena cava;
  oesophagus +40 with a thin air lumen; mediastinal lymph nodes (4R, 5, 7) +40 (+70 enhanced);
* ribs (cortex +750, marrow +280), costal cartilage +120 with calcified foci +250..+450; sternum
  (cortex +800, marrow +200; manubrium wider than the body); vertebral bodies (cortex +650, cancellous
  +320, discs +85) with spinal canal and posterior arch;
* below the diaphragm domes (muscle band 4 mm, +45): liver +58 (+90 enhanced), spleen +45 (+110
  enhanced), stomach +30 with a fundal air bubble;
* lung parenchyma about -860 with a dependent (posterior) density gradient and texture; intrapulmonary
  arteries and veins (:mod:`.vessels`) at the blood HU of the study; airways (lumen -1000, wall +45);
  optional emphysema (-985) as centrilobular (upper-lobe predominant) or paraseptal (subpleural)
  low-attenuation clusters.
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
    diaphragm_z,
    great_vessels,
    heart_box,
    heart_rho,
    lobes_at,
    lung_bbox,
    lung_lobes,
    mediastinal_nodes,
    mediastinal_structures,
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
HU_CORTEX = 750.0
HU_MARROW = 280.0
HU_CARTILAGE = 120.0
HU_VERT_CORTEX = 650.0
HU_VERT_CANCELLOUS = 320.0
HU_DISC = 85.0
HU_CSF = 20.0
HU_EMPHYSEMA = -985.0
HU_STERNUM_CORTEX = 800.0
HU_STERNUM_MARROW = 200.0
HU_CARTILAGE_CALCIFIED = 350.0
HU_SPLEEN = 45.0
HU_STOMACH = 30.0
#: Thickness (mm) of the diaphragm muscle between the lung base and the liver / spleen.
DIAPHRAGM_MM = 4.0

EMPHYSEMA_KINDS: tuple[str, ...] = ("none", "centrilobular", "paraseptal")
#: Codes of the optional tissue map of :func:`render_anatomy` (index = code).
TISSUES: tuple[str, ...] = (
    "air", "muscle", "fat", "soft_tissue", "mediastinal_fat", "bone", "lung", "emphysema", "vessel", "airway",
    "heart", "aorta", "pulmonary_artery", "pulmonary_vein", "svc", "esophagus", "lymph_node", "sternum",
    "cartilage", "vertebra", "liver", "spleen", "stomach", "diaphragm", "airway_wall",
)  # fmt: skip


@dataclass(frozen=True)
class BloodHU:
    """Attenuation of blood and enhancing organs in one study (HU before noise).

    Attributes:
        contrast: the study is contrast-enhanced.
        aorta: aorta, left heart and pulmonary veins.
        pulmonary_artery: pulmonary trunk and arteries, right heart, intrapulmonary vessels.
        svc: superior vena cava.
        myocardium: heart muscle.
        liver: liver parenchyma.
        spleen: spleen parenchyma.
        node: mediastinal lymph nodes.
    """

    contrast: bool = False
    aorta: float = 42.0
    pulmonary_artery: float = 42.0
    svc: float = 42.0
    myocardium: float = 40.0
    liver: float = HU_LIVER
    spleen: float = HU_SPLEEN
    node: float = HU_SOFT

    def __post_init__(self) -> None:
        for name in ("aorta", "pulmonary_artery", "svc", "myocardium", "liver", "spleen", "node"):
            v = getattr(self, name)
            if not -100.0 <= v <= 1500.0:
                raise ValueError(f"BloodHU.{name} must be within -100..1500 HU, got {v!r}")


def sample_blood(contrast: bool, rng: np.random.Generator) -> BloodHU:
    """Blood and organ HU of one study.

    Unenhanced blood 35-50 HU; with IV contrast (routine chest timing, about 35-60 s after injection) aorta 180-280,
    pulmonary artery 150-300, SVC 250-450, myocardium ~100, liver ~90, spleen ~110, nodes ~70 (Bae 2010).
    """
    base = float(rng.uniform(35.0, 50.0))
    if not contrast:
        return BloodHU(False, base, base, base, HU_SOFT, HU_LIVER, HU_SPLEEN, HU_SOFT)
    return BloodHU(
        True,
        aorta=float(rng.uniform(180.0, 280.0)),
        pulmonary_artery=float(rng.uniform(150.0, 300.0)),
        svc=float(rng.uniform(250.0, 450.0)),
        myocardium=float(rng.uniform(90.0, 115.0)),
        liver=float(rng.uniform(80.0, 100.0)),
        spleen=float(rng.uniform(100.0, 125.0)),
        node=float(rng.uniform(60.0, 80.0)),
    )


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


def _subgrid(grid: Grid, box: tuple[slice, slice, slice]) -> Grid:
    """The part of ``grid`` under the index ``box``."""
    first = tuple(f + sp * sl.start for f, sp, sl in zip(grid.first, grid.spacing, box, strict=True))
    shape = tuple(sl.stop - sl.start for sl in box)
    return Grid(shape=shape, spacing=grid.spacing, first=first)  # type: ignore[arg-type]


def _code(tissues: np.ndarray | None, where: np.ndarray, name: str, box: tuple[slice, ...] | None = None) -> None:
    if tissues is not None:
        (tissues if box is None else tissues[box])[where] = TISSUES.index(name)


def _bones(
    a: AnatomyParams,
    grid: Grid,
    hu: np.ndarray,
    depth_c: np.ndarray,
    body: np.ndarray,
    tex: np.ndarray,
    tissues: np.ndarray | None = None,
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
    calc = cart & (t1 > 1.4)  # calcified foci of the costal cartilage (common after 40)
    for sel, base, amp in (
        (cart, HU_CARTILAGE, 15.0),
        (calc, HU_CARTILAGE_CALCIFIED, 60.0),
        (cortex, HU_CORTEX, 90.0),
        (marrow, HU_MARROW, 30.0),
    ):
        hu[iz[sel], iy[sel], ix[sel]] = base + amp * t1[sel]
    if tissues is not None:
        tissues[iz[cart], iy[cart], ix[cart]] = TISSUES.index("cartilage")
        bone = cortex | marrow
        tissues[iz[bone], iy[bone], ix[bone]] = TISSUES.index("bone")
    yn = (y - a.cav_yc) / cy
    # sternum: manubrium (half-width 22 mm) above the carina, body (13 mm) below, down to the xiphoid
    st_hw = np.where(z > a.carina_z + 5.0, 22.0, 13.0).astype(np.float32)
    st = body & (np.abs(x) < st_hw) & (out > 1.0) & (out < 11.0) & (yn < 0) & (z > a.base + 0.25 * a.height)
    st &= z < a.apex
    st_cortex = st & ((np.abs(x) > st_hw - 2.0) | (out < 2.5) | (out > 9.5))
    hu[st] = HU_STERNUM_MARROW + 30.0 * tex[st]
    hu[st_cortex] = HU_STERNUM_CORTEX + 60.0 * tex[st_cortex]
    _code(tissues, st, "sternum")
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
    _code(tissues, vbody | post, "vertebra", box)


def _tubes(
    hu: np.ndarray,
    grid: Grid,
    segs: np.ndarray,
    value: float,
    tex: np.ndarray,
    tissues: np.ndarray | None,
    name: str,
    pad: float = 0.0,
) -> None:
    """Composite capsules ``segs`` ``(K, 8)`` at ``value`` HU (partial volume), working in their bounding box."""
    lo = np.minimum(segs[:, 0:3], segs[:, 3:6]).min(axis=0) - segs[:, 6:8].max() - pad - 2.0
    hi = np.maximum(segs[:, 0:3], segs[:, 3:6]).max(axis=0) + segs[:, 6:8].max() + pad + 2.0
    box = _box(grid, lo, hi)
    if any(sl.stop <= sl.start for sl in box):
        return
    occ = np.zeros(tuple(sl.stop - sl.start for sl in box), np.float32)
    render_tubes(occ, _subgrid(grid, box), segs, pad=pad)
    view = hu[box]
    view += occ * (value + 6.0 * tex[box] - view)
    _code(tissues, occ > 0.5, name, box)


def _abdomen(
    a: AnatomyParams, grid: Grid, hu: np.ndarray, cav: np.ndarray, blood: BloodHU, tissues: np.ndarray | None
) -> None:
    """Diaphragm muscle, liver (right, crossing the midline anteriorly), spleen and stomach under the domes."""
    z, y, x = grid.axes()
    top = a.base + a.dome + a.right_dome + 1.0
    k = int(np.searchsorted(z.ravel(), top))
    if k == 0:
        return
    box = (slice(0, k), slice(None), slice(None))
    zs = z[:k]
    dz = diaphragm_z(a, zs, y, x)
    c = cav[box]
    below = c & (zs < dz)
    abd = below & (zs < dz - DIAPHRAGM_MM)
    yn = (y - np.float32(a.cav_yc)) / (a.cav_ay * taper(a, zs))
    liver = abd & (x < 18.0 - 40.0 * yn)
    left = abd & ~liver
    spleen = left & (yn > 0.05)
    stomach = left & ~spleen
    gas = stomach & (zs > dz - DIAPHRAGM_MM - 14.0) & (yn < -0.2)
    sub = hu[box]
    sub[below] = HU_MUSCLE
    sub[liver] = blood.liver
    sub[spleen] = blood.spleen
    sub[stomach] = HU_STOMACH
    sub[gas] = HU_AIR
    for where, name in (
        (below & ~abd, "diaphragm"),
        (liver, "liver"),
        (spleen, "spleen"),
        (stomach & ~gas, "stomach"),
        (gas, "air"),
    ):
        _code(tissues, where, name, box)


def _heart(
    a: AnatomyParams, grid: Grid, hu: np.ndarray, tex: np.ndarray, blood: BloodHU, tissues: np.ndarray | None
) -> None:
    """Heart in its box: pericardial fat rim, myocardium, septum, right / left blood pools."""
    lo, hi = heart_box(a)
    box = _box(grid, lo, hi)
    if any(sl.stop <= sl.start for sl in box):
        return
    zs, ys, xs = _sub_axes(grid, box)
    rho = heart_rho(a, zs, ys, xs)
    hx, hy = a.heart[0], a.heart[1]
    heart = (rho < 0.95) & (zs > diaphragm_z(a, zs, ys, xs) + 1.0)
    side = 0.6 * (xs - np.float32(hx)) + 0.8 * (ys - np.float32(hy))  # > 0: left (posterior) chambers
    pool = heart & (rho < 0.78) & (np.abs(side) > 4.0)
    sub, t = hu[box], tex[box]
    sub[heart] = blood.myocardium + 8.0 * t[heart]
    right = pool & (side < 0)
    left = pool & (side > 0)
    sub[right] = blood.pulmonary_artery + 6.0 * t[right]
    sub[left] = blood.aorta + 6.0 * t[left]
    _code(tissues, heart, "heart", box)


def render_anatomy(
    a: AnatomyParams,
    grid: Grid,
    trees: Trees,
    emphysema: EmphysemaSpec,
    rng: np.random.Generator,
    tissues: np.ndarray | None = None,
    blood: BloodHU | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the phantom (no nodules, no scanner effects).

    Args:
        a: anatomy.
        grid: the (fine) rendering grid.
        trees: vessel and airway trees of the patient.
        emphysema: emphysema of the patient.
        rng: stream for the tissue texture (study-specific).
        tissues: optional ``(Z, Y, X)`` uint8 array filled with :data:`TISSUES` codes (the dominant
            tissue of each voxel), for checks, statistics and hard-negative points.
        blood: blood and organ HU of the study (None: unenhanced, 42 HU blood).

    Returns:
        ``(hu, lobes)``: ``(Z, Y, X)`` float32 HU and uint8 lobe codes on ``grid``.
    """
    blood = blood or BloodHU()
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
    med = cav & (np.abs(x) < mediastinum_halfwidth(a, z, y) + 6.0) & (z > a.base + 0.5 * a.dome)
    hu[med] = HU_MEDIASTINAL_FAT + 10.0 * tex[med]
    if tissues is not None:
        tissues[:] = np.where(body2, TISSUES.index("muscle"), TISSUES.index("air"))
        tissues[fat] = TISSUES.index("fat")
        tissues[cav] = TISSUES.index("soft_tissue")
        tissues[med] = TISSUES.index("mediastinal_fat")
    _abdomen(a, grid, hu, cav, blood, tissues)
    _heart(a, grid, hu, tex, blood, tissues)
    vessels = great_vessels(a)
    for name, value in (
        ("svc", blood.svc),
        ("pulmonary_vein", blood.aorta),
        ("pulmonary_artery", blood.pulmonary_artery),
        ("aorta", blood.aorta),
        ("esophagus", HU_SOFT),
    ):
        _tubes(hu, grid, vessels[name], value, tex, tissues, name)
    eso = vessels["esophagus"].copy()
    eso[:, 6:8] = 1.5
    _tubes(hu, grid, eso, HU_AIR, tex, None, "esophagus")
    nodes = mediastinal_nodes(a)
    _tubes(
        hu,
        grid,
        np.concatenate([nodes, nodes], axis=1)[:, [0, 1, 2, 0, 1, 2, 3, 3]],
        blood.node,
        tex,
        tissues,
        "lymph_node",
    )
    _bones(a, grid, hu, depth_c, body, tex, tissues)
    # lungs
    lobes = lobe_map(a, grid)
    lung = lobes > 0
    if tissues is not None:
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
    # intrapulmonary trees and bronchi never run through the heart, great vessels or oesophagus
    solid = mediastinal_structures(a, z, y, x, 0.0)
    occ = np.zeros(grid.shape, np.float32)
    thin = trees.vessels[:, 6] < THIN_VESSEL_MM
    render_tubes(occ, grid, trees.vessels[~thin])
    splat_tubes(occ, grid, trees.vessels[thin])
    occ *= cav
    occ[solid] = 0.0
    hu += occ * (blood.pulmonary_artery - hu)
    if tissues is not None:
        tissues[occ > 0.5] = TISSUES.index("vessel")
    occ[:] = 0.0
    render_tubes(occ, grid, trees.airways, pad=trees.airway_wall)
    occ[solid] = 0.0
    hu += occ * (HU_MUSCLE - hu)
    if tissues is not None:
        tissues[occ > 0.5] = TISSUES.index("airway_wall")
    occ[:] = 0.0
    render_tubes(occ, grid, trees.airways)
    occ[solid] = 0.0
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

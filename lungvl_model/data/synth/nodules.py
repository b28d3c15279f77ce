"""Nodule shapes with exactly known measurements, their placement in a lobe, and their rendering.

A nodule body is a star-shaped surface in its own frame (``u`` = long in-plane axis, ``v`` = short
in-plane axis, ``w`` = z)::

    r(dir) = R_ellipsoid(dir; a, b, c) * (1 + m(azimuth) * cos(elevation)**2),
    m(azimuth) = sum_k A_k * max(0, cos(azimuth - azimuth_k)) ** p        (lobulation bumps)

with ``c <= b <= a`` and ``A_k >= 0``, so every axial cross-section is contained in the equatorial
one: the longest axial diameter, its perpendicular short axis (projection width, as in
``lungvl_model.data.measure``) and the volume are computed from the formula, without rendering, and
a shape is scaled to hit a designed mean diameter exactly. Spicules are thin tapered tubes from the
surface; they are drawn in the image but are not part of the body (nor of the label map), following
the measurement convention that excludes spicules.

Rendering uses a continuous occupancy (radial signed distance with a one-voxel ramp); a voxel belongs
to the label when its occupancy (averaged over the sub-slices of a thick slice) is >= 0.5, so the
label map reproduces the designed diameters to within a voxel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .anatomy import AnatomyParams, Grid, lobes_at, lung_bbox
from .vessels import render_tubes

_N_AZ = 360


@dataclass(frozen=True)
class NoduleShape:
    """Geometry of a nodule body (mm, radians).

    Attributes:
        a: ellipsoid semi-axis along the long in-plane axis.
        b: semi-axis along the short in-plane axis (``<= a``).
        c: semi-axis along z (``<= b``).
        angle: in-plane angle of the long axis from the patient ``+x`` axis.
        bumps: lobulation bumps ``(azimuth, amplitude)`` (amplitude relative to the radius).
        bump_power: sharpness ``p`` of the bumps.
        spicules: ``(azimuth, elevation, length, radius)``: length relative to ``a``, radius in mm.
    """

    a: float
    b: float
    c: float
    angle: float = 0.0
    bumps: tuple[tuple[float, float], ...] = ()
    bump_power: float = 6.0
    spicules: tuple[tuple[float, float, float, float], ...] = ()

    def __post_init__(self) -> None:
        if not (0 < self.c <= self.b * (1 + 1e-9) and self.b <= self.a * (1 + 1e-9)):
            raise ValueError(f"NoduleShape needs 0 < c <= b <= a, got a={self.a}, b={self.b}, c={self.c}")
        if any(amp < 0 for _, amp in self.bumps):
            raise ValueError(f"NoduleShape bump amplitudes must be >= 0, got {self.bumps}")

    def scaled(self, f: float) -> NoduleShape:
        """The same shape scaled by ``f`` (spicule radii unchanged)."""
        return replace(self, a=self.a * f, b=self.b * f, c=self.c * f)

    def radius(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Surface radius along the directions ``(u, v, w)`` (nodule frame, any length > 0)."""
        rho = np.sqrt(u * u + v * v + w * w) + 1e-12
        r_ell = rho / np.sqrt((u / self.a) ** 2 + (v / self.b) ** 2 + (w / self.c) ** 2 + 1e-30)
        if not self.bumps:
            return r_ell
        rxy = np.sqrt(u * u + v * v) + 1e-12
        cu, sv = u / rxy, v / rxy
        m = np.zeros_like(r_ell)
        for az, amp in self.bumps:
            m += amp * np.maximum(0.0, cu * math.cos(az) + sv * math.sin(az)) ** self.bump_power
        return r_ell * (1.0 + m * (rxy / rho) ** 2)

    def equator(self, n: int = _N_AZ) -> np.ndarray:
        """Boundary of the equatorial cross-section, ``(n, 2)`` points ``(u, v)`` in mm."""
        phi = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        u, v = np.cos(phi), np.sin(phi)
        r = self.radius(u, v, np.zeros_like(u))
        return np.stack([r * u, r * v], axis=1)

    def axial_axes(self) -> tuple[float, float]:
        """Longest axial diameter and the perpendicular short axis (projection width), mm.

        The longest (Feret) diameter is the largest projection width over 720 directions (0.25 degree
        steps); the short axis is the width across that direction.
        """
        return self._axes

    @functools.cached_property
    def _axes(self) -> tuple[float, float]:
        if not self.bumps:
            return 2.0 * self.a, 2.0 * self.b
        p = self.equator()
        ang = np.linspace(0.0, math.pi, 720, endpoint=False)
        proj = p @ np.stack([np.cos(ang), np.sin(ang)])
        width = proj.max(axis=0) - proj.min(axis=0)
        k = int(np.argmax(width))
        perp = (k + 360) % 720
        return float(width[k]), float(width[perp])

    def mean_diameter(self) -> float:
        """Lung-RADS mean diameter ``(long + short) / 2``, mm."""
        long_, short = self.axial_axes()
        return 0.5 * (long_ + short)

    def _quadrature(self, n_el: int = 48, n_az: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        el = (np.arange(n_el) + 0.5) / n_el * math.pi - math.pi / 2
        az = (np.arange(n_az) + 0.5) / n_az * 2 * math.pi
        e, p = np.meshgrid(el, az, indexing="ij")
        dirs = np.stack([np.cos(e) * np.cos(p), np.cos(e) * np.sin(p), np.sin(e)], axis=-1)
        r = self.radius(dirs[..., 0], dirs[..., 1], dirs[..., 2])
        dw = np.cos(e) * (math.pi / n_el) * (2 * math.pi / n_az)
        return dirs, r, dw

    def volume_mm3(self) -> float:
        """Volume of the body, mm³ (exact for an ellipsoid, quadrature otherwise)."""
        if not self.bumps:
            return 4.0 / 3.0 * math.pi * self.a * self.b * self.c
        _, r, dw = self._quadrature()
        return float(np.sum(r**3 / 3.0 * dw))

    def centroid_offset(self) -> np.ndarray:
        """Centroid of the body relative to its centre, patient-frame ``(z, y, x)`` mm."""
        if not self.bumps:
            return np.zeros(3)
        dirs, r, dw = self._quadrature()
        m = np.sum((r**4 / 4.0 * dw)[..., None] * dirs, axis=(0, 1)) / np.sum(r**3 / 3.0 * dw)
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        return np.array([m[2], m[0] * sa + m[1] * ca, m[0] * ca - m[1] * sa])

    def bounding_radius(self) -> float:
        """Largest body radius (no spicules), mm."""
        return float(max(np.linalg.norm(self.equator(), axis=1).max(), self.c))

    def spicule_reach(self) -> float:
        """Largest radius reached by a spicule tip, mm (0 without spicules)."""
        return max((self.a * (1.0 + ln) for _, _, ln, _ in self.spicules), default=0.0)


def design_shape(rng: np.random.Generator, mean_diameter_mm: float, margin: str) -> NoduleShape:
    """Draw a body shape for a margin type and scale it to the designed mean diameter.

    Args:
        rng: the nodule's stream.
        mean_diameter_mm: designed Lung-RADS mean diameter (mm).
        margin: ``smooth`` (ellipsoid), ``lobulated`` (3-6 bumps) or ``spiculated`` (near-ellipsoid
            core with 8-16 spicules of base radius 0.3-1.4 mm, thicker on larger nodules).

    Returns:
        A shape whose :meth:`NoduleShape.mean_diameter` equals ``mean_diameter_mm``.
    """
    b_ratio = rng.uniform(0.72, 1.0)
    c_ratio = rng.uniform(0.85, 1.0)
    bumps: tuple[tuple[float, float], ...] = ()
    spicules: tuple[tuple[float, float, float, float], ...] = ()
    power = float(rng.uniform(4.0, 8.0))
    if margin == "lobulated":
        k = int(rng.integers(3, 7))
        bumps = tuple((float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.12, 0.3))) for _ in range(k))
    elif margin == "spiculated":
        k = int(rng.integers(0, 3))
        bumps = tuple((float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.05, 0.15))) for _ in range(k))
        n = int(rng.integers(8, 17))
        spicules = tuple(
            (
                float(rng.uniform(0, 2 * math.pi)),
                float(rng.uniform(-0.9, 0.9)),
                float(rng.uniform(0.4, 1.2)),
                float(rng.uniform(0.4, 0.8) * np.clip(mean_diameter_mm / 10.0, 0.8, 1.8)),
            )
            for _ in range(n)
        )
    elif margin != "smooth":
        raise ValueError(f"margin must be smooth, lobulated or spiculated, got {margin!r}")
    unit = NoduleShape(1.0, b_ratio, b_ratio * c_ratio, float(rng.uniform(0, math.pi)), bumps, power, spicules)
    return unit.scaled(mean_diameter_mm / unit.mean_diameter())


@functools.cache
def _directions() -> np.ndarray:
    """26 grid directions plus a 40-point Fibonacci sphere, ``(66, 3)`` unit vectors."""
    g = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)])
    n = 40
    idx = np.arange(n) + 0.5
    el = np.arcsin(1 - 2 * idx / n)
    az = math.pi * (1 + 5**0.5) * idx
    fib = np.stack([np.sin(el), np.cos(el) * np.sin(az), np.cos(el) * np.cos(az)], axis=1)
    return np.concatenate([g / np.linalg.norm(g, axis=1, keepdims=True), fib])


def place_nodule(
    a: AnatomyParams,
    lobe_code: int,
    radius_mm: float,
    juxtapleural: bool,
    rng: np.random.Generator,
    taken: list[tuple[np.ndarray, float]] | None = None,
) -> tuple[np.ndarray, bool]:
    """Choose a nodule centre in a lobe (patient-frame ``(z, y, x)`` mm), without rendering.

    An interior nodule keeps 2.5 mm of lung around its bounding sphere; a juxtapleural one has its
    bounding sphere inside the lung but touches the lung surface (a point 1.5 mm beyond it is
    outside). Nodules keep 3 mm apart.

    Args:
        a: anatomy.
        lobe_code: lobe of the centre (see ``LOBE_LABELS``).
        radius_mm: bounding radius of the body.
        juxtapleural: place against the pleura.
        rng: the nodule's placement stream.
        taken: centres and radii of nodules already placed.

    Returns:
        ``(centre, ok)``; ``ok`` is False when no position met the constraints and the most interior
        candidate of the lobe was used instead.
    """
    taken = taken or []
    lo, hi = lung_bbox(a)
    dirs = _directions()
    best: tuple[float, np.ndarray] | None = None
    for _ in range(6):
        cand = rng.uniform(lo, hi, size=(6000, 3))
        cand = cand[lobes_at(a, cand) == lobe_code]
        if not len(cand):
            continue
        for c_pos, r_other in taken:
            cand = cand[np.linalg.norm(cand - c_pos, axis=1) > radius_mm + r_other + 3.0]
        if not len(cand):
            continue
        inner = lobes_at(a, (cand[:, None, :] + (radius_mm + (0.0 if juxtapleural else 2.5)) * dirs).reshape(-1, 3))
        frac_in = (inner.reshape(len(cand), -1) > 0).mean(axis=1)
        ok = frac_in == 1.0
        if juxtapleural:
            outer = lobes_at(a, (cand[:, None, :] + (radius_mm + 1.5) * dirs).reshape(-1, 3))
            ok &= (outer.reshape(len(cand), -1) == 0).any(axis=1)
        hits = np.flatnonzero(ok)
        if len(hits):
            return cand[hits[0]], True
        k = int(np.argmax(frac_in))
        if best is None or frac_in[k] > best[0]:
            best = (float(frac_in[k]), cand[k])
    if best is None:
        raise RuntimeError(f"lobe {lobe_code} has no room for a nodule of radius {radius_mm:.1f} mm")
    return best[1], False


def render_nodule(
    hu: np.ndarray,
    grid: Grid,
    center_mm: np.ndarray,
    shape: NoduleShape,
    body_hu: float,
    rng: np.random.Generator,
    core_scale: float = 0.0,
    core_hu: float = 0.0,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Draw a nodule into a fine-grid volume and return its body occupancy.

    The nodule replaces lower values only (``hu += occ * (max(hu, value) - hu)``), so vessels stay
    visible through ground glass. A core (solid component of a part-solid nodule, or central
    calcification) is the same shape scaled by ``core_scale`` around the same centre.

    Args:
        hu: ``(Z, Y, X)`` float32 HU on ``grid``, updated in place.
        grid: the fine grid.
        center_mm: patient-frame ``(z, y, x)`` centre.
        shape: the body.
        body_hu: HU of the body (solid, ground glass or calcified).
        rng: texture stream.
        core_scale: relative size of a core (0 = none).
        core_hu: HU of the core.

    Returns:
        ``(box, occ)``: index slices of the box on ``grid`` and the body occupancy ``(z, y, x)`` there.
    """
    sp = np.asarray(grid.spacing)
    reach = max(shape.bounding_radius(), shape.spicule_reach()) + 2.0 * float(sp.max())
    i0 = np.maximum(np.floor(grid.to_index(center_mm - reach)).astype(int), 0)
    i1 = np.minimum(np.ceil(grid.to_index(center_mm + reach)).astype(int) + 1, grid.shape)
    box = tuple(slice(int(p), int(q)) for p, q in zip(i0, i1, strict=True))
    coords = [(grid.first[k] + sp[k] * np.arange(i0[k], i1[k]) - center_mm[k]).astype(np.float32) for k in range(3)]
    qz, qy, qx = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]
    ca, sa = math.cos(shape.angle), math.sin(shape.angle)
    u = qx * ca + qy * sa
    v = -qx * sa + qy * ca
    w = np.broadcast_to(qz, np.broadcast_shapes(qz.shape, u.shape))
    rho = np.sqrt(u * u + v * v + w * w)
    r = shape.radius(u, v, w)
    ramp = np.sqrt((qz * sp[0]) ** 2 + (qy * sp[1]) ** 2 + (qx * sp[2]) ** 2) / np.maximum(rho, 1e-6)
    ramp = np.maximum(ramp, 0.5 * float(sp.min()))
    occ = np.clip(0.5 - (rho - r) / ramp, 0.0, 1.0).astype(np.float32)
    view = hu[box]
    tex = rng.standard_normal(view.shape).astype(np.float32)
    if shape.spicules:
        spi = np.zeros(view.shape, np.float32)
        sub = Grid(shape=view.shape, spacing=grid.spacing, first=tuple(grid.to_mm(i0)))  # type: ignore[arg-type]
        segs = []
        for az, el, ln, rad in shape.spicules:
            d = np.array([math.sin(el), math.cos(el) * math.sin(az), math.cos(el) * math.cos(az)])
            du, dv, dw = d[2], d[1], d[0]
            r_dir = float(shape.radius(np.array([du]), np.array([dv]), np.array([dw]))[0])
            rot = np.array([dw, du * sa + dv * ca, du * ca - dv * sa])  # (z, y, x)
            p0 = center_mm + rot * 0.6 * r_dir
            p1 = center_mm + rot * (r_dir + ln * shape.a)
            segs.append([*p0, *p1, rad, 0.12])
        render_tubes(spi, sub, np.asarray(segs), min_radius=0.0)
        np.maximum(spi, occ, out=spi)
        target = np.maximum(view, body_hu + 6.0 * tex)
        view += spi * (target - view)
    else:
        target = np.maximum(view, body_hu + 6.0 * tex)
        view += occ * (target - view)
    if core_scale > 0:
        core = shape.scaled(core_scale)
        rc = core.radius(u, v, w)
        occ_c = np.clip(0.5 - (rho - rc) / ramp, 0.0, 1.0)
        target = np.maximum(view, core_hu + 6.0 * tex)
        view += occ_c * (target - view)
    return box, occ  # type: ignore[return-value]

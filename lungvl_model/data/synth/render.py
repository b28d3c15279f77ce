"""Render one study of a patient: phantom + nodules on the fine grid, label maps, scanner effects.

The patient frame (:mod:`.anatomy`) is placed on the table with a per-study shift (a few mm in-plane,
a table position along z), so prior and current studies of a patient are not voxel-aligned, as in
real follow-up; labels.csv centroids are in the world LPS frame of each series.

Calcium of a calcified nodule (the whole body for ``complete``, the core for ``central``) is drawn at
its sampled density (600-1400 HU) or denser, up to ``CALCIUM_HU_CAP``: the density is raised until the
noise-free peak after the scanner's partial volume and kernel blur reaches ``CALCIUM_TARGET_PEAK_HU``,
so the calcification the label claims is visible (> 300 HU) on thick slices as well. The search is
deterministic (texture probes on the nodule's own stream) and draws no random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .anatomy import AnatomyParams, Grid, make_grid
from .hard_negatives import sample_hard_negatives
from .nodules import NoduleShape, render_nodule
from .patients import NoduleSpec, NoduleState, PatientCase
from .phantom import BloodHU, lobe_map, render_anatomy, sample_blood
from .scanner import ScanParams, apply_scanner, partial_volume
from .vessels import Trees


@dataclass
class StudyImage:
    """One rendered series.

    Attributes:
        hu: ``(Z, Y, X)`` float32 HU after the scanner model.
        labels: ``(Z, Y, X)`` uint8 nodule label map (k = nodule_id k).
        lobes: ``(Z, Y, X)`` uint8 lobe map (``LOBE_LABELS``).
        origin_lps: LPS ``(x, y, z)`` of voxel ``(0, 0, 0)``.
        centroids_lps: true LPS ``(x, y, z)`` centroid of each nodule, by nodule id.
        images: instance number (1-based slice) of each nodule's centroid, by nodule id.
        blood: blood and organ HU of the study (contrast or not).
        hard_negatives: ``(structure, patient-frame (z, y, x) mm)`` points inside false-positive-prone
            structures (:func:`~.hard_negatives.sample_hard_negatives`).
        shift_lps: ``(dx, dy, dz)`` from the patient frame to this series' LPS frame.
        calcium_peak_hu: noise-free peak HU of each calcified nodule after the scanner blur, by
            nodule id (``< CALCIUM_TARGET_PEAK_HU`` only when even ``CALCIUM_HU_CAP`` cannot reach it).
    """

    hu: np.ndarray
    labels: np.ndarray
    lobes: np.ndarray
    origin_lps: tuple[float, float, float]
    centroids_lps: dict[int, np.ndarray]
    images: dict[int, int]
    blood: BloodHU
    hard_negatives: list[tuple[str, np.ndarray]]
    shift_lps: tuple[float, float, float]
    calcium_peak_hu: dict[int, float] = field(default_factory=dict)


#: Noise-free peak (HU) a calcified nodule must keep after partial volume and kernel blur.
CALCIUM_TARGET_PEAK_HU = 450.0
#: Densest calcium drawn before the blur (HU; dense calcified granulomas reach 1000-2500 HU).
CALCIUM_HU_CAP = 2500.0


def label_from_occupancy(occ_fine: np.ndarray, z0: int, sub: int) -> tuple[int, np.ndarray]:
    """Average a nodule's fine-grid occupancy over each output slice and threshold it.

    A voxel is in the nodule when its occupancy is >= 0.5; a nodule thinner than a thick slice
    (peak occupancy < 1) keeps the voxels at >= half its peak so that it never disappears.

    Args:
        occ_fine: ``(z, y, x)`` occupancy on the fine grid, starting at fine slice ``z0``.
        z0: first fine slice of ``occ_fine``.
        sub: fine slices per output slice.

    Returns:
        ``(first output slice, boolean mask (z_out, y, x))``.
    """
    zo0 = z0 // sub
    zo1 = -(-(z0 + occ_fine.shape[0]) // sub)
    tmp = np.zeros(((zo1 - zo0) * sub, *occ_fine.shape[1:]), np.float32)
    tmp[z0 - zo0 * sub : z0 - zo0 * sub + occ_fine.shape[0]] = occ_fine
    occ = tmp.reshape(zo1 - zo0, sub, *occ_fine.shape[1:]).mean(axis=1)
    peak = float(occ.max())
    if peak <= 0:
        return zo0, np.zeros(occ.shape, bool)
    return zo0, occ >= min(0.5, 0.5 * peak)


def scanner_blur(fine: np.ndarray, sub: int, psf_sigma_px: float) -> np.ndarray:
    """Noise-free scanner model: partial volume over ``sub`` sub-slices, then the in-plane kernel PSF.

    Args:
        fine: ``(Z * sub, Y, X)`` float32 HU on the fine grid.
        sub: fine sub-slices per output slice.
        psf_sigma_px: in-plane Gaussian blur (pixels), as in :func:`~.scanner.apply_scanner`.

    Returns:
        ``(Z, Y, X)`` float32 HU.
    """
    img = partial_volume(fine, sub)
    if psf_sigma_px > 0:
        img = ndimage.gaussian_filter(img, (0.0, psf_sigma_px, psf_sigma_px), truncate=3.0)
    return img


def calcium_density(
    hu: np.ndarray,
    grid: Grid,
    centre: np.ndarray,
    shape: NoduleShape,
    spec: NoduleSpec,
    texture: tuple[int, int],
    scan: ScanParams,
) -> tuple[float, float]:
    """Calcium HU of a calcified nodule so that its blurred noise-free peak reaches the target.

    The rendered box is linear in the calcium HU ``h`` (the calcium replaces the lower lung values),
    so two probe renderings (sampled ``h0`` and ``h0 + 1000``, same texture stream) give every output
    voxel of the nodule's label mask (:func:`label_from_occupancy`) as ``A + (h - h0) * D``; the
    result is the smallest ``h >= h0`` whose maximum over the mask reaches ``CALCIUM_TARGET_PEAK_HU``,
    capped at ``CALCIUM_HU_CAP``. Only the mask counts, so nearby bone cannot stand in for the
    nodule's calcium. ``hu`` is not modified.

    Args:
        hu: ``(Z * sub, Y, X)`` fine-grid HU before this nodule is drawn.
        grid: the fine grid.
        centre: patient-frame ``(z, y, x)`` centre (mm).
        shape: the nodule body on this study.
        spec: the nodule (``kind == "calcified"``); its calcium is the body (``complete``) or the
            core (``central``).
        texture: seed of the nodule's texture stream on this study.
        scan: scanner settings of the study.

    Returns:
        ``(calcium HU, noise-free peak HU inside the nodule's label mask after the blur)``.
    """
    sub = scan.sub_slices
    sp = np.asarray(grid.spacing)
    reach = shape.bounding_radius() + 2.0 * float(sp.max())
    margin = np.array([0.0, 1.0, 1.0]) * (3.0 * scan.psf_sigma_px + 1.0) * sp
    i0 = np.maximum(np.floor(grid.to_index(centre - reach) - margin / sp).astype(int), 0)
    i1 = np.minimum(np.ceil(grid.to_index(centre + reach) + margin / sp).astype(int) + 1, grid.shape)
    i0[0] = (i0[0] // sub) * sub
    i1[0] = min(-(-i1[0] // sub) * sub, grid.shape[0])
    region = tuple(slice(int(p), int(q)) for p, q in zip(i0, i1, strict=True))
    sub_grid = Grid(shape=hu[region].shape, spacing=grid.spacing, first=tuple(grid.to_mm(i0)))  # type: ignore[arg-type]
    complete = spec.calcification == "complete"
    h0 = spec.body_hu if complete else spec.core_hu

    def probe(h: float) -> tuple[np.ndarray, np.ndarray]:
        work = hu[region].copy()
        box, occ = render_nodule(
            work,
            sub_grid,
            centre,
            shape,
            h if complete else spec.body_hu,
            np.random.default_rng(texture),
            core_scale=spec.core_scale,
            core_hu=spec.core_hu if complete else h,
        )
        img = scanner_blur(work, sub, scan.psf_sigma_px)
        zo0, box_mask = label_from_occupancy(occ, box[0].start, sub)
        mask = np.zeros(img.shape, bool)
        view = mask[zo0 : zo0 + box_mask.shape[0], box[1], box[2]]
        view[...] = box_mask[: view.shape[0]]
        return img[mask], mask

    a, mask = probe(h0)
    if not mask.any():
        return h0, -np.inf
    d = (probe(h0 + 1000.0)[0] - a) / 1000.0
    if float(a.max()) >= CALCIUM_TARGET_PEAK_HU:
        return h0, float(a.max())
    pos = d > 1e-6
    need = h0 + (CALCIUM_TARGET_PEAK_HU - a[pos]) / d[pos] if pos.any() else np.array([np.inf])
    h = float(min(max(h0, float(need.min())), CALCIUM_HU_CAP))
    return h, float((a + (h - h0) * d).max())


def render_study(
    anatomy: AnatomyParams,
    trees: Trees,
    case: PatientCase,
    states: list[NoduleState],
    centres: dict[int, np.ndarray],
    scan: ScanParams,
    matrix: int,
    fov_mm: float,
    z_extent_mm: float,
    stream: int,
) -> StudyImage:
    """Render one study.

    Args:
        anatomy: the patient's thorax.
        trees: its vessel and airway trees.
        case: the patient (emphysema).
        states: nodules visible on this study, with their size at this time.
        centres: patient-frame ``(z, y, x)`` centre of each nodule.
        scan: scanner settings of the study.
        matrix: in-plane pixels.
        fov_mm: field of view.
        z_extent_mm: coverage.
        stream: the study's random stream (texture, table shift, noise).

    Returns:
        The series and its label maps.
    """
    rng = np.random.default_rng(stream)
    sub = scan.sub_slices
    fine = make_grid(matrix, fov_mm, z_extent_mm, scan.slice_thickness_mm, sub)
    out_grid = make_grid(matrix, fov_mm, z_extent_mm, scan.slice_thickness_mm, 1)
    dx, dy = rng.uniform(-6.0, 6.0, 2)
    dz = -z_extent_mm - float(rng.uniform(60.0, 140.0))
    blood = sample_blood(scan.contrast, np.random.default_rng([stream, 13]))
    tissues = np.zeros(fine.shape, np.uint8)
    hu, fine_lobes = render_anatomy(anatomy, fine, trees, case.emphysema, rng, tissues, blood)
    hard = sample_hard_negatives(tissues, fine_lobes, fine, anatomy, np.random.default_rng([stream, 17]))
    del tissues, fine_lobes
    labels = np.zeros(out_grid.shape, np.uint8)
    centroids: dict[int, np.ndarray] = {}
    images: dict[int, int] = {}
    calcium_peak: dict[int, float] = {}
    for s in states:
        spec = s.spec
        centre = centres[spec.nodule_id]
        body_hu, core_hu = spec.body_hu, spec.core_hu
        if spec.kind == "calcified":
            calcium, calcium_peak[spec.nodule_id] = calcium_density(
                hu, fine, centre, s.shape, spec, (spec.seed, stream), scan
            )
            if spec.calcification == "complete":
                body_hu = calcium
            else:
                core_hu = calcium
        box, occ = render_nodule(
            hu,
            fine,
            centre,
            s.shape,
            body_hu,
            np.random.default_rng([spec.seed, stream]),
            core_scale=spec.core_scale,
            core_hu=core_hu,
        )
        zo0, mask = label_from_occupancy(occ, box[0].start, sub)
        view = labels[zo0 : zo0 + mask.shape[0], box[1], box[2]]
        view[mask[: view.shape[0]] & (view == 0)] = spec.nodule_id
        cz, cy, cx = centre + s.shape.centroid_offset()
        centroids[spec.nodule_id] = np.array([cx + dx, cy + dy, cz + dz])
        k = int(round((cz - out_grid.first[0]) / out_grid.spacing[0]))
        images[spec.nodule_id] = int(np.clip(k, 0, out_grid.shape[0] - 1)) + 1
    # a hard negative is never within 3 mm of a nodule of this study
    for s in states:
        c, r = centres[s.spec.nodule_id], max(s.shape.bounding_radius(), s.shape.spicule_reach()) + 3.0
        hard = [(name, p) for name, p in hard if float(np.linalg.norm(p - c)) > r]
    img = apply_scanner(hu, scan, rng)
    lobes = lobe_map(anatomy, out_grid)
    origin = (out_grid.first[2] + dx, out_grid.first[1] + dy, out_grid.first[0] + dz)
    origin_lps = (float(origin[0]), float(origin[1]), float(origin[2]))
    shift = (float(dx), float(dy), float(dz))
    return StudyImage(img, labels, lobes, origin_lps, centroids, images, blood, hard, shift, calcium_peak)

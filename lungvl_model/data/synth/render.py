"""Render one study of a patient: phantom + nodules on the fine grid, label maps, scanner effects.

The patient frame (:mod:`.anatomy`) is placed on the table with a per-study shift (a few mm in-plane,
a table position along z), so prior and current studies of a patient are not voxel-aligned, as in
real follow-up; labels.csv centroids are in the world LPS frame of each series.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import AnatomyParams, make_grid
from .hard_negatives import sample_hard_negatives
from .nodules import render_nodule
from .patients import NoduleState, PatientCase
from .phantom import BloodHU, lobe_map, render_anatomy, sample_blood
from .scanner import ScanParams, apply_scanner
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
    for s in states:
        spec = s.spec
        centre = centres[spec.nodule_id]
        box, occ = render_nodule(
            hu,
            fine,
            centre,
            s.shape,
            spec.body_hu,
            np.random.default_rng([spec.seed, stream]),
            core_scale=spec.core_scale,
            core_hu=spec.core_hu,
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
    return StudyImage(img, labels, lobes, origin_lps, centroids, images, blood, hard, shift)

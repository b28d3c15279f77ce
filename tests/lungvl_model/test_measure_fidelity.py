"""Measurement fidelity of refined nodules on hand-built native CT volumes (type, solid part, calcium, size).

Each volume is rendered on a fine grid (0.35 mm in-plane, 0.625 mm in z) and block-averaged to the
scanner grid (0.7 mm pixels, 1.25 or 5 mm slices), so thick slices carry the partial volume of a real
scan. Lung is -870 HU; a little noise (10 HU) is added. The mask handed to ``measure_finding`` is what
the refinement gives: the component above -650 HU (solid nodules, including their blurred rim) or
-760 HU (ground glass).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.anatomy import FissureModel, is_juxtapleural, lobe_from_position
from lungvl_model.inference.findings import classify_attenuation, measure_finding, peak_fraction

LUNG = -870.0
FINE = (0.625, 0.35, 0.35)
PIXEL = 0.7


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-grid voxel centres (mm) relative to the volume centre, shape ``shape``."""
    axes = [(np.arange(n) + 0.5) * s - n * s / 2 for n, s in zip(shape, FINE, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(
    zz: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    semi: tuple[float, float, float],
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    angle: float = 0.0,
) -> np.ndarray:
    """Inside an ellipsoid of semi-axes ``(a long in-plane, b short in-plane, c z)`` mm, rotated in-plane."""
    a, b, c = semi
    z, y, x = zz - centre[0], yy - centre[1], xx - centre[2]
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 + (z / c) ** 2 <= 1.0


def _scan(fine: np.ndarray, slice_mm: float, seed: int = 0) -> CTVolume:
    """Block-average a fine rendering to ``slice_mm`` slices and 0.7 mm pixels, add 10 HU noise."""
    fz, fy = int(round(slice_mm / FINE[0])), int(round(PIXEL / FINE[1]))
    z, y, x = (n // f for n, f in zip(fine.shape, (fz, fy, fy), strict=True))
    img = fine[: z * fz, : y * fy, : x * fy].reshape(z, fz, y, fy, x, fy).mean(axis=(1, 3, 5))
    img = img + np.random.default_rng(seed).normal(0.0, 10.0, img.shape)
    return CTVolume(img.astype(np.float32), (slice_mm, PIXEL, PIXEL))


def _refined(vol: CTVolume, threshold: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The component above ``threshold`` HU holding the volume centre, as a crop and its offset."""
    lab, _ = ndimage.label(vol.hu > threshold)
    centre = tuple(n // 2 for n in vol.shape)
    comp = lab == lab[centre]
    assert lab[centre] > 0
    idx = np.argwhere(comp)
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = comp[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return crop, (int(lo[0]), int(lo[1]), int(lo[2]))


def _render(
    shape: tuple[int, int, int],
    layers: list[tuple[tuple[float, float, float], float]],
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    angle: float = 0.0,
) -> np.ndarray:
    """Lung with nested ellipsoids ``[(semi-axes, HU), ...]`` drawn in order (later ones inside)."""
    zz, yy, xx = _grid(shape)
    hu = np.full(shape, LUNG, np.float32)
    for semi, value in layers:
        hu[_ellipsoid(zz, yy, xx, semi, centre, angle)] = value
    return hu


# a slice-aligned centre would flatter thick slices: shift the nodule by 0.3 of a 5 mm slice
SHIFT = (1.5, 0.2, -0.3)


@pytest.mark.parametrize("slice_mm", [1.25, 5.0])
def test_part_solid_10mm_with_5mm_core(slice_mm: float) -> None:
    hu = _render((64, 72, 72), [((5.0, 5.0, 5.0), -550.0), ((2.5, 2.5, 2.5), 20.0)], centre=SHIFT)
    vol = _scan(hu, slice_mm)
    f = measure_finding(vol, *_refined(vol, -760.0), 1.0)
    assert f.type == "part_solid"
    assert abs(f.solid_component_mm - 5.0) <= 1.5
    assert abs(f.mean_diameter_mm - 10.0) <= 1.5
    assert not f.calcified


@pytest.mark.parametrize("slice_mm", [1.25, 5.0])
def test_small_solid_nodule_stays_solid_on_thick_slices(slice_mm: float) -> None:
    # a 6 mm solid nodule on 5 mm slices peaks near -300 HU; the old fixed -300 HU rule called it non-solid
    hu = _render((64, 64, 64), [((3.0, 3.0, 3.0), 30.0)], centre=SHIFT)
    vol = _scan(hu, slice_mm)
    f = measure_finding(vol, *_refined(vol, -650.0), 1.0)
    assert f.type == "solid"
    assert f.solid_component_mm == f.mean_diameter_mm
    assert abs(f.mean_diameter_mm - 6.0) <= 0.1 * 6.0 + PIXEL
    assert not f.calcified


def test_calcified_nodule_with_central_calcification() -> None:
    # central calcification: a core of half the radius = 1/8 of the volume (the old 15 % rule missed it)
    hu = _render((48, 48, 48), [((3.0, 3.0, 3.0), 40.0), ((1.5, 1.5, 1.5), 700.0)])
    vol = _scan(hu, 1.25)
    f = measure_finding(vol, *_refined(vol, -650.0), 1.0)
    assert f.calcified
    assert f.type == "solid"


def test_soft_tissue_nodule_is_not_calcified() -> None:
    hu = _render((48, 48, 48), [((3.0, 3.0, 3.0), 60.0)])
    vol = _scan(hu, 1.25, seed=3)
    f = measure_finding(vol, *_refined(vol, -650.0), 1.0)
    assert not f.calcified


def test_pure_ground_glass_is_non_solid() -> None:
    hu = _render((48, 64, 64), [((4.0, 4.0, 4.0), -650.0)])
    vol = _scan(hu, 1.25)
    f = measure_finding(vol, *_refined(vol, -760.0), 1.0)
    assert f.type == "non_solid"
    assert f.solid_component_mm == 0.0
    assert abs(f.mean_diameter_mm - 8.0) <= 0.1 * 8.0


def test_ellipsoid_diameters_within_ten_percent() -> None:
    # 12 x 8 mm in-plane (rotated 30 degrees), 8 mm in z: long 12, short 8, mean 10 (Lung-RADS axes)
    hu = _render((48, 72, 72), [((6.0, 4.0, 4.0), 30.0)], angle=np.pi / 6)
    vol = _scan(hu, 1.25)
    f = measure_finding(vol, *_refined(vol, -650.0), 1.0)
    assert f.type == "solid"
    assert f.longest_diameter_mm == pytest.approx(12.0, rel=0.1)
    assert f.short_axis_mm == pytest.approx(8.0, rel=0.1)
    assert f.mean_diameter_mm == pytest.approx(10.0, rel=0.1)
    assert f.volume_mm3 == pytest.approx(4 / 3 * np.pi * 6 * 4 * 4, rel=0.25)


def test_rim_of_the_refined_mask_is_not_measured() -> None:
    # a soft kernel (1 mm PSF): the refined mask reaches -600 HU on the blurred edge; the measurement
    # follows the half-peak boundary, where the labels put the edge
    hu = ndimage.gaussian_filter(_render((48, 64, 64), [((4.0, 4.0, 4.0), 30.0)]), (0.0, 3.0, 3.0))
    vol = _scan(hu, 1.25)
    crop, offset = _refined(vol, -600.0)  # as the refinement cuts a solid nodule: into the blur
    f = measure_finding(vol, crop, offset, 1.0)
    assert f.mean_diameter_mm == pytest.approx(8.0, rel=0.1)


def test_peak_fraction_model() -> None:
    assert peak_fraction(10.0, 1.0) == 1.0
    assert peak_fraction(5.0, 5.0) == pytest.approx(0.45)
    assert peak_fraction(7.5, 5.0) == pytest.approx(0.675)
    assert peak_fraction(1.0, 5.0) == pytest.approx(0.35)  # clipped: noise is not amplified without bound


def test_classify_attenuation_rim_tolerance() -> None:
    assert classify_attenuation(10.0, 8.0) == "solid"
    assert classify_attenuation(10.0, 7.5) == "part_solid"
    assert classify_attenuation(10.0, 7.5, tolerance_mm=0.7) == "solid"
    assert classify_attenuation(10.0, 1.9) == "non_solid"
    assert classify_attenuation(5.0, 1.4) == "non_solid"
    assert classify_attenuation(10.0, 2.0) == "part_solid"


# ---------------------------------------------------------------- lobe from position (fissure geometry)


def _box_lungs() -> tuple[CTVolume, np.ndarray]:
    """Two box lungs, 100 mm high, 80 mm deep, on a 2 mm grid; identity direction (+x patient left)."""
    vol = CTVolume(np.zeros((50, 60, 80), np.float32), (2.0, 2.0, 2.0), origin=(-80.0, -60.0, -100.0))
    lungs = np.zeros(vol.shape, bool)
    lungs[:, 10:50, 5:35] = True  # patient right (x < 0)
    lungs[:, 10:50, 45:75] = True  # patient left
    return vol, lungs


def _at(vol: CTVolume, height: float, ap: float, right: bool) -> np.ndarray:
    """Voxel at a height above the base (0..1) and antero-posterior position (-1 front .. +1 back)."""
    z = height * 49  # LPS z rises with the index here: slice 0 is the base
    y = 10 + (ap + 1) / 2 * 39
    return np.array([z, y, 20.0 if right else 60.0])


@pytest.mark.parametrize(
    ("height", "ap", "right", "lobe"),
    [
        (0.65, 0.9, True, "RLL"),  # back of the chest, high: still below the oblique fissure
        (0.65, -0.9, True, "RUL"),  # same height at the front: above both fissures (old rule: RML)
        (0.45, -0.8, True, "RML"),
        (0.3, 0.0, True, "RLL"),
        (0.9, 0.5, True, "RUL"),
        (0.35, -0.9, False, "LUL"),  # lingula, low at the front (old rule: LLL)
        (0.6, 0.9, False, "LLL"),  # (old rule: LUL)
        (0.8, 0.0, False, "LUL"),
    ],
)
def test_lobe_follows_the_oblique_fissure(height: float, ap: float, right: bool, lobe: str) -> None:
    vol, lungs = _box_lungs()
    assert lobe_from_position(vol, _at(vol, height, ap, right), lungs) == lobe


def test_lobe_without_lungs_and_fissure_validation() -> None:
    vol, lungs = _box_lungs()
    assert lobe_from_position(vol, _at(vol, 0.1, 0.0, True), np.zeros_like(lungs)) == "RUL"
    with pytest.raises(ValueError, match="right_oblique"):
        FissureModel(right_oblique=(1.2, 0.3))
    with pytest.raises(ValueError, match="right_horizontal"):
        FissureModel(right_horizontal=0.0)


@pytest.mark.parametrize(("gap_px", "expected"), [(0, True), (2, True), (3, False), (6, False)])
def test_juxtapleural_gap_on_thick_slices(gap_px: int, expected: bool) -> None:
    # 0.7 mm pixels, 5 mm slices; the wall is (gap + 1) pixels from the nodule's edge voxel, the tolerance
    # 2 mm + one pixel = 2.7 mm: 2.1 mm yes, 2.8 mm no (the old 3-D rule accepted up to 2 + 5 = 7 mm)
    lungs = np.zeros((8, 40, 40), bool)
    lungs[:, :, 10:] = True  # chest wall at x < 10
    nodule = np.zeros_like(lungs)
    nodule[3:5, 18:22, 10 + gap_px : 14 + gap_px] = True
    assert is_juxtapleural(nodule, lungs, (5.0, 0.7, 0.7)) is expected


def test_juxtapleural_on_the_diaphragm() -> None:
    lungs = np.zeros((8, 40, 40), bool)
    lungs[2:, :, :] = True  # diaphragm below slice 2
    nodule = np.zeros_like(lungs)
    nodule[2:4, 18:22, 18:22] = True
    assert is_juxtapleural(nodule, lungs, (5.0, 0.7, 0.7))
    nodule[:] = False
    nodule[4:6, 18:22, 18:22] = True  # two 5 mm slices above it
    assert not is_juxtapleural(nodule, lungs, (5.0, 0.7, 0.7))

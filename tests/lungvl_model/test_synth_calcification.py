"""Calcified synthetic nodules show their calcium on thick slices; other nodules show none."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungvl_model.data.dicom_io import read_series
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.synth.anatomy import Grid
from lungvl_model.data.synth.cohorts import get_profile
from lungvl_model.data.synth.generator import SynthConfig, generate_site
from lungvl_model.data.synth.nodules import NoduleShape, render_nodule
from lungvl_model.data.synth.patients import (
    CALCIFIED_MAX_MM,
    NoduleSpec,
    calcified_min_diameter_mm,
    sample_patient,
)
from lungvl_model.data.synth.render import (
    CALCIUM_HU_CAP,
    CALCIUM_TARGET_PEAK_HU,
    calcium_density,
    scanner_blur,
)
from lungvl_model.data.synth.scanner import ScanParams

LUNG_HU = -850.0


def _scan(thickness_mm: float, psf_px: float) -> ScanParams:
    return ScanParams("Synth", "S1", "soft", "B30f", 120, 100.0, 5.0, thickness_mm, 20.0, psf_px, 1.0)


def _spec(diameter_mm: float, pattern: str, calcium_hu: float) -> NoduleSpec:
    unit = NoduleShape(1.0, 0.9, 0.85)
    shape = unit.scaled(diameter_mm / unit.mean_diameter())
    body = calcium_hu if pattern == "complete" else 35.0
    return NoduleSpec(
        1, "calcified", "smooth", pattern, "RUL", False, shape, 0.0, body, calcium_hu, 0.0, False, None, 1.0, 7
    )


def _lung(thickness_mm: float, sub: int) -> tuple[np.ndarray, Grid, np.ndarray]:
    grid = Grid((sub * 8, 20, 20), (thickness_mm / sub, 2.0, 2.0), (thickness_mm / sub / 2, 0.0, 0.0))
    centre = np.array([thickness_mm * 4.3, 19.3, 20.6])
    return np.full(grid.shape, LUNG_HU, np.float32), grid, centre


def _rendered_peak(
    hu: np.ndarray, grid: Grid, centre: np.ndarray, spec: NoduleSpec, h: float, scan: ScanParams
) -> float:
    work = hu.copy()
    complete = spec.calcification == "complete"
    render_nodule(
        work,
        grid,
        centre,
        spec.shape,
        h if complete else spec.body_hu,
        np.random.default_rng((spec.seed, 3)),
        core_scale=spec.core_scale,
        core_hu=spec.core_hu if complete else h,
    )
    return float(scanner_blur(work, scan.sub_slices, scan.psf_sigma_px).max())


def test_dense_enough_calcium_is_kept_as_drawn() -> None:
    """A 9 mm complete calcification on 1.25 mm slices without blur peaks at its own ~800 HU."""
    scan = _scan(1.25, 0.0)
    hu, grid, centre = _lung(1.25, 1)
    spec = _spec(9.0, "complete", 800.0)
    h, peak = calcium_density(hu, grid, centre, spec.shape, spec, (spec.seed, 3), scan)
    assert h == 800.0
    assert 780.0 < peak < 830.0  # 800 HU plus the +-6 HU texture at the fully occupied centre
    assert np.all(hu == LUNG_HU)  # the probes do not touch the volume


def test_calcium_is_raised_until_the_blurred_peak_reaches_the_target() -> None:
    """6 mm on 5 mm slices with a 2 mm pixel PSF: 700 HU is not enough; the raised density hits 450 HU."""
    scan = _scan(5.0, 1.0)
    hu, grid, centre = _lung(5.0, scan.sub_slices)
    spec = _spec(7.5, "complete", 700.0)
    assert _rendered_peak(hu, grid, centre, spec, 700.0, scan) < 300.0
    h, peak = calcium_density(hu, grid, centre, spec.shape, spec, (spec.seed, 3), scan)
    assert 700.0 < h <= CALCIUM_HU_CAP
    assert peak == pytest.approx(CALCIUM_TARGET_PEAK_HU, abs=0.5)
    assert _rendered_peak(hu, grid, centre, spec, h, scan) == pytest.approx(CALCIUM_TARGET_PEAK_HU, abs=1.0)
    assert calcium_density(hu, grid, centre, spec.shape, spec, (spec.seed, 3), scan) == (h, peak)


def test_bone_next_to_the_nodule_does_not_count_as_its_calcium() -> None:
    """A rib (750 HU) inside the probe region but outside the mask: the nodule still gets raised."""
    scan = _scan(5.0, 1.0)
    hu, grid, centre = _lung(5.0, scan.sub_slices)
    hu[:, :, 17:] = 750.0
    spec = _spec(7.5, "complete", 700.0)
    h, peak = calcium_density(hu, grid, centre, spec.shape, spec, (spec.seed, 3), scan)
    assert 700.0 < h <= CALCIUM_HU_CAP
    assert peak == pytest.approx(CALCIUM_TARGET_PEAK_HU, abs=0.5)


def test_too_small_calcium_is_capped_and_reported() -> None:
    """A 3 mm central calcification cannot survive 5 mm slices: capped density, peak below target."""
    scan = _scan(5.0, 1.0)
    hu, grid, centre = _lung(5.0, scan.sub_slices)
    spec = _spec(3.0, "central", 900.0)
    h, peak = calcium_density(hu, grid, centre, spec.shape, spec, (spec.seed, 3), scan)
    assert h == CALCIUM_HU_CAP
    assert peak < 300.0
    assert peak == pytest.approx(_rendered_peak(hu, grid, centre, spec, h, scan), abs=1.0)


def test_size_floor_by_slice_thickness() -> None:
    assert calcified_min_diameter_mm(1.0, "complete") == 3.0
    assert calcified_min_diameter_mm(1.25, "central") == 4.5
    assert calcified_min_diameter_mm(3.0, "complete") == 6.0
    assert calcified_min_diameter_mm(5.0, "complete") == 7.5
    with pytest.raises(ValueError, match="'diffuse'"):
        calcified_min_diameter_mm(5.0, "diffuse")


def test_sampled_calcified_nodules_respect_the_floor_and_pattern() -> None:
    """Over many patients: sizes within [floor, 9] mm, central calcification only on thin slices."""
    seen = 0
    for cohort in ("screening", "referral", "low_resource"):
        profile = get_profile(cohort)
        for i in range(150):
            case = sample_patient(profile, 5, i)
            thickest = max(case.scan.slice_thickness_mm, case.prior_scan.slice_thickness_mm)
            for n in case.nodules:
                if n.kind != "calcified":
                    continue
                seen += 1
                d = n.shape.mean_diameter()
                assert calcified_min_diameter_mm(thickest, n.calcification) - 1e-6 <= d <= CALCIFIED_MAX_MM + 1e-6
                assert n.calcification == "complete" or thickest <= 1.5
                assert n.body_hu >= 600.0 or n.calcification == "central"
            assert sample_patient(profile, 5, i) == case
    assert seen > 20


def _mask_values(site: Path) -> list[tuple[dict[str, str], np.ndarray]]:
    out = []
    rows = [r for r in csv.DictReader((site / "labels.csv").open()) if r["level"] == "nodule"]
    for r in rows:
        vol = read_series(sorted((site / "dicom" / r["study_uid"] / r["series_uid"]).glob("*")))
        lab = read_label_nifti(site / "annotations" / f"{r['series_uid']}.nii.gz", vol)
        out.append((r, vol.hu[lab == int(r["nodule_id"])]))
    return out


def test_thick_slice_site_shows_calcium_only_in_calcified_nodules(tmp_path: Path) -> None:
    """low_resource seed 1 (5 mm slices): one calcified and three solid nodules in two studies."""
    generate_site(SynthConfig(cohort="low_resource", n_studies=2, out_dir=tmp_path / "a", seed=1, matrix=160))
    found = _mask_values(tmp_path / "a")
    calcified = [v for r, v in found if r["calcification"] in ("1", "True")]
    solid = [v for r, v in found if r["calcification"] not in ("1", "True") and r["type"] == "solid"]
    assert len(calcified) == 1 and len(solid) == 3
    assert all(float(v.max()) >= 300.0 for v in calcified)
    assert all(float(v.max()) < 200.0 for v in solid)
    generate_site(SynthConfig(cohort="low_resource", n_studies=2, out_dir=tmp_path / "b", seed=1, matrix=160))
    again = _mask_values(tmp_path / "b")
    assert [r["nodule_id"] for r, _ in again] == [r["nodule_id"] for r, _ in found]
    assert all(np.array_equal(v, w) for (_, v), (_, w) in zip(found, again, strict=True))

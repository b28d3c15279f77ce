"""Mediastinum, great vessels, chest wall and diaphragm of the synthetic generator (hard negatives)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungvl_model.data.dicom_io import read_series_dir
from lungvl_model.data.site_check import check_site
from lungvl_model.data.site_layout import read_reports
from lungvl_model.data.synth.anatomy import (
    diaphragm_z,
    great_vessels,
    heart_rho,
    hilum_points,
    lobes_at,
    make_grid,
    mediastinal_nodes,
    mediastinal_structures,
    sample_anatomy,
)
from lungvl_model.data.synth.cohorts import PROFILES, get_profile
from lungvl_model.data.synth.generator import SynthConfig, generate_site, place_case_nodules, vessel_keep_out
from lungvl_model.data.synth.hard_negatives import HARD_NEGATIVE_FORMAT, RULES, hard_negative_path
from lungvl_model.data.synth.patients import sample_patients
from lungvl_model.data.synth.phantom import TISSUES, BloodHU, EmphysemaSpec, render_anatomy, sample_blood
from lungvl_model.data.synth.scanner import ScanParams, apply_scanner
from lungvl_model.data.synth.vessels import grow_trees

ANATOMY = sample_anatomy(np.random.default_rng(2), 220.0, 320.0, female=False)


def _capsule_dist(p: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points ``(N, 3)`` to a capsule's axis and the capsule radius there."""
    p0, p1 = seg[0:3], seg[3:6]
    d = p1 - p0
    t = np.clip((p - p0) @ d / float(d @ d), 0.0, 1.0)
    return np.linalg.norm(p - (p0 + t[:, None] * d), axis=1), seg[6] + (seg[7] - seg[6]) * t


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, np.ndarray]]:
    """One thorax rendered without and with contrast (tissue map, HU after a low-noise scanner)."""
    a = ANATOMY
    grid = make_grid(112, 320.0, 220.0, 2.5)
    trees = grow_trees(a, n_points=800)
    out = {}
    for contrast in (False, True):
        tissues = np.zeros(grid.shape, np.uint8)
        blood = sample_blood(contrast, np.random.default_rng(5))
        hu, lobes = render_anatomy(a, grid, trees, EmphysemaSpec(), np.random.default_rng(1), tissues, blood)
        scan = ScanParams("Test", "Phantom", "soft", "B30", 120, 200.0, 10.0, 1.25, 5.0, 0.9, 1.1, contrast)
        img = apply_scanner(hu, scan, np.random.default_rng(3))
        out["contrast" if contrast else "plain"] = {"img": img, "hu": hu, "tissues": tissues, "lobes": lobes}
    return out


def _median(r: dict[str, np.ndarray], name: str) -> float:
    sel = r["tissues"] == TISSUES.index(name)
    assert sel.sum() > 20, name
    return float(np.median(r["img"][sel]))


def test_blood_hu_ranges() -> None:
    plain = sample_blood(False, np.random.default_rng(0))
    assert not plain.contrast and 35.0 <= plain.aorta == plain.pulmonary_artery <= 50.0
    for seed in range(20):
        b = sample_blood(True, np.random.default_rng(seed))
        assert b.contrast and 180.0 <= b.aorta <= 280.0 and 150.0 <= b.pulmonary_artery <= 300.0
        assert b.myocardium > plain.myocardium and b.liver > plain.liver
    with pytest.raises(ValueError, match=r"BloodHU.aorta .* got 5000"):
        BloodHU(True, aorta=5000.0)


def test_hu_inside_each_new_structure(rendered: dict[str, dict[str, np.ndarray]]) -> None:
    plain, con = rendered["plain"], rendered["contrast"]
    for name in ("aorta", "pulmonary_artery"):
        assert 30.0 <= _median(plain, name) <= 60.0, name
        assert 150.0 <= _median(con, name) <= 300.0, name
    assert _median(con, "svc") > 200.0
    # heart: myocardium ~40 without contrast; with contrast the blood pool is bright (> 150 HU)
    heart_plain = plain["img"][plain["tissues"] == TISSUES.index("heart")]
    heart_con = con["img"][con["tissues"] == TISSUES.index("heart")]
    assert 25.0 <= float(np.median(heart_plain)) <= 60.0
    assert float(np.percentile(heart_con, 75)) > 150.0
    for r in (plain, con):
        st = r["tissues"] == TISSUES.index("sternum")
        cortex = r["hu"][st] > 500.0  # cortical bone 700-1000 HU, marrow ~200 HU in the phantom
        assert 0.1 < cortex.mean() < 0.8 and float(np.median(r["hu"][st][cortex])) > 700.0
        assert 150.0 <= float(np.median(r["hu"][st][~cortex])) <= 260.0
        assert float(r["img"][st].max()) > 350.0 and 120.0 <= float(np.median(r["img"][st])) <= 450.0
        assert 60.0 <= _median(r, "cartilage") <= 250.0
        assert _median(r, "vertebra") > 200.0
        nodes = r["tissues"] == TISSUES.index("lymph_node")  # 8-10 mm nodes: partial volume with the fat
        assert 0.0 <= float(np.median(r["hu"][nodes])) <= 100.0 and _median(r, "lymph_node") > -70.0
        dia = r["tissues"] == TISSUES.index("diaphragm")  # 4 mm muscle band under the lung: partial volume
        assert 35.0 <= float(np.median(r["hu"][dia])) <= 60.0 and _median(r, "diaphragm") > -150.0
        assert 30.0 <= _median(r, "spleen") <= 140.0 and _median(r, "airway_wall") > -600.0
    assert 45.0 <= _median(plain, "liver") <= 75.0 < _median(con, "liver") <= 110.0
    # intrapulmonary vessels carry the study's blood: enhanced with contrast
    assert _median(con, "vessel") > _median(plain, "vessel") + 60.0


def test_new_structures_lie_outside_the_lungs() -> None:
    a = ANATOMY
    rng = np.random.default_rng(0)
    for name, segs in great_vessels(a).items():
        for seg in segs:
            t = rng.uniform(0.0, 1.0, (300, 1))
            axis = seg[0:3] + t * (seg[3:6] - seg[0:3])
            r = (seg[6] + t * (seg[7] - seg[6])) * rng.uniform(0.0, 1.0, (300, 1)) ** (1 / 3)
            d = rng.normal(size=(300, 3))
            pts = axis + r * d / np.linalg.norm(d, axis=1, keepdims=True)
            assert (lobes_at(a, pts) == 0).all(), name
    hx, hy, hz, hax, hay, haz = a.heart
    box = rng.uniform([hz - haz, hy - hay, hx - hax], [hz + haz, hy + hay, hx + hax], (20000, 3))
    inside = heart_rho(a, box[:, 0], box[:, 1], box[:, 2]) < 1.0
    assert inside.sum() > 5000 and (lobes_at(a, box[inside]) == 0).all()
    nodes = mediastinal_nodes(a)
    assert (lobes_at(a, nodes[:, :3]) == 0).all()
    # below the diaphragm: no lung
    pts = rng.uniform([0.0, -80.0, -110.0], [80.0, 80.0, 110.0], (20000, 3))
    below = pts[:, 0] < diaphragm_z(a, pts[:, 0], pts[:, 1], pts[:, 2])
    assert below.sum() > 1000 and (lobes_at(a, pts[below]) == 0).all()


def test_pulmonary_arteries_end_at_the_hila_where_the_trees_start() -> None:
    a = ANATOMY
    hila = hilum_points(a)
    pa = great_vessels(a)["pulmonary_artery"]
    np.testing.assert_allclose(pa[1, 3:6], hila["artery_r"])
    np.testing.assert_allclose(pa[2, 3:6], hila["artery_l"])
    trees = grow_trees(a, n_points=600)
    roots = {tuple(np.round(v, 6)) for v in trees.vessels[:, 0:3]}
    assert all(tuple(np.round(p, 6)) in roots for p in hila.values())
    s = a.cav_ax / 118.0
    first = trees.vessels[np.isin(trees.vessels[:, 0:3], np.stack(list(hila.values()))).all(axis=1)]
    assert len(first) == 4 and (lobes_at(a, first[:, 3:6]) > 0).all()  # the first branches run into the lungs
    assert np.allclose(2 * first[:, 6], 13.0 * s) and 8.0 <= 13.0 * s <= 15.0  # hilar diameter 8-15 mm
    assert float(np.median(trees.vessels[:, 6])) < 1.0  # tapering to the periphery


def test_nodules_stay_in_the_lungs_clear_of_the_new_structures() -> None:
    profile = get_profile("referral")
    cases = [c for c in sample_patients(profile, 12, seed=4) if c.nodules][:6]
    dirs = np.random.default_rng(0).normal(size=(200, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for case in cases:
        a = sample_anatomy(np.random.default_rng(case.anatomy_seed), 220.0, 320.0, case.sex == "F")
        trees = grow_trees(a, n_points=600)
        centres, misses = place_case_nodules(case, a, trees)
        keep = vessel_keep_out(trees)
        for spec in case.nodules:
            c, r = centres[spec.nodule_id], spec.shape.bounding_radius()
            sphere = c + r * dirs
            if misses == 0:
                assert (lobes_at(a, sphere) > 0).all()
                assert all(np.linalg.norm(c - p) > r + rv for p, rv in keep)
            assert not mediastinal_structures(a, sphere[:, 0], sphere[:, 1], sphere[:, 2], 0.0).any()


def test_contrast_share_per_cohort() -> None:
    shares = {n: np.mean([c.scan.contrast for c in sample_patients(p, 300, seed=1)]) for n, p in PROFILES.items()}
    assert shares["screening"] == 0.0
    assert 0.32 <= shares["referral"] <= 0.48
    assert 0.17 <= shares["low_resource"] <= 0.33
    # the contrast draw leaves the rest of the patient unchanged (child stream)
    plain = replace_profile = get_profile("referral")
    a = sample_patients(plain, 5, seed=2)
    b = sample_patients(type(replace_profile)(**{**plain.__dict__, "contrast_fraction": 0.0}), 5, seed=2)
    assert [c.nodules for c in a] == [c.nodules for c in b] and [c.study_date for c in a] == [c.study_date for c in b]
    assert not any(c.scan.contrast for c in b)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anat") / "referral_site"
    generate_site(SynthConfig(cohort="referral", n_studies=3, out_dir=out, seed=6, matrix=96, prior_fraction=0.5))
    return out


def _studies(site: Path) -> list[tuple[Path, dict]]:
    out = []
    for study in sorted((site / "dicom").iterdir()):
        series = next(study.iterdir())
        out.append((series, json.loads(hard_negative_path(site, series.name).read_text())))
    return out


def test_contrast_tag_report_and_sidecar_agree(site: Path) -> None:
    reports, _ = read_reports(site / "reports.jsonl")
    seen = set()
    for series, doc in _studies(site):
        ds = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
        has_tag = "ContrastBolusAgent" in ds
        assert has_tag == doc["contrast"]
        assert (ds.ContrastBolusAgent == "IV") if has_tag else True
        text = reports[series.parent.name].text
        assert ("with intravenous contrast" in text) == doc["contrast"]
        assert ("without intravenous contrast" in text) != doc["contrast"]
        assert ("WITH CONTRAST" in ds.StudyDescription) == doc["contrast"]
        assert read_series_dir(series).meta.get("ContrastBolusAgent") == ("IV" if has_tag else None)
        seen.add(doc["contrast"])
    assert seen == {True, False}  # seed 6 gives both kinds


def test_hard_negative_points_lie_in_their_structures(site: Path) -> None:
    names = {r.name for r in RULES}
    for series, doc in _studies(site):
        assert doc["format"] == HARD_NEGATIVE_FORMAT and doc["series_uid"] == series.name
        vol = read_series_dir(series)
        structures = {p["structure"] for p in doc["points"]}
        assert structures <= names
        assert {"heart_border", "hilar_vessel", "aorta", "sternum", "chest_wall", "diaphragm"} <= structures
        for p in doc["points"]:
            k = np.rint(vol.lps_to_voxel(np.asarray(p["lps"], float)[None])[0]).astype(int)
            assert all(0 <= k[i] < vol.hu.shape[i] for i in range(3)), p
            win = vol.hu[k[0], max(k[1] - 1, 0) : k[1] + 2, max(k[2] - 1, 0) : k[2] + 2]
            hu = float(win.max())
            if p["structure"] in ("aorta", "pulmonary_artery"):
                centre = float(vol.hu[k[0], k[1], k[2]])
                assert (centre > 120.0) if doc["contrast"] else (-60.0 < centre < 120.0), p
            if p["structure"] in ("sternum", "vertebra", "rib"):
                assert hu > 150.0, p
            if p["structure"] in ("heart_border", "chest_wall", "diaphragm", "mediastinal_soft_tissue"):
                assert hu > -200.0, p


def test_hard_negative_geometry_in_the_patient_frame(site: Path) -> None:
    """Undo the table shift (origin - grid first) and check each point against the analytic anatomy."""
    cases = {c.patient_id: c for c in sample_patients(get_profile("referral"), 3, seed=6, prior_fraction=0.5)}
    for series, doc in _studies(site):
        ds = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
        case = cases[ds.PatientID]
        a = sample_anatomy(np.random.default_rng(case.anatomy_seed), 220.0, 320.0, case.sex == "F")
        grid = make_grid(96, 320.0, 220.0, float(ds.SliceThickness))
        vol = read_series_dir(series)
        shift = np.asarray(vol.origin) - np.asarray(grid.first)[::-1]  # LPS (x, y, z)
        vessels = great_vessels(a)
        hila = np.stack(list(hilum_points(a).values()))
        for p in doc["points"]:
            x, y, z = np.asarray(p["lps"]) - shift
            zyx = np.array([[z, y, x]])
            name = p["structure"]
            if name in ("aorta", "pulmonary_artery", "pulmonary_vein"):
                d = min(float(np.min(np.subtract(*_capsule_dist(zyx, s)))) for s in vessels[name])
                assert d < 1.0, p
            elif name == "heart_border":
                assert float(heart_rho(a, z, y, x)) < 1.0, p
            elif name == "hilar_vessel":
                assert lobes_at(a, zyx)[0] > 0 and float(np.linalg.norm(hila - zyx, axis=1).min()) < 35.5, p
            elif name == "diaphragm":
                assert z < float(diaphragm_z(a, z, y, x)) + 1.0, p
            elif name == "sternum":
                assert abs(x) < 22.5 and y < a.cav_yc, p


def test_site_check_accepts_the_sidecars(site: Path) -> None:
    report = check_site(site)
    text = json.dumps(report.to_dict())
    assert "hard_negatives" not in text
    assert not report.problems
    assert all(s["status"] == "usable" for s in report.studies), report.studies


def test_same_seed_gives_identical_dicom_and_sidecars(tmp_path: Path) -> None:
    kw = {"cohort": "referral", "n_studies": 2, "matrix": 40, "z_extent_mm": 100.0, "prior_fraction": 1.0, "seed": 6}

    def fingerprint(root: Path) -> tuple[list[bytes], list[str]]:
        pixels = [pydicom.dcmread(f).PixelData for f in sorted((root / "dicom").rglob("*.dcm"))]
        sidecars = [p.read_text() for p in sorted((root / "annotations").glob("*_hard_negatives.json"))]
        return pixels, sidecars

    a = fingerprint(generate_site(SynthConfig(out_dir=tmp_path / "a" / "site", **kw)).site_dir)
    b = fingerprint(generate_site(SynthConfig(out_dir=tmp_path / "b" / "site", **kw)).site_dir)
    assert len(a[1]) == 4 and a == b
    c = fingerprint(generate_site(SynthConfig(out_dir=tmp_path / "c" / "site", **{**kw, "seed": 7})).site_dir)
    assert c[1] != a[1] and c[0] != a[0]

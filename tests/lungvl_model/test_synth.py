"""Synthetic cohort generator: site layout, HU realism, nodule geometry, cohorts, determinism, labels."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from lungvl_model.clinical.lung_rads import NoduleFinding, categorize_exam, categorize_nodule
from lungvl_model.data.dicom_io import read_series_dir
from lungvl_model.data.measure import measure_nodule
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.site_layout import (
    LOBE_LABELS,
    SiteManifest,
    lobe_map_path,
    mask_path,
    read_labels,
    read_reports,
)
from lungvl_model.data.synth import (
    PROFILES,
    SynthConfig,
    design_shape,
    generate_site,
    sample_patient,
    sample_patients,
)
from lungvl_model.data.synth.anatomy import make_grid, sample_anatomy
from lungvl_model.data.synth.generator import GENERATOR, MARKER
from lungvl_model.data.synth.nodules import place_nodule, render_nodule
from lungvl_model.data.synth.phantom import TISSUES, EmphysemaSpec, render_anatomy
from lungvl_model.data.synth.render import label_from_occupancy
from lungvl_model.data.synth.scanner import ScanParams, add_noise, apply_scanner, sample_scan
from lungvl_model.data.synth.vessels import grow_trees

SMALL = {"matrix": 64, "z_extent_mm": 120.0}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[tuple[int, int, str]]]:
    out = tmp_path_factory.mktemp("synth") / "screening_site"
    calls: list[tuple[int, int, str]] = []
    cfg = SynthConfig(cohort="screening", n_studies=4, out_dir=out, seed=11, prior_fraction=1.0, **SMALL)
    summary = generate_site(cfg, progress=lambda d, t, m: calls.append((d, t, m)))
    return out, summary, calls


@pytest.fixture(scope="module")
def patients() -> dict[str, list]:
    return {name: sample_patients(p, 400, seed=5) for name, p in PROFILES.items()}


# ---------------------------------------------------------------------------------------------- layout


def test_site_has_every_file_of_the_layout(site) -> None:
    out, summary, calls = site
    assert all((out / f).is_file() for f in ("site.toml", "reports.jsonl", "labels.csv"))
    manifest = SiteManifest.from_toml(out / "site.toml")
    assert manifest.name == "screening_site" and manifest.cohort == "screening"
    assert manifest.extra["n_studies"] == 4 and manifest.extra["seed"] == 11
    toml_text = (out / "site.toml").read_text()
    assert "[privacy]" in toml_text and "epsilon_budget = 8.0" in toml_text and 'device = "auto"' in toml_text
    reports, problems = read_reports(out / "reports.jsonl")
    assert not problems
    lines = (out / "reports.jsonl").read_text().splitlines()
    assert len(lines) == len(reports) == summary.studies_written == 8  # 4 current + 4 priors
    assert all(json.loads(line)["text"].strip() for line in lines)
    studies = sorted(p.name for p in (out / "dicom").iterdir())
    assert sorted(reports) == studies
    rows, problems = read_labels(out / "labels.csv")
    assert not problems
    study_rows = [r for r in rows if r["level"] == "study"]
    assert sorted(r["study_uid"] for r in study_rows) == studies
    for r in study_rows:
        series = [p.name for p in (out / "dicom" / r["study_uid"]).iterdir()]
        assert series == [r["series_uid"]]
        assert mask_path(out, r["series_uid"]).is_file() and lobe_map_path(out, r["series_uid"]).is_file()
    assert calls[-1][0] == calls[-1][1] == 8


def test_nodule_rows_match_label_maps_and_volumes(site) -> None:
    out, summary, _ = site
    rows, _ = read_labels(out / "labels.csv")
    nodules = [r for r in rows if r["level"] == "nodule"]
    assert nodules and len(nodules) == summary.nodule_rows
    for r in nodules:
        for col in ("centroid_x_mm", "longest_diameter_mm", "short_axis_mm", "mean_diameter_mm", "volume_mm3",
                    "type", "solid_component_mm", "margin", "spiculation", "calcification", "juxtapleural",
                    "lobe", "context", "malignant", "brock_probability", "lung_rads"):  # fmt: skip
            assert r[col] != "", col
    by_series: dict[str, list[dict[str, str]]] = {}
    for r in nodules:
        by_series.setdefault(r["series_uid"], []).append(r)
    for series, rs in by_series.items():
        study = rs[0]["study_uid"]
        vol = read_series_dir(out / "dicom" / study / series)
        labels = read_label_nifti(mask_path(out, series), vol)
        lobes = read_label_nifti(lobe_map_path(out, series), vol)
        assert set(np.unique(labels)) - {0} == {int(r["nodule_id"]) for r in rs}
        for r in rs:
            k = int(r["nodule_id"])
            zyx = vol.lps_to_voxel(np.array([float(r[f"centroid_{a}_mm"]) for a in "xyz"]))
            idx = np.argwhere(labels == k)
            # the labelled voxels surround the true centroid (5 mm pixels here)
            assert np.linalg.norm((idx.mean(axis=0) - zyx) * np.array(vol.spacing)) < 6.0
            assert np.isin(lobes[labels == k], list(LOBE_LABELS.values())).mean() > 0.5


def _date(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%d")


def test_priors_share_patient_and_are_twelve_months_earlier(site) -> None:
    out, _, _ = site
    reports, _ = read_reports(out / "reports.jsonl")
    current = [r for r in reports.values() if r.prior_study_uid]
    assert len(current) == 4

    def header(study: str) -> pydicom.Dataset:
        series = next((out / "dicom" / study).iterdir())
        return pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)

    for r in current:
        assert r.prior_study_uid in reports
        now, before = header(r.study_uid), header(r.prior_study_uid)
        assert now.PatientID == before.PatientID
        assert now.SeriesInstanceUID != before.SeriesInstanceUID
        days = (_date(now.StudyDate) - _date(before.StudyDate)).days
        assert days == 365 and r.study_date == now.StudyDate
        assert now.PatientIdentityRemoved == "YES"
        for key in ("PatientName", "PatientBirthDate", "InstitutionName"):
            assert not str(now.get(key, "") or "")
        assert float(now.CTDIvol) > 0 and now.Manufacturer and now.ConvolutionKernel


def test_lung_rads_labels_follow_the_rule_engine(site) -> None:
    out, _, _ = site
    rows, _ = read_labels(out / "labels.csv")
    reports, _ = read_reports(out / "reports.jsonl")
    prior_of = {uid: r.prior_study_uid for uid, r in reports.items()}
    nodule_rows = [r for r in rows if r["level"] == "nodule"]
    prior_cat = {(r["study_uid"], r["nodule_id"]): r["lung_rads"] for r in nodule_rows}
    findings: dict[str, list[NoduleFinding]] = {}
    for r in nodule_rows:
        solid_smooth = r["type"] == "solid" and r["margin"] == "smooth"
        f = NoduleFinding(
            type=r["type"],
            mean_diameter_mm=float(r["mean_diameter_mm"]),
            solid_component_mm=float(r["solid_component_mm"]) if r["type"] == "part_solid" else None,
            context=r["context"],
            juxtapleural=r["juxtapleural"] == "1" and solid_smooth,
            benign_pattern=r["calcification"] == "1",
            suspicious_features=r["spiculation"] == "1",
            prior_category=prior_cat.get((prior_of.get(r["study_uid"]), r["nodule_id"])),
        )
        assert categorize_nodule(f) == r["lung_rads"], r
        if r["context"] == "growing":
            assert float(r["growth_mm"]) > 1.5
        findings.setdefault(r["study_uid"], []).append(f)
    for r in (r for r in rows if r["level"] == "study"):
        assert r["lung_rads"] == categorize_exam(findings.get(r["study_uid"], []))
        assert int(r["nodule_count"]) == len(findings.get(r["study_uid"], []))


# ------------------------------------------------------------------------------------------- HU realism


def _render(
    emphysema: EmphysemaSpec | None = None, sigma: float = 5.0, matrix: int = 128, psf: float = 0.9
) -> dict[str, object]:
    emphysema = emphysema or EmphysemaSpec()
    rng = np.random.default_rng(0)
    anatomy = sample_anatomy(rng, 160.0, 320.0, female=False)
    grid = make_grid(matrix, 320.0, 160.0, 1.25)
    tissues = np.zeros(grid.shape, np.uint8)
    hu, lobes = render_anatomy(anatomy, grid, grow_trees(anatomy, n_points=1500), emphysema, rng, tissues)
    occs = {}
    taken: list[tuple[np.ndarray, float]] = []
    for name, lobe, body_hu, core in (("solid", "RUL", 40.0, 0.0), ("ggo", "LLL", -550.0, 0.0)):
        shape = design_shape(np.random.default_rng(1), 12.0, "smooth")
        centre, ok = place_nodule(anatomy, LOBE_LABELS[lobe], shape.bounding_radius(), False, rng, taken)
        assert ok
        taken.append((centre, shape.bounding_radius()))
        box, occ = render_nodule(hu, grid, centre, shape, body_hu, rng, core_scale=core)
        full = np.zeros(grid.shape, bool)
        full[box] = occ >= 0.5
        occs[name] = full
    scan = ScanParams("Test", "Phantom", "soft", "B30", 120, 200.0, 10.0, 1.25, sigma, psf, 1.1)
    img = apply_scanner(hu, scan, rng)
    return {"img": img, "tissues": tissues, "lobes": lobes, **occs}


def test_tissue_hu_statistics() -> None:
    r = _render()
    img, tissues = r["img"], r["tissues"]

    def med(name: str) -> float:
        return float(np.median(img[tissues == TISSUES.index(name)]))

    assert -930 <= float(np.median(img[r["lobes"] > 0])) <= -770
    assert 0 <= med("muscle") <= 80
    assert -140 <= med("fat") <= -60
    assert med("bone") > 250
    assert med("air") < -950
    assert float(img[r["solid"]].mean()) > -300
    assert -800 <= float(img[r["ggo"]].mean()) <= -250


def test_emphysema_is_low_attenuation_and_upper_predominant() -> None:
    kw = {"matrix": 192, "psf": 0.35}  # screening resolution, sharp kernel
    r = _render(EmphysemaSpec("centrilobular", 0.12), **kw)
    emph = r["tissues"] == TISSUES.index("emphysema")
    lung = r["lobes"] > 0
    assert 0.06 < emph.sum() / lung.sum() < 0.2
    assert float(np.median(r["img"][emph])) < -940
    assert np.nonzero(emph)[0].mean() > np.nonzero(lung)[0].mean()  # upper-zone predominance
    laa = float((r["img"][lung] < -950).mean())
    none = _render(EmphysemaSpec(), **kw)
    assert laa > 0.05 > float((none["img"][none["lobes"] > 0] < -950).mean())


# ------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("margin", ["smooth", "lobulated", "spiculated"])
@pytest.mark.parametrize(("thickness", "pixel"), [(1.25, 1.25), (1.25, 1.667), (5.0, 1.667)])
def test_label_map_reproduces_designed_diameter(margin: str, thickness: float, pixel: float) -> None:
    rng = np.random.default_rng([len(margin), int(thickness * 100), int(pixel * 1000)])
    sub = max(1, round(thickness / 1.25))
    for d in (4.0, 6.0, 8.0, 15.0, 30.0):
        shape = design_shape(rng, d, margin)
        assert shape.mean_diameter() == pytest.approx(d, rel=1e-6)
        n = int(round(80 / pixel))
        grid = make_grid(n, n * pixel, 80.0, thickness, sub)
        hu = np.full(grid.shape, -850.0, np.float32)
        centre = np.array([40.0, 0.0, 0.0]) + rng.uniform(-1, 1, 3)
        box, occ = render_nodule(hu, grid, centre, shape, 40.0, rng)
        z0, mask = label_from_occupancy(occ, box[0].start, sub)
        full = np.zeros((grid.shape[0] // sub, *grid.shape[1:]), bool)
        full[z0 : z0 + mask.shape[0], box[1], box[2]] = mask
        m = measure_nodule(full, (thickness, pixel, pixel))
        assert abs(m.mean_diameter_mm - d) <= 1.0 * pixel, (d, m)
        if thickness < 2:
            assert m.volume_mm3 == pytest.approx(shape.volume_mm3(), rel=0.35 if d < 6 else 0.15)


def test_juxtapleural_nodules_touch_the_pleura() -> None:
    rng = np.random.default_rng(4)
    anatomy = sample_anatomy(rng, 220.0, 320.0, female=True)
    grid = make_grid(192, 320.0, 220.0, 2.0)
    from lungvl_model.data.synth.phantom import lobe_map

    lobes = lobe_map(anatomy, grid)
    for lobe in ("RUL", "LLL"):
        centre, ok = place_nodule(anatomy, LOBE_LABELS[lobe], 4.0, True, rng)
        assert ok
        idx = np.rint(grid.to_index(centre)).astype(int)
        assert lobes[tuple(idx)] == LOBE_LABELS[lobe]
        win = lobes[idx[0] - 2 : idx[0] + 3, idx[1] - 5 : idx[1] + 6, idx[2] - 5 : idx[2] + 6]
        assert (win == 0).any()  # lung surface within ~8 mm (4 mm radius + 1.5 mm gap + pixels)


# ------------------------------------------------------------------------------------------- cohorts


def test_cohorts_differ_as_documented(patients) -> None:
    thick = {n: {c.scan.slice_thickness_mm for c in cs} for n, cs in patients.items()}
    assert thick["screening"] <= {1.0, 1.25}
    assert thick["referral"] <= {2.5, 3.0, 5.0} and len(thick["referral"]) > 1
    assert thick["low_resource"] == {5.0}
    kernel = {n: {c.scan.kernel for c in cs} for n, cs in patients.items()}
    assert kernel == {"screening": {"sharp"}, "referral": {"soft"}, "low_resource": {"soft"}}
    med = {n: np.median([s.shape.mean_diameter() for c in cs for s in c.nodules]) for n, cs in patients.items()}
    assert med["screening"] < med["low_resource"] < med["referral"]
    prev = {n: np.mean([c.malignant for c in cs]) for n, cs in patients.items()}
    assert 0.01 <= prev["screening"] <= 0.09
    assert 0.30 <= prev["referral"] <= 0.55
    assert prev["screening"] < prev["low_resource"] < prev["referral"]
    priors = {n: np.mean([c.has_prior for c in cs]) for n, cs in patients.items()}
    assert priors["screening"] > 0.3 > priors["referral"] >= priors["low_resource"] - 0.05
    for cs in patients.values():
        assert 0.05 < np.mean([not c.nodules for c in cs]) < 0.5


@pytest.mark.parametrize("cohort", list(PROFILES))
def test_noise_sigma_measured_in_a_uniform_region(cohort: str) -> None:
    profile = PROFILES[cohort]
    scan = sample_scan(profile, np.random.default_rng(0))
    lo, hi = profile.noise_sigma_hu
    img = apply_scanner(np.full((8, 96, 96), 40.0, np.float32), scan, np.random.default_rng(1))
    sigma = float(img[:, 16:80, 16:80].std())
    assert sigma == pytest.approx(scan.noise_sigma_hu, rel=0.1)
    assert lo * 0.9 <= sigma <= hi * 1.1
    assert float(img.mean()) == pytest.approx(40.0, abs=0.1 * sigma)  # noise has zero mean
    sharp = add_noise(np.zeros((4, 64, 64), np.float32), 30.0, 0.5, np.random.default_rng(2))
    soft = add_noise(np.zeros((4, 64, 64), np.float32), 30.0, 1.2, np.random.default_rng(2))
    # soft kernels correlate neighbouring pixels more
    corr = [float(np.corrcoef(a[:, :, :-1].ravel(), a[:, :, 1:].ravel())[0, 1]) for a in (sharp, soft)]
    assert corr[0] < corr[1]


def test_malignancy_follows_brock(patients) -> None:
    pairs = [
        (n.brock_probability, n.malignant, n.kind)
        for cs in (patients["screening"], patients["referral"], patients["low_resource"])
        for c in cs
        for n in c.nodules
    ]
    assert not any(m for _, m, k in pairs if k == "calcified")
    b = np.array([p for p, _, k in pairs if k != "calcified"])
    m = np.array([y for _, y, k in pairs if k != "calcified"], float)
    assert np.corrcoef(b, m)[0, 1] > 0.2
    q = np.quantile(b, [0.25, 0.75])
    assert m[b >= q[1]].mean() > 3 * max(m[b <= q[0]].mean(), 0.01)


def test_growth_priors_and_contexts(patients) -> None:
    from lungvl_model.data.synth import nodule_states

    seen = set()
    for c in patients["screening"]:
        for s in nodule_states(c):
            seen.add(s.context)
            spec = s.spec
            assert s.brock_probability == pytest.approx(spec.brock_probability)
            if not c.has_prior:
                assert s.context == "baseline"
            elif spec.prior_scale is None:
                assert s.context == "new"
            elif not spec.malignant:
                assert spec.prior_scale == 1.0 and s.context == "stable" and s.growth_mm == pytest.approx(0.0)
            else:
                assert 0 < spec.prior_scale < 1 and s.growth_mm > 0
                assert 100 <= spec.vdt_days <= 400
        if c.has_prior:
            before = {s.spec.nodule_id: s for s in nodule_states(c, prior=True)}
            assert all(s.context == "baseline" for s in before.values())
            for s in nodule_states(c):
                if s.spec.nodule_id in before:
                    assert before[s.spec.nodule_id].mean_diameter_mm == pytest.approx(s.prior_mean_mm)
    assert {"baseline", "stable", "new"} <= seen


# --------------------------------------------------------------------------------------- determinism


def test_patients_do_not_depend_on_generation_order() -> None:
    p = PROFILES["referral"]
    assert sample_patient(p, 9, 3) == sample_patients(p, 5, 9)[3]
    assert sample_patient(p, 9, 3) != sample_patient(p, 10, 3)


def _fingerprint(out: Path) -> tuple[str, str, list[bytes]]:
    pixels = [pydicom.dcmread(f).PixelData for f in sorted((out / "dicom").rglob("*.dcm"))]
    return (out / "labels.csv").read_text(), (out / "reports.jsonl").read_text(), pixels


def test_same_seed_same_site_and_different_seed_differs(tmp_path: Path) -> None:
    kw = {"cohort": "referral", "n_studies": 2, "matrix": 48, "z_extent_mm": 80.0, "prior_fraction": 0.5}
    a = generate_site(SynthConfig(out_dir=tmp_path / "a" / "site", seed=3, **kw))
    b = generate_site(SynthConfig(out_dir=tmp_path / "b" / "site", seed=3, **kw))
    c = generate_site(SynthConfig(out_dir=tmp_path / "c" / "site", seed=4, **kw))
    fa, fb, fc = (_fingerprint(s.site_dir) for s in (a, b, c))
    assert fa == fb
    assert fa[0] != fc[0] and fa[2] != fc[2]
    # regenerating over a previous synthetic site replaces it
    again = generate_site(SynthConfig(out_dir=tmp_path / "a" / "site", seed=3, **kw))
    assert _fingerprint(again.site_dir) == fa


def test_foreign_dicom_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "x.dcm").write_bytes(b"hospital data")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_site(SynthConfig(cohort="screening", n_studies=1, out_dir=tmp_path, **SMALL))


TINY = {"cohort": "screening", "n_studies": 1, "matrix": 32, "z_extent_mm": 60.0, "prior_fraction": 0.0}


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_marker_lists_what_the_generator_wrote(site) -> None:
    out, _, _ = site
    marker = json.loads((out / MARKER).read_text())
    assert marker["generator"] == GENERATOR and marker["config"]["seed"] == 11
    written = [p for p in _listing(out) if not p.endswith(".dcm")]  # slices are written whole per series
    assert marker["entries"] == written


def test_synth_refuses_a_folder_with_user_files(tmp_path: Path) -> None:
    for i in range(7):
        (tmp_path / f"scan_{i}").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError) as e:
        generate_site(SynthConfig(out_dir=tmp_path, **TINY))
    assert "8 entries this generator did not write: notes.txt, scan_0, scan_1, scan_2, scan_3 (+3 more)" in str(e.value)
    assert _listing(tmp_path) == before
    with pytest.raises(FileExistsError, match="is not a folder"):
        generate_site(SynthConfig(out_dir=tmp_path / "notes.txt", **TINY))


def test_regenerating_its_own_site_removes_only_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "site"
    generate_site(SynthConfig(out_dir=out, **TINY))
    first = (out / "labels.csv").read_text()
    (out / ".cache").mkdir()  # the dataset's crop cache of the generated studies goes with them
    (out / ".cache" / "crop.npz").write_bytes(b"")
    generate_site(SynthConfig(out_dir=out, **{**TINY, "seed": 1}))
    assert not (out / ".cache").exists() and (out / "labels.csv").read_text() != first
    # an entry the user added, at the top or inside dicom/, is never removed: the run is refused
    (out / "my_results").mkdir()
    (out / "my_results" / "a.csv").write_text("x")
    (out / "dicom" / "1.2.3").mkdir()
    before = {p: (out / p).stat().st_mtime_ns for p in _listing(out)}
    with pytest.raises(FileExistsError, match=r"synthetic site but also holds 2 entries .*: dicom/1\.2\.3, my_results"):
        generate_site(SynthConfig(out_dir=out, **TINY))
    assert {p: (out / p).stat().st_mtime_ns for p in _listing(out)} == before
    # a site written before the marker existed is known by its site.toml
    shutil.rmtree(out / "my_results")
    (out / "dicom" / "1.2.3").rmdir()
    (out / MARKER).unlink()
    generate_site(SynthConfig(out_dir=out, **TINY))
    assert (out / "labels.csv").read_text() == first and (out / MARKER).is_file()


# --------------------------------------------------------------------------------------------- config


def test_config_round_trip() -> None:
    cfg = SynthConfig(cohort="low_resource", n_studies=3, out_dir=Path("x/y"), seed=2, prior_fraction=0.2)
    d = cfg.to_dict()
    assert d["out_dir"] == "x/y"
    assert SynthConfig.from_dict(d) == cfg
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cohort": "screenig"}, ValueError, "did you mean 'screening'"),
        ({"n_studies": 0}, ValueError, "n_studies"),
        ({"matrix": 16}, ValueError, "matrix"),
        ({"prior_fraction": 1.5}, ValueError, "prior_fraction"),
        ({"z_extent_mm": 10.0}, ValueError, "z_extent_mm"),
    ],
)
def test_invalid_args(kwargs: dict, error: type, match: str) -> None:
    base = {"cohort": "screening", "n_studies": 1, "out_dir": Path("x")}
    with pytest.raises(error, match=match):
        SynthConfig(**{**base, **kwargs})
    with pytest.raises(KeyError, match="no field"):
        SynthConfig.from_dict({**base, "bogus": 1})


def test_summary_statistics(site) -> None:
    _, summary, _ = site
    d = summary.to_dict()
    assert d["n_patients"] == 4 and d["priors_written"] == 4
    assert d["bytes_on_disk"] > 0 and d["seconds"] > 0
    assert d["stats"]["mean_slice_thickness_mm"] <= 1.25
    assert 35 <= d["stats"]["mean_noise_sigma_hu"] <= 60
    assert math.isclose(sum(d["stats"]["lung_rads"].values()), 4)
    assert replace(SynthConfig("screening", 1, Path("a")), seed=2).seed == 2


def test_dataset_items_carry_the_hard_negative_points_on_the_model_grid(site, tmp_path: Path) -> None:
    """Each synthetic series' hard-negative sidecar becomes a point map on the model's grid (the seg stage's
    hard-negative patch centres), and the cache keeps it apart from a site without sidecars."""
    from lungvl_model.data.catalogue import build_catalogue
    from lungvl_model.data.dataset import SiteDataset
    from lungvl_model.data.dicom_io import read_series
    from lungvl_model.data.preprocess import PreprocessConfig
    from lungvl_model.data.synth.hard_negatives import hard_negative_path, read_hard_negatives

    root = site[0]
    cfg = PreprocessConfig(spacing_mm=(5.0, 5.0, 5.0), size=(32, 48, 48))
    ds = SiteDataset(root, cfg)
    item = ds[0]
    assert item["hard_negatives"].shape == item["seg"].shape and item["hard_negatives"].dtype == torch.uint8
    entry = ds.entries[0][1]
    points = read_hard_negatives(root, read_series(entry.series.files))
    assert len(points) > 10
    marked = int(item["hard_negatives"].sum())
    assert 0 < marked <= len(points)  # several points can fall into one 5 mm voxel; points outside the crop drop
    assert not bool((item["hard_negatives"].bool() & (item["seg"] > 0)).all())
    # a copy of the site without its sidecars: zeros, from a cache entry of its own
    bare = tmp_path / "bare"
    shutil.copytree(root, bare)
    for e in build_catalogue(bare).usable:
        hard_negative_path(bare, e.series.series_uid).unlink()
    assert int(SiteDataset(bare, cfg)[0]["hard_negatives"].sum()) == 0

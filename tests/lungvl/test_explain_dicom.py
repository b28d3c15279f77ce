"""``lungvl explain`` and ``lungvl evaluate --export-dicom`` write a DICOM SEG + Comprehensive 3D SR.

The LIDC-IDRI-0001 tests run on the real case in ../shared/data/lidc (skipped when it is absent). A micro
checkpoint finds no real nodule there, so one test replaces the triage segmenter by the readers'
consensus (the ``seg_fn`` hook the DynUNet anchor uses): the rest of the pipeline (native-resolution
refinement, measurement, rules, report) and the export are lungvl's own.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lungvl.cli import app
from lungvl_model.data.dicom_io import read_series, scan_dicom_tree
from lungvl_model.data.lidc_consensus import annotate_series, slice_sop_uids
from lungvl_model.data.lidc_xml import parse_lidc_xml
from lungvl_model.data.preprocess import preprocess
from lungvl_model.data.site_layout import write_labels
from lungvl_model.export.write import write_dicom
from lungvl_model.inference.explain import explain_study
from lungvl_model.inference.findings import GridMap
from lungvl_model.inference.render import write_explanation
from lungvl_model.training.checkpoint import load_checkpoint
from tests.conftest import LIDC_DIR, micro_checkpoint, write_mini_site
from tests.lungvl_model.export.checks import check_seg, check_sr, dciodvfy

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    torch.manual_seed(1)
    return micro_checkpoint(tmp_path_factory.mktemp("ck"))


def _check_explain_dir(out: Path, files: list[Path]) -> dict:
    report = json.loads((out / "report.json").read_text())
    n = len(report["findings"])
    assert report["dicom"]["sr"] == "sr.dcm"
    assert (report["dicom"]["seg"] == "seg.dcm") == (n > 0) == (out / "seg.dcm").exists()
    seg_path = out / "seg.dcm" if n else None
    if seg_path is not None:
        check_seg(seg_path, files, report)
        dciodvfy(seg_path)
    check_sr(out / "sr.dcm", files, report, seg_path)
    dciodvfy(out / "sr.dcm")
    return report


def test_explain_cli_writes_seg_and_sr(tmp_path: Path, checkpoint: Path) -> None:
    series = write_mini_site(tmp_path / "site", 1, shape=(12, 32, 32))
    ((study, folder),) = series.items()
    out = tmp_path / "ex"
    res = runner.invoke(app, ["explain", "--model", str(checkpoint), "--dicom", str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    files = next(iter(scan_dicom_tree(folder).series.values())).files
    report = _check_explain_dir(out, files)
    assert report["study_uid"] == study and "sr.dcm" in res.output
    prov = report["provenance"]
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert prov["model_sha256"] == meta["model_sha256"] and prov["preset"] == "test"
    config = json.loads((checkpoint / "config.json").read_text())
    assert prov["config"] == config
    assert prov["config_sha256"] == hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    assert report["schema_version"] >= 1 and report["software_version"]
    by_site = tmp_path / "by_site"  # --site/--study reads the catalogue's file list: the same export
    argv = ["explain", "--model", str(checkpoint), "--site", str(tmp_path / "site"), "--study", study]
    res = runner.invoke(app, [*argv, "--out", str(by_site)])
    assert res.exit_code == 0, res.output
    _check_explain_dir(by_site, files)


def test_evaluate_export_dicom(tmp_path: Path, checkpoint: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 2, shape=(12, 32, 32))
    rows = [
        {"study_uid": uid, "level": "study", "lung_rads": "2" if i else "1", "malignant": i}
        for i, uid in enumerate(sorted(series))
    ]  # evaluate scores labelled studies only
    write_labels(site / "labels.csv", rows)
    dest = tmp_path / "dicom"
    res = runner.invoke(
        app,
        ["evaluate", str(site), "--model", str(checkpoint), "--out", str(tmp_path / "ev"), "--export-dicom", str(dest)],
    )
    assert res.exit_code == 0, res.output
    index = json.loads((dest / "index.json").read_text())
    assert sorted(r["study_uid"] for r in index) == sorted(series)
    for row in index:
        folder = dest / row["site"] / row["study_uid"]
        assert (dest / row["sr"]) == folder / "sr.dcm"
        files = next(iter(scan_dicom_tree(series[row["study_uid"]]).series.values())).files
        _check_explain_dir(folder, files)


def _lidc_series() -> tuple[Path, list[Path], Path]:
    case = LIDC_DIR / "LIDC-IDRI-0001"
    if not case.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found under {LIDC_DIR} (shared test data absent)")
    (info,) = scan_dicom_tree(case).series.values()
    (xml,) = case.rglob("*.xml")
    return case, list(info.files), xml


@pytest.mark.slow
def test_explain_cli_on_lidc_0001(tmp_path: Path, checkpoint: Path) -> None:
    case, files, _ = _lidc_series()
    out = tmp_path / "ex"
    res = runner.invoke(app, ["explain", "--model", str(checkpoint), "--dicom", str(case), "--out", str(out)])
    assert res.exit_code == 0, res.output
    _check_explain_dir(out, files)


@pytest.mark.slow
def test_lidc_0001_nodule_seg_and_sr(tmp_path: Path, one_thread: None) -> None:
    """The large nodule of LIDC-IDRI-0001, found by the readers' consensus as triage, exported and checked."""
    _, files, xml = _lidc_series()
    torch.manual_seed(2)
    model, _ = load_checkpoint(micro_checkpoint(tmp_path / "ck", spacing_mm=10.0))
    vol = read_series(files)
    ann = annotate_series(parse_lidc_xml(xml), vol, slice_sop_uids(files, vol))
    pre = preprocess(vol, model.config.input)
    grid = GridMap.from_origin(vol, pre.spacing_mm, pre.origin_zyx_mm)
    src = np.rint(grid.model_to_src(np.indices(pre.image.shape).reshape(3, -1).T)).astype(int)
    ok = np.all((src >= 0) & (src < np.asarray(vol.shape)), axis=1)
    prob = np.zeros(src.shape[0], np.float32)
    prob[ok] = (ann.label_map[src[ok, 0], src[ok, 1], src[ok, 2]] > 0) * 0.95
    prob = prob.reshape(pre.image.shape)
    assert prob.max() > 0, "the consensus nodule lies inside the model grid"
    exp = explain_study(model, vol, seg_fn=lambda image: prob)
    assert exp.findings, "the consensus triage gives at least one refined finding"
    t0 = time.perf_counter()
    write_dicom(exp, vol, files, tmp_path / "timing")  # header re-read + SEG + SR, built and written
    seconds = time.perf_counter() - t0
    write_explanation(exp, vol, tmp_path / "ex", source_files=files)
    out = tmp_path / "ex"
    report = _check_explain_dir(out, files)
    big = max(report["findings"], key=lambda f: f["volume_mm3"])
    assert big["longest_diameter_mm"] > 15  # the ~23 mm nodule
    sizes = {p.name: p.stat().st_size for p in (out / "seg.dcm", out / "sr.dcm")}
    n = len(report["findings"])
    print(f"\nLIDC-IDRI-0001: {n} finding(s); SEG + SR built and written in {seconds:.2f} s; {sizes}")

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from lungvl_model.data.dicom_io import write_ct_series
from lungvl_model.data.site_check import check_site
from lungvl_model.data.site_layout import write_labels
from tests.conftest import make_volume, write_mini_site


def _status(report) -> dict[str, dict]:
    return {s["study_uid"]: s for s in report.studies}


def test_clean_site_all_usable(mini_site) -> None:
    site, series = mini_site
    rep = check_site(site)
    assert rep.summary["usable"] == 3 and rep.summary["skipped"] == 0
    assert rep.summary["with_report"] == 3
    assert rep.phi == [] and rep.problems == []


def test_corrupted_file_and_non_ct_file_are_reported_rest_kept(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 3)
    uids = sorted(series)
    # 1) corrupt one slice of study 0 (truncated pixel data): that study is skipped with the reason
    victim = sorted(series[uids[0]].iterdir())[4]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 200])
    # 2) a non-CT (MR) study next to the others
    mr_vol = make_volume((4, 16, 16), study_uid="1.2.826.0.1.3680043.10.9", series_uid="1.2.826.0.1.3680043.10.9.1")
    paths = write_ct_series(mr_vol, site / "dicom" / "mr")
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    # 3) a file that is not DICOM at all, and a malformed report line
    (site / "dicom" / "readme.bin").write_bytes(b"\x00garbage")
    with (site / "reports.jsonl").open("a") as fh:
        fh.write('{"study_uid": "1.2.3", "text": \n')
    rep = check_site(site)
    st = _status(rep)
    assert st[uids[0]]["status"] == "skipped"
    assert "pixel data of slice" in st[uids[0]]["reason"] or "unreadable" in st[uids[0]]["reason"]
    assert st[uids[1]]["status"] == "usable" and st[uids[2]]["status"] == "usable"
    assert st["1.2.826.0.1.3680043.10.9"]["status"] == "skipped"
    assert "modality MR is not CT" in st["1.2.826.0.1.3680043.10.9"]["reason"]
    reasons = {Path(f["path"]).name: f["reason"] for f in rep.skipped_files}
    assert "not a DICOM file" in reasons["readme.bin"]
    assert any("reports.jsonl:4: not valid JSON" in p for p in rep.problems)
    assert rep.summary["usable"] == 2
    json.dumps(rep.to_dict())  # JSON-ready


def test_missing_slice_study_is_skipped(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 2)
    uid = sorted(series)[1]
    sorted(series[uid].iterdir())[3].unlink()
    st = _status(check_site(site))
    assert st[uid]["status"] == "skipped" and "missing slice" in st[uid]["reason"]


def test_phi_and_labels_reported(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 1)
    uid = next(iter(series))
    for p in series[uid].iterdir():
        ds = pydicom.dcmread(p)
        ds.PatientName = "Doe^John"
        ds.save_as(p)
    write_labels(
        site / "labels.csv",
        [
            {"study_uid": uid, "level": "study", "lung_rads": "2"},
            {"study_uid": uid, "level": "nodule", "nodule_id": 1, "type": "solid"},
        ],
    )
    rep = check_site(site)
    assert rep.phi == [{"study_uid": uid, "keyword": "PatientName", "value": "Doe^John"}]
    assert rep.studies[0]["labels"] == "study+1 nodule(s)"
    assert rep.summary["with_labels"] == 1

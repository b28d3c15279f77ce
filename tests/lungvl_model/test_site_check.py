from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from lungvl_model.data.dicom_io import write_ct_series
from lungvl_model.data.site_check import check_site
from lungvl_model.data.site_layout import LABEL_COLUMNS, write_labels
from tests.conftest import make_volume, write_mini_site


def _status(report) -> dict[str, dict]:
    return {s["study_uid"]: s for s in report.studies}


def test_clean_site_all_usable(mini_site) -> None:
    site, series = mini_site
    rep = check_site(site)
    assert rep.summary["usable"] == 3 and rep.summary["skipped"] == 0
    assert rep.summary["with_report"] == 3
    assert rep.problems == []
    # write_mini_site sets PatientID and StudyDate: both are in the PS3.15 basic profile; UIDs are not reported
    assert {(f["study_uid"], f["keyword"], f["value"]) for f in rep.phi} == {
        (uid, kw, v)
        for i, uid in enumerate(sorted(series))
        for kw, v in (("PatientID", f"SYN{i:03d}"), ("StudyDate", "20250101"))
    }
    assert rep.summary["phi_files_scanned"] == 30 and rep.summary["phi_studies"] == 3


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
    names = [f for f in rep.phi if f["keyword"] == "PatientName"]
    assert [(f["study_uid"], f["value"], f["tag"], f["action"]) for f in names] == [
        (uid, "Doe^John", "(0010,0010)", "Z")
    ]
    assert rep.studies[0]["labels"] == "study+1 nodule(s)"
    assert rep.summary["with_labels"] == 1


# PHI: every header of every series, the PS3.15 basic profile (dicom-anonymizer), UIDs excepted


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _phi(rep) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in rep.phi:
        out.setdefault(f["keyword"], []).append(f)
    return out


def test_phi_on_the_second_slice_only_is_found(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 1)
    uid = next(iter(series))
    second = sorted(series[uid].iterdir())[1]
    _edit(second, PatientName="Doe^Jane", InstitutionAddress="1 Main St", DeviceSerialNumber="SN-1234")
    found = _phi(check_site(site))
    assert [(f["value"], Path(f["file"]).name) for f in found["PatientName"]] == [("Doe^Jane", second.name)]
    assert found["InstitutionAddress"][0]["value"] == "1 Main St"
    assert found["DeviceSerialNumber"][0]["value"] == "SN-1234"


def test_patient_id_and_differing_values_are_each_reported_once_per_study(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 1)
    uid = next(iter(series))
    files = sorted(series[uid].iterdir())
    _edit(files[-1], PatientID="MRN-0042")
    found = _phi(check_site(site))
    assert sorted(f["value"] for f in found["PatientID"]) == ["MRN-0042", "SYN000"]  # 10 slices, 2 values
    assert found["PatientID"][0]["action"] == "Z/D" and found["PatientID"][0]["tag"] == "(0010,0020)"


def test_uids_are_not_reported(mini_site) -> None:
    site, _ = mini_site
    keywords = {f["keyword"] for f in check_site(site).phi}
    assert keywords == {"PatientID", "StudyDate"}
    assert not any(k.endswith("UID") for k in keywords)


def test_private_tags_one_finding_per_series(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 1)
    uid = next(iter(series))
    for i, p in enumerate(sorted(series[uid].iterdir())[:3]):
        ds = pydicom.dcmread(p)
        block = ds.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", "patient hash")
        if i == 2:
            block.add_new(0x02, "LO", "more")
        ds.save_as(p)
    found = _phi(check_site(site))["PrivateTags"]
    assert len(found) == 1
    assert found[0]["value"].startswith(f"3 private tag(s) in series {uid}.1: (0009,0010), (0009,1001), (0009,1002)")


def test_burned_in_annotation_yes_is_reported_no_is_not(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 2)
    a, b = sorted(series)
    _edit(sorted(series[a].iterdir())[5], BurnedInAnnotation="YES")
    for p in series[b].iterdir():
        _edit(p, BurnedInAnnotation="NO")
    found = _phi(check_site(site))["BurnedInAnnotation"]
    assert [(f["study_uid"], f["value"]) for f in found] == [(a, "YES")]


def test_phi_in_skipped_files_and_files_without_study_uid(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 1)
    uid = next(iter(series))
    src = sorted(series[uid].iterdir())[0]
    ds = pydicom.dcmread(src)
    ds.Modality, ds.SOPInstanceUID, ds.PatientName = "MR", "1.2.3.4.5.6", "Roe^Richard"
    ds.save_as(site / "dicom" / "mr.dcm")
    del ds.StudyInstanceUID
    ds.SOPInstanceUID, ds.OperatorsName = "1.2.3.4.5.7", "Tech^Tom"
    ds.save_as(site / "dicom" / "orphan.dcm")
    rep = check_site(site)
    found = _phi(rep)
    assert {(f["study_uid"], f["value"]) for f in found["PatientName"]} == {(uid, "Roe^Richard"), ("", "Roe^Richard")}
    assert [(f["study_uid"], f["value"]) for f in found["OperatorsName"]] == [("", "Tech^Tom")]
    assert rep.summary["phi_files_scanned"] == 12


# the command: site.toml validation, exit status, output


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from lungvl.cli import app

    return CliRunner().invoke(app, args)


def test_cli_clean_site_exit_0_phi_reported_and_fail_on_phi(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_mini_site(site, 2)
    out_json = tmp_path / "not" / "yet" / "r.json"
    res = _cli(["site", "check", str(site), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    assert "PatientID" in res.stdout and "UIDs are not counted" in res.stdout
    rep = json.loads(out_json.read_text())
    assert rep["summary"]["phi_findings"] == 4 and rep["phi"][0]["file"].endswith(".dcm")
    res = _cli(["site", "check", str(site), "--fail-on-phi"])
    assert res.exit_code == 1 and "PHI finding(s) (--fail-on-phi)" in res.stderr


def test_cli_labels_problem_exits_1_and_brackets_print_literally(tmp_path: Path) -> None:
    site = tmp_path / "site"
    uid = next(iter(write_mini_site(site, 1)))
    (site / "labels.csv").write_text(f"study_uid,level,lung_rads,[privacy]\n{uid},study,5,x\n")
    res = _cli(["site", "check", str(site)])
    assert res.exit_code == 1, res.output
    flat = " ".join(res.stdout.split())
    assert "unknown column '[privacy]' is ignored" in flat
    assert "labels.csv:2: column 'lung_rads' = '5' must be one of" in flat
    assert "site check failed" in res.stderr and "training skips those lines" in res.stderr


def test_cli_100k_bad_rows_summarised_output(tmp_path: Path) -> None:
    site = tmp_path / "site"
    uid = next(iter(write_mini_site(site, 1)))
    row = ",".join([uid, "nodule"] + [""] * (len(LABEL_COLUMNS) - 3))  # one field short
    (site / "labels.csv").write_text(",".join(LABEL_COLUMNS) + "\n" + (row + "\n") * 100_000)
    res = _cli(["site", "check", str(site)])
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert len(lines) < 50, res.stdout
    assert sum("labels.csv" in line for line in lines) <= 21
    assert "99,980 more rows with the same problem" in " ".join(res.stdout.split())
    assert "100,000 site.toml / reports.jsonl / labels.csv problem(s)" in res.stderr


def test_cli_fail_on_phi_passes_on_clean_headers(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 1)
    for p in next(iter(series.values())).iterdir():
        _edit(p, PatientID="", StudyDate="")  # present but empty: allowed by the profile
    res = _cli(["site", "check", str(site), "--fail-on-phi"])
    assert res.exit_code == 0, res.output
    assert "PHI: none of the PS3.15 basic-profile attributes" in " ".join(res.stdout.split())


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('[site]\nname = "a"\n[privacy]\nmax_rounds = -1\n', ["site.toml", "[privacy] max_rounds", "-1"]),
        ('[site]\nname = "a"\n[privacy]\nepsilon_budget = -2.0\n', ["site.toml", "[privacy] epsilon_budget", "-2"]),
        ('[site]\nname = "a"\n[privacy]\nrequire_dpsgd = true\n', ["site.toml", "'require_dpsgd'", "[privacy]"]),
        ('[site]\nname = "a"\n[privacy\n', ["site.toml", "not valid TOML", "line 3"]),
        (
            '[site]\nname = "a"\n[federation]\nsuperlink = "nohost"\nroot_certificates = "ca.pem"\nprivate_key = "k"\n',
            ["site.toml", "[federation] superlink", "'nohost'"],
        ),
        (
            '[site]\nname = "a"\n[federation]\nsuperlnk = "h:1"\n',
            ["site.toml", "'superlnk'", "[federation]", "did you mean 'superlink'"],
        ),
    ],
)
def test_cli_invalid_site_toml_exits_2_naming_file_key_value(tmp_path: Path, toml: str, needles: list[str]) -> None:
    site = tmp_path / "site"
    write_mini_site(site, 1)
    (site / "site.toml").write_text(toml)
    res = _cli(["site", "check", str(site)])
    assert res.exit_code == 2, res.output
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def test_cli_site_toml_not_utf8_exits_2_naming_file(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_mini_site(site, 1)
    (site / "site.toml").write_bytes(b'[site]\nname = "h\xf4pital"\n')
    res = _cli(["site", "check", str(site)])
    assert res.exit_code == 2 and "site.toml: not UTF-8 text (byte offset 16" in res.stderr, res.stderr


def test_cli_valid_federation_table_passes_without_key_files(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_mini_site(site, 1)
    with (site / "site.toml").open("a") as fh:
        fh.write('\n[federation]\nsuperlink = "coord.example:9092"\nroot_certificates = "ca.pem"\nprivate_key = "k"\n')
    res = _cli(["site", "check", str(site)])
    assert res.exit_code == 0, res.output


def test_cli_missing_site_or_dicom_exits_2(tmp_path: Path) -> None:
    assert _cli(["site", "check", str(tmp_path / "nowhere")]).exit_code == 2
    (tmp_path / "nodicom").mkdir()
    res = _cli(["site", "check", str(tmp_path / "nodicom")])
    assert res.exit_code == 2 and "no dicom/ folder" in res.stderr

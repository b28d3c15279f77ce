"""DICOM SEG + Comprehensive 3D SR of an explanation: re-read, checked against the source and report.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from lungvl_model.data.dicom_io import read_series, write_ct_series
from lungvl_model.data.preprocess import preprocess
from lungvl_model.export import codes
from lungvl_model.export.dicom_seg import build_seg
from lungvl_model.export.dicom_sr import build_sr, sr_text
from lungvl_model.export.source import order_like_volume, read_source_headers, source_headers
from lungvl_model.export.write import write_dicom
from lungvl_model.inference.explain import Explanation, explain_study
from lungvl_model.inference.findings import Finding, GridMap
from lungvl_model.inference.render import write_explanation
from lungvl_model.training.checkpoint import load_checkpoint
from tests.conftest import make_volume, micro_checkpoint
from tests.lungvl_model.export.checks import check_seg, check_sr, dciodvfy


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, one_thread: None):  # noqa: ANN201
    torch.manual_seed(0)
    m, _ = load_checkpoint(micro_checkpoint(tmp_path_factory.mktemp("ck"), spacing_mm=2.0))
    return m


@pytest.fixture
def series(tmp_path: Path) -> tuple[list[Path], object]:
    vol = make_volume((16, 40, 40), spacing=(2.5, 0.8, 0.8), seed=3)
    files = write_ct_series(vol, tmp_path / "ct", tags={"PatientID": "SYN7", "StudyDate": "20250101"})
    return files, read_series(files)


def oracle(model, volume, centre_zyx: np.ndarray | None):  # noqa: ANN001, ANN201
    """A segmenter on the model grid that marks a 3-voxel ball around ``centre_zyx`` (source voxels), or nothing."""
    pre = preprocess(volume, model.config.input)
    grid = GridMap.from_origin(volume, pre.spacing_mm, pre.origin_zyx_mm)
    prob = np.zeros(pre.image.shape, np.float32)
    if centre_zyx is not None:
        c = grid.src_to_model(centre_zyx)
        zz, yy, xx = np.indices(prob.shape)
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 2.5] = 0.95
    return lambda image: prob


def test_explain_writes_seg_and_sr_that_read_back(tmp_path: Path, model, series) -> None:  # noqa: ANN001
    files, vol = series
    exp = explain_study(model, vol, seg_fn=oracle(model, vol, np.array([8.0, 19.5, 19.5])))
    exp.provenance = {"model_sha256": "ab" * 32}
    assert len(exp.findings) >= 1, "the oracle segmenter marks the toy nodule"
    out = tmp_path / "ex"
    paths = write_explanation(exp, vol, out, source_files=list(reversed(files)))  # any file order
    report = json.loads((out / "report.json").read_text())
    assert report["dicom"]["seg"] == "seg.dcm" and report["dicom"]["sr"] == "sr.dcm"
    assert out / "seg.dcm" in paths and out / "sr.dcm" in paths
    seg = check_seg(out / "seg.dcm", files, report)
    assert seg.SeriesInstanceUID != report["series_uid"] and seg.DeviceSerialNumber == "ab" * 8
    values = check_sr(out / "sr.dcm", files, report, out / "seg.dcm")
    assert values["nodules"]["Nodule 1"]["Volume"] > 0
    assert pydicom.dcmread(out / "sr.dcm").SOPInstanceUID == report["dicom"]["sr_sop_instance_uid"]
    seg_lines, sr_lines = dciodvfy(out / "seg.dcm"), dciodvfy(out / "sr.dcm")
    print("\ndciodvfy SEG:", *sorted(set(seg_lines)), "dciodvfy SR:", *sorted(set(sr_lines)), sep="\n  ")
    # the same explanation exports the same UIDs (writing again replaces, never duplicates)
    again = write_dicom(exp, vol, files, tmp_path / "again")
    assert again.sr_uid == report["dicom"]["sr_sop_instance_uid"]
    assert again.seg_uid == report["dicom"]["seg_sop_instance_uid"]


def test_no_finding_gives_an_sr_that_says_so_and_no_seg(tmp_path: Path, model, series) -> None:  # noqa: ANN001
    files, vol = series
    exp = explain_study(model, vol, seg_fn=oracle(model, vol, None))
    assert exp.findings == []
    out = tmp_path / "ex"
    out.mkdir()
    (out / "seg.dcm").write_bytes(b"stale")  # from an earlier run with findings: must not survive
    write_explanation(exp, vol, out, source_files=files)
    report = json.loads((out / "report.json").read_text())
    assert report["dicom"]["seg"] is None and not (out / "seg.dcm").exists()
    values = check_sr(out / "sr.dcm", files, report, None)
    assert values["nodules"] == {} and values["study"]["Finding"] == "None"
    dciodvfy(out / "sr.dcm")


def _finding(index: int, offset: tuple[int, int, int], lobe: str = "RUL", kind: str = "solid") -> Finding:
    mask = np.zeros((3, 5, 5), bool)
    mask[1, 1:4, 1:4] = True
    mask[0, 2, 2] = True
    return Finding(
        centroid_zyx=(offset[0] + 1.0, offset[1] + 2.0, offset[2] + 2.0),
        centroid_lps=(0.0, 0.0, 0.0),
        longest_diameter_mm=3.39,
        short_axis_mm=2.4,
        mean_diameter_mm=2.9,
        volume_mm3=16.0,
        solid_component_mm=1.2,
        type=kind,
        calcified=False,
        lobe=lobe,
        index=index,
        lung_rads="2",
        brock_probability=0.0031,
        malignancy_probability=0.01234,
        growth_mm=0.4,
        offset=offset,
        mask=mask,
    )


def _explanation(vol, findings: list[Finding]) -> Explanation:  # noqa: ANN001
    return Explanation(
        study_uid=vol.study_uid, series_uid=vol.series_uid, findings=findings, sentences=[], text="",
        model={"malignancy_probability": 0.2, "lung_rads": "2"}, rule_lung_rads="2", emphysema_index=0.0,
        defer=False, defer_reasons=[], flags=[], patient={}, threshold=1.0,
    )  # fmt: skip


def test_overlapping_findings_keep_their_own_segments(tmp_path: Path, series) -> None:  # noqa: ANN001
    files, vol = series
    exp = _explanation(
        vol, [_finding(1, (6, 10, 10), "LLL", "part_solid"), _finding(2, (6, 11, 11), "RML", "non_solid")]
    )
    out = write_dicom(exp, vol, files, tmp_path)
    report = exp.to_dict()
    seg = check_seg(out.seg, files, report)  # type: ignore[arg-type]
    for f in exp.findings:  # overlapping masks: each segment holds its own finding's voxels
        arr = seg.get_volume(segment_numbers=[f.index], combine_segments=True).array
        assert int(np.count_nonzero(arr)) == int(f.mask.sum())  # type: ignore[union-attr]
    values = check_sr(out.sr, files, report, out.seg)
    assert values["nodules"]["Nodule 1"]["site"] == "Lower lobe of lung"
    assert values["nodules"]["Nodule 2"]["site"] == "Middle lobe of right lung"
    assert values["nodules"]["Nodule 1"]["Solid component mean diameter"] == 1.2
    assert values["nodules"]["Nodule 2"]["Mean diameter change since the prior study"] == 0.4
    dciodvfy(out.seg)  # type: ignore[arg-type]


def test_bad_input_is_named(tmp_path: Path, series) -> None:  # noqa: ANN001
    files, vol = series
    headers = read_source_headers(files)
    with pytest.raises(ValueError, match="2 source header"):
        order_like_volume(headers[:2], vol)
    shifted = [pydicom.Dataset(h) for h in headers]
    shifted[3].ImagePositionPatient = [0, 0, 1234.5]
    with pytest.raises(ValueError, match="not on a slice"):
        order_like_volume(shifted, vol)
    with pytest.raises(ValueError, match="unreadable DICOM header"):
        read_source_headers([tmp_path / "nothing.dcm"])
    exp = _explanation(vol, [_finding(1, (6, 10, 10))])
    with pytest.raises(ValueError, match="no SEG"):
        build_sr(exp.to_dict(), source_headers(files, vol), None)
    with pytest.raises(ValueError, match="numbered 1..1"):
        build_seg(_explanation(vol, [_finding(2, (6, 10, 10))]), vol, source_headers(files, vol))
    with pytest.raises(ValueError, match="nodule type 'cystic'"):
        codes.attenuation_code("cystic")
    bad = exp.to_dict()
    bad["findings"][0]["volume_mm3"] = "large"
    with pytest.raises(ValueError, match="'Volume' is 'large'"):
        build_sr(bad, source_headers(files, vol), build_seg(exp, vol, source_headers(files, vol)))


def test_sr_text_drops_control_characters() -> None:
    assert sr_text("A 6 mm\x04 nodule\x11.\n") == "A 6 mm nodule.\n"
    assert sr_text("RUL\tnodule\x00\u200b") == "RUL nodule"

"""Checks of an exported SEG / SR against the source series and report.json (shared by the export tests)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from lungvl_model.export.dicom_sr import NO_FINDING_TEXT, sr_text
from tests.conftest import dciodvfy_path

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's output lines for ``path``; fails on any line starting with "Error"."""
    res = subprocess.run([dciodvfy_path(), str(path)], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}:\n" + "\n".join(errors[:20])
    return lines


def _floats(values: Any) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64)


def check_seg(path: Path, files: Sequence[Path], report: Mapping[str, Any]) -> Any:
    """The SEG re-read: class, references, one segment per finding, frames on the source slices.

    Returns:
        The highdicom Segmentation.
    """
    raw = pydicom.dcmread(path)
    assert raw.SOPClassUID == SEG_CLASS and raw.SegmentationType == "BINARY"
    seg = hd.seg.segread(path)
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    first = next(iter(sources.values()))
    assert raw.StudyInstanceUID == report["study_uid"] == first.StudyInstanceUID
    assert raw.FrameOfReferenceUID == first.FrameOfReferenceUID
    (ref_series,) = raw.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == report["series_uid"]
    assert {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence} == set(sources)
    findings = report["findings"]
    assert [s.SegmentLabel for s in raw.SegmentSequence] == [f"Nodule {f['index']}" for f in findings]
    assert seg.get_segment_numbers() == list(range(1, len(findings) + 1))
    for s in raw.SegmentSequence:
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    shared = raw.SharedFunctionalGroupsSequence[0]
    iop = _floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient)
    spacing = _floats(shared.PixelMeasuresSequence[0].PixelSpacing)
    seen_segments = set()
    for frame in raw.PerFrameFunctionalGroupsSequence:
        src_uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        src = sources[src_uid]  # every frame lies on a source slice it names
        assert np.allclose(
            _floats(frame.PlanePositionSequence[0].ImagePositionPatient), _floats(src.ImagePositionPatient), atol=1e-3
        )
        assert np.allclose(iop, _floats(src.ImageOrientationPatient), atol=1e-5)
        assert np.allclose(spacing, _floats(src.PixelSpacing), atol=1e-6)
        ident = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        seen_segments.add(int(ident[0].ReferencedSegmentNumber))
    assert (raw.Rows, raw.Columns) == (first.Rows, first.Columns)
    assert seen_segments == set(range(1, len(findings) + 1))  # no empty segment
    return seg


def _texts(group: Any, code: str) -> list[str]:
    """TEXT items of a measurement group whose concept name is DCM ``code`` (121071 Finding, 121073 Impression)."""
    return [
        str(i.TextValue)
        for i in group[0].ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == code
    ]


def sr_values(sr: Any) -> dict[str, Any]:
    """The SR's content as plain values: per tracked nodule, and the study group."""
    out: dict[str, Any] = {"nodules": {}, "study": {}}
    for g in sr.content.get_volumetric_roi_measurement_groups():
        vals: dict[str, Any] = {"tracking_uid": g.tracking_uid, "segment": g.referenced_segment}
        for m in g.get_measurements():
            key = m.name.meaning if m.method is None else f"{m.name.meaning} / {m.method.meaning}"
            vals[key] = float(m.value)
        for q in g.get_qualitative_evaluations():
            vals[q.name.meaning] = q.value.meaning
        vals["site"] = g.finding_sites[0].value.meaning
        vals["text"] = _texts(g, "121071")
        out["nodules"][g.tracking_identifier] = vals
    (study,) = sr.content.get_image_measurement_groups()
    out["study"] = {q.name.meaning: q.value.meaning for q in study.get_qualitative_evaluations()}
    out["study"].update({m.name.meaning: float(m.value) for m in study.get_measurements()})
    out["study"]["text"] = _texts(study, "121071")
    out["study"]["impression"] = _texts(study, "121073")
    out["study"]["Finding"] = study.finding_type.meaning if study.finding_type is not None else None
    return out


def check_sr(path: Path, files: Sequence[Path], report: Mapping[str, Any], seg_path: Path | None) -> dict[str, Any]:
    """The SR re-read: class, evidence, references to the SEG, values equal to report.json's."""
    raw = pydicom.dcmread(path)
    assert raw.SOPClassUID == SR_3D_CLASS
    assert raw.StudyInstanceUID == report["study_uid"]
    sr = hd.sr.srread(path)
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in raw.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True) if seg_path is not None else None
    assert evidence == sources | ({str(seg.SOPInstanceUID)} if seg is not None else set())
    values = sr_values(sr)
    findings = report["findings"]
    assert sorted(values["nodules"]) == sorted(f"Nodule {f['index']}" for f in findings)
    for f in findings:
        v = values["nodules"][f"Nodule {f['index']}"]
        assert seg is not None
        (ref,) = v["segment"][0].ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and int(ref.ReferencedSegmentNumber) == f["index"]
        assert v["tracking_uid"] == seg.SegmentSequence[f["index"] - 1].TrackingUID
        assert v["Long axis"] == f["longest_diameter_mm"]
        assert v["Short axis"] == f["short_axis_mm"]
        assert v["Diameter"] == f["mean_diameter_mm"]
        assert v["Volume"] == f["volume_mm3"]
        if f.get("malignancy_probability") is not None:
            assert v["Probability of cancer / lungvl nodule-level risk head"] == f["malignancy_probability"]
        if f.get("brock_probability") is not None:
            assert v["Probability of cancer / Brock (PanCan) model, measured features"] == f["brock_probability"]
        if f.get("lung_rads"):
            assert v["Lung-RADS v2022 category"] == f"Lung-RADS {f['lung_rads']}"
        assert v["Nodule attenuation type"].lower().startswith(f["type"].split("_")[0])
        texts = [
            sr_text(s["text"])
            for s in report["sentences"]
            if s.get("nodule") == f["index"] and s.get("section") != "impression"
        ]
        assert v["text"] == [t for t in texts if t.strip()]
    study = values["study"]
    assert study["Probability of cancer"] == report["model"]["malignancy_probability"]
    assert study["Lung-RADS v2022 category"] == f"Lung-RADS {report['lung_rads_rule_engine']}"
    if not findings:
        assert study["Finding"] == "None"
        assert study["text"], "an SR without findings says so in text"
        assert NO_FINDING_TEXT in study["text"] or any(s.get("section") == "findings" for s in report["sentences"])
    return values

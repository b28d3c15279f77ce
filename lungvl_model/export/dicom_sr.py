"""A Comprehensive 3D SR (TID 1500 Measurement Report) of an explanation, built with highdicom.

Content, all taken from report.json's dict (so the SR's numbers are report.json's, same rounding):

- one volumetric ROI measurement group (TID 1411) per kept finding, tracked as "Nodule k" with the SEG
  segment's tracking UID and referencing segment ``k`` of the SEG (and the source series): finding
  site (lobe, with laterality), long axis, short axis and mean diameter (mm), volume (mm3), solid
  component (part-solid nodules) and growth since the prior (when measured), probability of cancer from
  the nodule-level risk head and from Brock (when computed), attenuation type and Lung-RADS v2022
  category (rule engine), and the generated finding sentence(s) as TEXT;
- one study-level group (TID 1501): the report's malignancy probability, the rule engine's and the
  model head's Lung-RADS category, the generated sentences not tied to one finding (impression), and,
  when no finding is kept, finding type (DCM 121071 Finding) = None (SCT 260413007) with the negative
  sentence as TEXT. A study without findings thus
  has an SR (and no SEG).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from lungvl_model.export import codes as c
from lungvl_model.export.dicom_seg import device_serial, export_seed

SR_SERIES_NUMBER = 902
NO_FINDING_TEXT = "No pulmonary nodule was found by lungvl."
GROWTH = Code("growth", c.SCHEME, "Mean diameter change since the prior study")
SOLID_COMPONENT = Code("solid-component", c.SCHEME, "Solid component mean diameter")


def _num(name: Code, value: Any, unit: Code, **kw: Any) -> hd.sr.Measurement:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"report.json value for {name.meaning!r} is {value!r}, not a number")
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, **kw)


def sr_text(text: str) -> str:
    """A generated sentence as a UT value: TAB becomes a space, other control characters but LF/CR are removed.

    UT allows only the LF, CR, FF and ESC control characters (dciodvfy rejects a TAB).
    """
    text = text.replace("\t", " ")
    return "".join(ch for ch in text if ch in "\n\r" or not unicodedata.category(ch).startswith("C"))


def _text(group: hd.sr.ContentSequence, name: Code, texts: Sequence[str]) -> None:
    """Append TEXT items (CONTAINS) to a measurement group's container (empty texts are skipped)."""
    container = group[0]
    for t in (sr_text(t) for t in texts):
        if t.strip():
            container.ContentSequence.append(
                hd.sr.TextContentItem(name=name, value=t, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            )


def finding_measurements(f: Mapping[str, Any]) -> list[hd.sr.Measurement]:
    """The numeric items of one finding (report.json ``findings[i]``)."""
    algo = c.sr_algorithm()
    out = [
        _num(c.LONG_AXIS, f["longest_diameter_mm"], c.MM, algorithm_id=algo),
        _num(c.SHORT_AXIS, f["short_axis_mm"], c.MM, algorithm_id=algo),
        _num(c.DIAMETER, f["mean_diameter_mm"], c.MM, derivation=c.MEAN, algorithm_id=algo),
        _num(c.VOLUME, f["volume_mm3"], c.MM3, algorithm_id=algo),
    ]
    if f.get("type") == "part_solid" and f.get("solid_component_mm") is not None:
        out.append(_num(SOLID_COMPONENT, f["solid_component_mm"], c.MM, algorithm_id=algo))
    if f.get("growth_mm") is not None:
        out.append(_num(GROWTH, f["growth_mm"], c.MM, algorithm_id=algo))
    if f.get("malignancy_probability") is not None:
        out.append(_num(c.PROBABILITY_OF_CANCER, f["malignancy_probability"], c.NO_UNITS, method=c.NODULE_RISK_HEAD))
    if f.get("brock_probability") is not None:
        out.append(_num(c.PROBABILITY_OF_CANCER, f["brock_probability"], c.NO_UNITS, method=c.BROCK))
    return out


def finding_group(
    f: Mapping[str, Any], seg: Dataset, segment: Dataset, series_uid: str, sentences: Sequence[str]
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The TID 1411 group of one finding, referencing its SEG segment."""
    evaluations = [hd.sr.QualitativeEvaluation(c.NODULE_ATTENUATION, c.attenuation_code(str(f.get("type", ""))))]
    if f.get("lung_rads"):
        evaluations.append(hd.sr.QualitativeEvaluation(c.LUNG_RADS, c.lung_rads_code(str(f["lung_rads"]))))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=str(segment.TrackingUID), identifier=f"Nodule {f['index']}"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=int(segment.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        ),
        finding_type=c.NODULE_TYPE,
        finding_category=c.NODULE_CATEGORY,
        algorithm_id=c.sr_algorithm(),
        finding_sites=[c.finding_site(str(f.get("lobe", "")))],
        measurements=finding_measurements(f),
        qualitative_evaluations=evaluations,
    )
    _text(group, c.FINDING, sentences)
    return group


def study_group(report: Mapping[str, Any], seed: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 study-level group: malignancy, Lung-RADS, unlinked sentences, or "no finding"."""
    model = report.get("model") or {}
    measurements = []
    if model.get("malignancy_probability") is not None:
        measurements.append(
            _num(c.PROBABILITY_OF_CANCER, model["malignancy_probability"], c.NO_UNITS, method=c.STUDY_RISK)
        )
    evaluations = []
    if report.get("lung_rads_rule_engine"):
        evaluations.append(hd.sr.QualitativeEvaluation(c.LUNG_RADS, c.lung_rads_code(report["lung_rads_rule_engine"])))
    if model.get("lung_rads"):
        evaluations.append(hd.sr.QualitativeEvaluation(c.LUNG_RADS_MODEL, c.lung_rads_code(model["lung_rads"])))
    findings = report.get("findings") or []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[seed, "study"]), identifier="Study"
        ),
        finding_type=None if findings else c.NONE,  # "Finding: None" when no nodule is kept
        finding_category=c.STUDY,
        algorithm_id=c.sr_algorithm(),
        finding_sites=[c.finding_site("")],
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    sentences = [s for s in report.get("sentences") or [] if not _linked(s, findings)]
    found = [str(s["text"]) for s in sentences if s.get("section") != "impression" and sr_text(str(s["text"])).strip()]
    if not findings:
        found = found or [NO_FINDING_TEXT]
    _text(group, c.FINDING, found)
    _text(group, c.IMPRESSION, [str(s["text"]) for s in sentences if s.get("section") == "impression"])
    return group


def _linked(sentence: Mapping[str, Any], findings: Sequence[Mapping[str, Any]]) -> bool:
    """A finding sentence about one kept finding (it goes into that finding's group)."""
    k = sentence.get("nodule")
    return sentence.get("section") != "impression" and any(f.get("index") == k for f in findings)


def _segments_by_number(seg: Dataset) -> dict[int, Dataset]:
    return {int(s.SegmentNumber): s for s in seg.SegmentSequence}


def build_sr(report: Mapping[str, Any], sources: Sequence[Dataset], seg: Dataset | None) -> Dataset:
    """The Comprehensive 3D SR of an explanation.

    Args:
        report: report.json's dict (:meth:`~lungvl_model.inference.explain.Explanation.to_dict`).
        sources: the source CT slices' headers (the SR references them and inherits patient/study).
        seg: the SEG of the same findings (:func:`~lungvl_model.export.dicom_seg.build_seg`); None only
            when the report has no finding.

    Returns:
        The SR dataset.

    Raises:
        ValueError: findings without a SEG, a SEG whose segments are not "Nodule 1..k" for the report's
            findings, a missing or non-numeric measurement (the message names the key and value).
    """
    findings = list(report.get("findings") or [])
    if not sources:
        raise ValueError("no source DICOM headers given for the SR")
    series_uid = str(report.get("series_uid") or sources[0].SeriesInstanceUID)
    if findings and seg is None:
        raise ValueError(f"report has {len(findings)} finding(s) but no SEG was given to reference")
    seed = export_seed(report, "sr")
    groups: list[Any] = []
    if seg is not None:
        segments = _segments_by_number(seg)
        if sorted(segments) != list(range(1, len(findings) + 1)):
            raise ValueError(f"SEG has segments {sorted(segments)}, report has {len(findings)} finding(s)")
        for k, f in enumerate(findings, start=1):
            for key in ("index", "longest_diameter_mm", "short_axis_mm", "mean_diameter_mm", "volume_mm3"):
                if key not in f:
                    raise ValueError(f"report.json findings[{k - 1}] has no {key!r}")
            if segments[k].SegmentLabel != f"Nodule {f['index']}":
                raise ValueError(f"SEG segment {k} is {segments[k].SegmentLabel!r}, report finding is {f['index']}")
            texts = [
                str(s["text"])
                for s in report.get("sentences") or []
                if s.get("nodule") == f["index"] and s.get("section") != "impression"
            ]
            groups.append(finding_group(f, seg, segments[k], series_uid, texts))
    groups.append(study_group(report, seed))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["lungvl device", device_serial(report)]),
        name=c.algorithm_name(),
        manufacturer_name=c.MANUFACTURER,
        model_name=c.MODEL_NAME,
        serial_number=device_serial(report),
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=c.DEVICE,
            observer_identifying_attributes=device,
        )
    )
    content = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=c.PROCEDURE, imaging_measurements=groups
    )
    evidence = [*sources, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content[0],
        series_instance_uid=generate_uid(entropy_srcs=[seed, "series"]),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[seed, "instance"]),
        instance_number=1,
        manufacturer=c.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="lungvl measurement report",
    )
    sr.CodingSchemeIdentificationSequence = [c.coding_scheme_identification()]
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: generated text and names may be outside Latin-1
    return sr

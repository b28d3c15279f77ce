"""ExamFacts from a DICOM header (hand-built CTVolume and the real LIDC-IDRI-0001 series) and exam_sentences."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from lungvl_model.data.dicom_io import HEADER_KEYS, read_series
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.exam_facts import ExamFacts, exam_sentences, parse_date, parse_dicom_age
from lungvl_model.inference.fact_check import check_report

LIDC = Path(__file__).resolve().parents[3] / "shared" / "data" / "lidc" / "LIDC-IDRI-0001"


def vol(meta: dict, spacing: tuple[float, float, float] = (2.5, 0.7, 0.7)) -> CTVolume:
    return CTVolume(np.zeros((2, 2, 2), np.float32), spacing, meta=meta)


@pytest.mark.parametrize(
    ("value", "years"),
    [("062Y", 62), ("62", 62), ("018M", 1), ("011M", 0), ("104W", 2), ("400D", 1), (71, 71), ("", None), ("abc", None),
     (None, None), ("200Y", None), (True, None)],
)  # fmt: skip
def test_parse_dicom_age(value, years):
    assert parse_dicom_age(value) == years


@pytest.mark.parametrize(
    ("value", "date"),
    [("20240105", dt.date(2024, 1, 5)), ("2024-01-05", dt.date(2024, 1, 5)), ("20241305", None), ("", None),
     (dt.date(2020, 2, 29), dt.date(2020, 2, 29))],
)  # fmt: skip
def test_parse_date(value, date):
    assert parse_date(value) == date


def test_full_header():
    meta = {
        "PatientAge": "067Y", "PatientSex": "F", "StudyDate": "20240105", "ConvolutionKernel": "B30f", "KVP": "120",
        "SliceThickness": "1.25", "ContrastBolusAgent": "OMNIPAQUE 350", "CTDIvol": 2.4,
    }  # fmt: skip
    f = ExamFacts.from_volume(vol(meta))
    assert f == ExamFacts(
        patient_age_years=67, patient_sex="F", slice_thickness_mm=1.25, slice_thickness_source="SliceThickness",
        kernel="B30f", contrast=True, low_dose=True, ctdi_vol_mgy=2.4, kvp=120.0, study_date=dt.date(2024, 1, 5),
    )  # fmt: skip


def test_missing_values_stay_none():
    f = ExamFacts.from_volume(vol({"PatientAge": "", "PatientSex": "O"}, spacing=(3.0, 0.7, 0.7)))
    assert f.patient_age_years is None and f.patient_sex is None and f.kernel is None and f.kvp is None
    assert (f.slice_thickness_mm, f.slice_thickness_source) == (3.0, "spacing")  # no SliceThickness: the spacing
    assert f.contrast is None and f.low_dose is None and f.study_date is None and f.pack_years is None
    assert exam_sentences(f) == ["CT of the chest, reconstructed at 3 mm."]


@pytest.mark.parametrize(
    ("meta", "keys", "contrast"),
    [
        ({"ContrastBolusAgent": "IV"}, HEADER_KEYS, True),
        ({"ContrastBolusAgent": "NONE"}, HEADER_KEYS, False),
        ({}, HEADER_KEYS, None),  # no agent and no description: the header says nothing
        ({"StudyDescription": "CT CHEST WITHOUT CONTRAST"}, HEADER_KEYS, False),
        ({"StudyDescription": "CT CHEST W/ IV CONTRAST"}, HEADER_KEYS, True),
    ],
)
def test_contrast(meta, keys, contrast):
    assert ExamFacts.from_volume(vol(meta)).contrast is contrast


@pytest.mark.parametrize(
    ("meta", "site", "low_dose"),
    [
        ({"CTDIvol": "3.0"}, None, True),
        ({"CTDIvol": 3.01}, None, False),
        ({"CTDIvol": 9.5, "StudyDescription": "LOW DOSE SCREENING"}, None, False),  # the measured dose wins
        ({"StudyDescription": "CT LOW DOSE LUNG SCREENING"}, None, True),
        ({}, {"low_dose": "1"}, True),
        ({}, None, None),
    ],
)
def test_low_dose(meta, site, low_dose):
    assert ExamFacts.from_volume(vol(meta), site).low_dose is low_dose


def test_site_metadata_fills_gaps_header_wins():
    site = {"age": "70", "sex": "M", "smoking_pack_years": "30", "smoking_status": "former",
            "prior_study_date": "2023-01-04", "study_date": "2024-01-05"}  # fmt: skip
    f = ExamFacts.from_volume(vol({"PatientAge": "067Y", "PatientSex": "F"}), site)
    assert (f.patient_age_years, f.patient_sex) == (67, "F")
    assert (f.pack_years, f.smoking_status) == (30.0, "former")
    assert (f.study_date, f.prior_study_date) == (dt.date(2024, 1, 5), dt.date(2023, 1, 4))
    g = ExamFacts.from_volume(vol({}), site)
    assert (g.patient_age_years, g.patient_sex) == (70, "M")
    # impossible site values are dropped, not raised: a malformed source must not stop the explanation
    bad = ExamFacts.from_volume(vol({"StudyDate": "20240105"}), {"prior_study_date": "2024-02-01", "pack_years": -3})
    assert bad.prior_study_date is None and bad.pack_years is None and bad.study_date == dt.date(2024, 1, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patient_age_years": -1}, "patient_age_years"),
        ({"patient_age_years": 62.5}, "patient_age_years"),
        ({"patient_sex": "X"}, "patient_sex"),
        ({"slice_thickness_mm": 0.0, "slice_thickness_source": "spacing"}, "slice_thickness_mm"),
        ({"slice_thickness_mm": 1.0}, "slice_thickness_source"),
        ({"slice_thickness_mm": 1.0, "slice_thickness_source": "guess"}, "slice_thickness_source"),
        ({"kvp": float("nan")}, "kvp"),
        ({"pack_years": -2.0}, "pack_years"),
        ({"smoking_status": "sometimes"}, "smoking_status"),
        ({"study_date": dt.date(2024, 1, 1), "prior_study_date": dt.date(2024, 1, 1)}, "prior_study_date"),
    ],
)
def test_invalid_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExamFacts(**kwargs)


def test_exam_sentences_only_what_is_known():
    assert exam_sentences(ExamFacts()) == []
    assert exam_sentences(ExamFacts(patient_sex="F")) == ["Female patient."]
    assert exam_sentences(ExamFacts(pack_years=0.0)) == ["Never smoker."]
    full = ExamFacts(
        patient_age_years=62, patient_sex="M", slice_thickness_mm=2.5, slice_thickness_source="SliceThickness",
        kernel="LUNG", contrast=False, low_dose=True, ctdi_vol_mgy=1.9, kvp=120.0, study_date=dt.date(2024, 5, 2),
        prior_study_date=dt.date(2023, 5, 1), pack_years=30.0, smoking_status="former",
    )  # fmt: skip
    assert exam_sentences(full) == [
        "62-year-old male, former smoker, 30 pack-year smoking history.",
        "Low-dose CT of the chest without intravenous contrast, reconstructed at 2.5 mm with a LUNG kernel, 120 kVp, "
        "CTDIvol 1.9 mGy.",
        "Comparison: CT of 2023-05-01.",
    ]
    # read back by the fact check, every fact they state is supported
    fc = check_report(exam_sentences(full), [], full, rule_lung_rads=None, has_prior=True)
    assert fc.n_unsupported == 0 and fc.n_contradictions == 0
    stated = {"age", "sex", "smoking", "pack_years", "low_dose", "contrast", "slice_thickness", "kernel", "kvp", "ctdi"}
    assert {v.fact for v in fc.verdicts} >= stated | {"prior", "prior_date"}


@pytest.fixture(scope="module")
def lidc_volume() -> CTVolume:
    files = sorted(LIDC.glob("*/*/*.dcm"))
    if not files:
        pytest.skip(f"{LIDC} not available")
    return read_series(files)


def test_real_lidc_header(lidc_volume):
    f = ExamFacts.from_volume(lidc_volume)
    # de-identified by TCIA: age and sex are empty, the date is shifted to 2000-01-01
    assert f.patient_age_years is None and f.patient_sex is None
    assert (f.slice_thickness_mm, f.slice_thickness_source) == (2.5, "SliceThickness")
    assert f.kernel == "STANDARD" and f.kvp == 120.0 and f.study_date == dt.date(2000, 1, 1)
    assert f.contrast is True  # the file says ContrastBolusAgent "IV"
    assert f.low_dose is None and f.ctdi_vol_mgy is None
    assert exam_sentences(f)[0].startswith("CT of the chest")
    # the brief's hallucination: a 1.25 mm reconstruction of this 2.5 mm series; age/sex it never had
    fc = check_report(
        ["Axial 1.25 mm soft-kernel reconstructions.", "68-year-old woman, screening."],
        [], f, rule_lung_rads="1", has_prior=False,
    )  # fmt: skip
    got = {(v.fact, v.verdict) for v in fc.verdicts}
    assert got == {("slice_thickness", "contradiction"), ("kernel", "supported"), ("age", "unsupported"),
                   ("sex", "unsupported")}  # fmt: skip
    assert fc.kept_sentences == ["Axial 1.25 mm soft-kernel reconstructions."] and fc.defer

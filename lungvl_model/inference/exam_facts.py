"""What the exam itself says: patient and technique facts from the DICOM header and site metadata.

A generated report may only state a patient or technique fact that one of these sources gives.
:class:`ExamFacts` holds them, every field None when no source says (never a default: the explanation's
Brock inputs assume an age of 62 when the header has none, a report must not); :func:`exam_sentences`
writes the technique and patient sentences of a report from them alone.

Sources, in order: the header values :func:`lungvl_model.data.dicom_io.read_series` keeps in
``CTVolume.meta`` (``PatientAge``, ``PatientSex``, ``StudyDate``, ``StudyDescription``, ``ConvolutionKernel``,
``KVP``, ``SliceThickness``, ``ContrastBolusAgent``, ``CTDIvol``), then the
site's metadata for the study (``labels.csv`` study row, ``reports.jsonl`` record, protocol keys of
``site.toml``): ``age``, ``sex``, ``smoking_pack_years``, ``smoking_status``, ``study_date``,
``prior_study_date``, ``contrast``, ``low_dose``, ``ctdi_vol_mgy``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference import fact_patterns as FP

__all__ = ["LOW_DOSE_CTDI_MGY", "SMOKING_STATUSES", "ExamFacts", "exam_sentences", "parse_dicom_age", "parse_date"]

#: CTDIvol (mGy) at or below which an exam counts as low-dose: the ACR lung cancer screening limit for a
#: standard-size patient (ACR CT accreditation, LCS module: CTDIvol <= 3.0 mGy). Above it the exam is not
#: called low-dose (a large patient's screening exam may exceed it: the site's ``low_dose`` key then says so).
LOW_DOSE_CTDI_MGY = 3.0
SMOKING_STATUSES: tuple[str, ...] = ("never", "former", "current")
_THICKNESS_SOURCES = ("SliceThickness", "spacing")


def parse_dicom_age(value: Any) -> int | None:
    """Age in whole years from a DICOM AS value (``"062Y"``, ``"018M"``, ``"003W"``, ``"010D"``) or a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value) if math.isfinite(value) and 0 <= value < 150 else None
    m = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD]?)\s*", str(value), re.IGNORECASE)
    if m is None:
        return None
    n, unit = int(m.group(1)), (m.group(2) or "Y").upper()
    years = {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[unit]
    return years if years < 150 else None


def parse_date(value: Any) -> dt.date | None:
    """A date from ``YYYYMMDD``, ``YYYY-MM-DD`` or a :class:`datetime.date`; None when empty or malformed."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value or "").strip()
    m = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})", text)
    if m is None:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        v = float(str(value).strip("[]'\" "))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value or "").strip().lower()
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n"):
        return False
    return None


def _kernel(value: Any) -> str | None:
    """First value of a (possibly multi-valued) ConvolutionKernel, as written."""
    text = str(value or "").strip()
    if text.startswith("["):  # pydicom's str() of a MultiValue: "['B30f', '3']"
        text = text.strip("[]").split(",")[0].strip(" '\"")
    text = text.split("\\")[0].strip()
    return text or None


@dataclass(frozen=True)
class ExamFacts:
    """Patient and technique facts of one exam; every field is None when no source gives it.

    Attributes:
        patient_age_years: age at the study (years).
        patient_sex: ``F`` or ``M``.
        slice_thickness_mm: reconstructed slice thickness (mm).
        slice_thickness_source: ``SliceThickness`` (header) or ``spacing`` (the distance between slice centres,
            used when the header has no thickness).
        kernel: reconstruction kernel (ConvolutionKernel, as written).
        contrast: intravenous contrast given (ContrastBolusAgent present: True; read and absent: False).
        low_dose: low-dose exam (CTDIvol <= :data:`LOW_DOSE_CTDI_MGY`, else the study description, else site).
        ctdi_vol_mgy: CTDIvol (mGy).
        kvp: tube voltage (kV).
        study_date: date of the study.
        prior_study_date: date of the prior study compared with, when there is one.
        pack_years: smoking pack-years (site metadata only; no header has it).
        smoking_status: ``never`` | ``former`` | ``current`` (site metadata only).
    """

    patient_age_years: int | None = None
    patient_sex: str | None = None
    slice_thickness_mm: float | None = None
    slice_thickness_source: str | None = None
    kernel: str | None = None
    contrast: bool | None = None
    low_dose: bool | None = None
    ctdi_vol_mgy: float | None = None
    kvp: float | None = None
    study_date: dt.date | None = None
    prior_study_date: dt.date | None = None
    pack_years: float | None = None
    smoking_status: str | None = None

    def __post_init__(self) -> None:
        age = self.patient_age_years
        if age is not None and not (isinstance(age, int) and 0 <= age < 150):
            raise ValueError(f"ExamFacts.patient_age_years must be an int in [0, 150), got {age!r}")
        if self.patient_sex not in (None, "F", "M"):
            raise ValueError(f"ExamFacts.patient_sex must be 'F', 'M' or None, got {self.patient_sex!r}")
        for key in ("slice_thickness_mm", "ctdi_vol_mgy", "kvp"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"ExamFacts.{key} must be a finite number > 0 or None, got {v!r}")
        if (self.slice_thickness_mm is None) != (self.slice_thickness_source is None) or (
            self.slice_thickness_source not in (None, *_THICKNESS_SOURCES)
        ):
            raise ValueError(
                f"ExamFacts.slice_thickness_source must be one of {_THICKNESS_SOURCES} with a thickness (None "
                f"without one), got {self.slice_thickness_source!r} for {self.slice_thickness_mm!r} mm"
            )
        if self.pack_years is not None and not (math.isfinite(self.pack_years) and 0 <= self.pack_years < 500):
            raise ValueError(f"ExamFacts.pack_years must be in [0, 500) or None, got {self.pack_years!r}")
        if self.smoking_status not in (None, *SMOKING_STATUSES):
            raise ValueError(
                f"ExamFacts.smoking_status must be one of {SMOKING_STATUSES} or None, got {self.smoking_status!r}"
            )
        if self.study_date and self.prior_study_date and self.prior_study_date >= self.study_date:
            raise ValueError(
                f"ExamFacts.prior_study_date {self.prior_study_date} must be before study_date {self.study_date}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (dates as ISO strings)."""
        d = asdict(self)
        for key in ("study_date", "prior_study_date"):
            d[key] = d[key].isoformat() if d[key] else None
        return d

    @classmethod
    def from_volume(
        cls,
        volume: CTVolume,
        site: Mapping[str, Any] | None = None,
    ) -> ExamFacts:
        """Facts of the exam from its header (``volume.meta``) and optional site metadata.

        Args:
            volume: the CT; ``meta`` holds header values, ``spacing[0]`` the slice spacing (mm).
            site: the study's site metadata (see the module docstring); a header value wins over it.

        Returns:
            The facts; unparseable or impossible values (a prior date not before the study date, negative
            pack-years) count as missing, so a malformed header never stops the explanation.
        """
        meta, extra = volume.meta, dict(site or {})
        thickness = _float(meta.get("SliceThickness"))
        source = "SliceThickness" if thickness and thickness > 0 else None
        if source is None:
            thickness, source = float(volume.spacing[0]), "spacing"
        age = parse_dicom_age(meta.get("PatientAge"))
        if age is None:
            age = parse_dicom_age(extra.get("age") or None)
        sex = str(meta.get("PatientSex", "")).strip().upper()
        if sex not in ("F", "M"):
            sex = str(extra.get("sex", "")).strip().upper()
        ctdi = _float(meta.get("CTDIvol"))
        if ctdi is None:
            ctdi = _float(extra.get("ctdi_vol_mgy"))
        description = " ".join(str(meta.get(k, "")) for k in ("StudyDescription", "SeriesDescription"))
        study_date = parse_date(meta.get("StudyDate")) or parse_date(extra.get("study_date"))
        prior_date = parse_date(extra.get("prior_study_date"))
        if study_date and prior_date and prior_date >= study_date:
            prior_date = None  # not a prior of this study (a date shifted by de-identification?): says nothing
        pack = _float(extra.get("smoking_pack_years", extra.get("pack_years")))
        return cls(
            patient_age_years=age,
            patient_sex=sex if sex in ("F", "M") else None,
            slice_thickness_mm=thickness,
            slice_thickness_source=source,
            kernel=_kernel(meta.get("ConvolutionKernel")),
            contrast=_contrast(meta, description, extra),
            low_dose=_low_dose(ctdi, description, extra),
            ctdi_vol_mgy=ctdi if ctdi and ctdi > 0 else None,
            kvp=_positive(_float(meta.get("KVP"))),
            study_date=study_date,
            prior_study_date=prior_date,
            pack_years=pack if pack is not None and 0 <= pack < 500 else None,
            smoking_status=_status(extra.get("smoking_status")),
        )


def _positive(v: float | None) -> float | None:
    return v if v is not None and v > 0 else None


def _status(value: Any) -> str | None:
    text = str(value or "").strip().lower()
    return text if text in SMOKING_STATUSES else None


def _contrast(meta: Mapping[str, Any], description: str, site: Mapping[str, Any]) -> bool | None:
    """Contrast from ContrastBolusAgent, else the study description, else the site; else None.

    A missing ContrastBolusAgent is not read as "no contrast": the Contrast/Bolus module is conditional
    (required when contrast was used), but exports drop it often enough that its absence is no evidence.
    """
    agent = str(meta.get("ContrastBolusAgent", "") or "").strip()
    if agent:
        return agent.upper() not in ("NONE", "NO", "N/A")
    stated = {f.value for f in FP.technique_facts(description) if f.fact == "contrast"}
    if len(stated) == 1:
        return stated.pop()
    return _bool(site.get("contrast"))


def _low_dose(ctdi: float | None, description: str, site: Mapping[str, Any]) -> bool | None:
    if ctdi is not None and ctdi > 0:
        return ctdi <= LOW_DOSE_CTDI_MGY
    stated = {f.value for f in FP.technique_facts(description) if f.fact == "low_dose"}
    if len(stated) == 1:
        return stated.pop()
    return _bool(site.get("low_dose"))


def _patient_sentence(f: ExamFacts) -> str | None:
    sex = {"F": "female", "M": "male", None: None}[f.patient_sex]
    if f.patient_age_years is not None:
        who = f"{f.patient_age_years}-year-old {sex or 'patient'}"
    elif sex is not None:
        who = f"{sex.capitalize()} patient"
    else:
        who = ""
    smoking: list[str] = []
    if f.smoking_status is not None:
        smoking.append(f"{f.smoking_status} smoker")
    if f.pack_years is not None and f.pack_years > 0:
        smoking.append(f"{f.pack_years:g} pack-year smoking history")
    elif f.pack_years == 0 and f.smoking_status is None:
        smoking.append("never smoker")
    parts = [p for p in (who, ", ".join(smoking)) if p]
    if not parts:
        return None
    text = ", ".join(parts)
    return text[0].upper() + text[1:] + "."


def exam_sentences(facts: ExamFacts) -> list[str]:
    """The patient, technique and comparison sentences of a report, written only from ``facts``.

    A None field is left out, never filled in. For example ``["62-year-old female, 30 pack-year smoking
    history.", "CT of the chest without intravenous contrast, reconstructed at 2.5 mm with a LUNG kernel.",
    "Comparison: CT of 2023-04-01."]``.

    Args:
        facts: the exam's facts.

    Returns:
        Zero to three sentences.
    """
    out: list[str] = []
    patient = _patient_sentence(facts)
    if patient:
        out.append(patient)
    head = "Low-dose CT of the chest" if facts.low_dose else "CT of the chest"
    clauses = [head]
    if facts.contrast is not None:
        clauses[0] += " with intravenous contrast" if facts.contrast else " without intravenous contrast"
    recon = []
    if facts.slice_thickness_mm is not None:
        recon.append(f"reconstructed at {facts.slice_thickness_mm:g} mm")
    if facts.kernel is not None:
        recon.append(f"with a {facts.kernel} kernel")
    if recon:
        clauses.append(" ".join(recon))
    technique = ", ".join(clauses)
    dose = []
    if facts.kvp is not None:
        dose.append(f"{facts.kvp:g} kVp")
    if facts.ctdi_vol_mgy is not None:
        dose.append(f"CTDIvol {facts.ctdi_vol_mgy:g} mGy")
    if dose or technique != head or facts.low_dose:
        out.append(technique + (", " + ", ".join(dose) if dose else "") + ".")
    if facts.prior_study_date is not None:
        out.append(f"Comparison: CT of {facts.prior_study_date.isoformat()}.")
    return out

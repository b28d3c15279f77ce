"""Find identifying DICOM attributes that would be a problem if anything derived from them left a site.

lungvl never sends DICOM headers anywhere, but hospital IT wants to know what an export holds before
it is used. The check lists attributes (of the PS3.15 basic confidentiality profile that identify
a person or an institution) that are present and non-empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

#: Attributes reported when present and non-empty.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "MedicalRecordLocator",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
)


@dataclass(frozen=True)
class PHIFinding:
    """One identifying attribute found in a file."""

    path: Path
    keyword: str
    value: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.keyword} = {self.value!r}"


def _is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, pydicom.Sequence):
        return len(value) == 0
    return str(value).strip() in ("", "^", "^^^^")


def phi_in_dataset(ds: Dataset, path: Path | str = "") -> list[PHIFinding]:
    """Identifying attributes present and non-empty in one header."""
    found = []
    for kw in PHI_KEYWORDS:
        if kw in ds and not _is_empty(ds.get(kw)):
            value = ds.get(kw)
            text = f"sequence of {len(value)} item(s)" if isinstance(value, pydicom.Sequence) else str(value)
            found.append(PHIFinding(Path(path), kw, text[:64]))
    return found


def phi_in_files(paths: Iterable[Path], *, max_files: int | None = 1) -> list[PHIFinding]:
    """Identifying attributes in the headers of ``paths``.

    Args:
        paths: DICOM files (typically the slices of one series).
        max_files: read at most this many files (headers of one series are usually identical); None
            reads all of them.

    Returns:
        The findings, unique by (keyword, value).
    """
    seen: set[tuple[str, str]] = set()
    out: list[PHIFinding] = []
    for i, p in enumerate(paths):
        if max_files is not None and i >= max_files:
            break
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for f in phi_in_dataset(ds, p):
            if (f.keyword, f.value) not in seen:
                seen.add((f.keyword, f.value))
                out.append(f)
    return out

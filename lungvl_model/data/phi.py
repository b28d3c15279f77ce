"""Find identifying DICOM attributes that would be a problem if anything derived from them left a site.

lungvl never sends DICOM headers anywhere, but hospital IT wants to know what an export holds before
it is used. The profile is the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile
(Table E.1-1) as maintained by the ``dicom-anonymizer`` package (Kitware;
``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c``), not a hand list. Reported, when
present with a non-empty value:

* every attribute of the profile (names, IDs incl. PatientID, dates and times, addresses, descriptions,
  device serial numbers, institution, sequences that may hold any of these...), with its profile action
  (``X`` remove, ``Z`` empty, ``D`` dummy value, or a combination). A ``D``/``Z`` attribute may already
  hold a pseudonym or a dummy: the check cannot tell, a person must;
* private attributes (odd group): one finding per series, with their count and the first few tags;
* ``BurnedInAnnotation`` = ``YES`` (identifying text in the pixels themselves).

Not reported: the UID attributes the profile replaces (action ``U``: StudyInstanceUID,
SeriesInstanceUID, SOPInstanceUID, FrameOfReferenceUID...) and the sequences of UID references
(action ``X/Z/U*``: Referenced/Source Image Sequence). StudyInstanceUID and SeriesInstanceUID are the
keys of the site data contract (DESIGN.md section 2: ``reports.jsonl`` and ``labels.csv`` name studies by
them), so they are expected in every file. Elements after the pixel data (e.g. Digital Signatures) are
not read: headers are read with ``stop_before_pixels``.

The scan runs while :func:`~lungvl_model.data.dicom_io.scan_dicom_tree` reads the headers, so every file
is read once; findings are unique per study by (keyword, value), with the file where each was first seen.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

#: Profile categories of dicom-anonymizer reported (its ``U_TAGS`` and ``X_Z_U_STAR_TAGS`` are not).
REPORTED_ACTIONS: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
}
#: Private tags named in a finding (the count covers all of them).
PRIVATE_TAGS_SHOWN = 5
#: Characters of a value kept in a finding.
MAX_VALUE_CHARS = 64
PRIVATE_KEYWORD = "PrivateTags"
BURNED_IN_KEYWORD = "BurnedInAnnotation"
_BURNED_IN_TAG = 0x00280301


@dataclass(frozen=True)
class Profile:
    """The attributes to report: exact tags, and repeating groups ``(group, element, group mask, element mask)``."""

    exact: dict[int, str]
    masked: tuple[tuple[int, int, int, int, str], ...]

    @functools.cached_property
    def masked_high_bytes(self) -> frozenset[int]:
        """High bytes of the groups a masked entry can match (all 256 when a mask leaves them open)."""
        out: set[int] = set()
        for g, _, gm, _, _ in self.masked:
            out |= {g >> 8} if gm & 0xFF00 == 0xFF00 else set(range(256))
        return frozenset(out)

    def watched(self, tag: int) -> bool:
        """Cheap pre-filter: True when ``tag`` may have an action (see :meth:`action`)."""
        return tag in self.exact or (tag >> 24) in self.masked_high_bytes

    def action(self, tag: int) -> str | None:
        """The profile action of ``tag`` when it is reported, else None."""
        hit = self.exact.get(tag)
        if hit is not None:
            return hit
        group, elem = tag >> 16, tag & 0xFFFF
        for g, e, gm, em, act in self.masked:
            if group & gm == g and elem & em == e:
                return act
        return None


@functools.cache
def basic_profile() -> Profile:
    """PS3.15 Table E.1-1 (basic profile) from dicom-anonymizer, without the UID (``U``) actions."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, act in REPORTED_ACTIONS.items():
        for t in getattr(table, category):
            if len(t) == 2:
                exact[(t[0] << 16) | t[1]] = act
            else:
                masked.append((t[0], t[1], t[2], t[3], act))
    return Profile(exact, tuple(masked))


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class PHIFinding:
    """One identifying attribute found in a file.

    Attributes:
        path: the file where it was first seen.
        keyword: DICOM keyword (the tag when pydicom has none), ``PrivateTags`` or ``BurnedInAnnotation``.
        value: its value (first :data:`MAX_VALUE_CHARS` characters), or a description.
        tag: ``(gggg,eeee)``.
        action: the profile action (``X``, ``Z``, ``D``, ``X/Z/D``...; ``X`` for private tags).
        series_uid: SeriesInstanceUID of the file.
    """

    path: Path
    keyword: str
    value: str
    tag: str = ""
    action: str = ""
    series_uid: str = ""

    def __str__(self) -> str:
        return f"{self.path.name}: {self.keyword} = {self.value!r}"


def _text(value: object) -> str | None:
    """The value as text, or None when it is empty."""
    if value is None:
        return None
    if isinstance(value, pydicom.Sequence):
        return f"sequence of {len(value)} item(s)" if len(value) else None
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes" if value.strip(b"\x00 ") else None
    text = str(value)
    if not text.strip(" ^\\\x00"):
        return None
    return text[:MAX_VALUE_CHARS]


@dataclass
class PHIScan:
    """Accumulates findings over the headers of a site, per study.

    Attributes:
        files: headers scanned.
        failures: ``"file: why"`` for headers the scan could not read through (their findings may be
            incomplete).
    """

    files: int = 0
    failures: list[str] = field(default_factory=list)
    _by_study: dict[str, dict[tuple[str, str], PHIFinding]] = field(default_factory=dict)
    _private: dict[tuple[str, str], tuple[Path, set[int]]] = field(default_factory=dict)
    _seen: dict[str, set[tuple[int, bytes]]] = field(default_factory=dict)  # raw values already decoded

    def add(self, ds: Dataset, path: Path) -> None:
        """Scan one header (pixels not needed); a header it cannot read through is kept in ``failures``."""
        self.files += 1
        try:
            self._add(ds, path)
        except Exception as e:  # noqa: BLE001 - a malformed header must not stop the scan
            self.failures.append(f"{path}: {type(e).__name__}: {e}")

    def _add(self, ds: Dataset, path: Path) -> None:
        profile = basic_profile()
        study, series = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
        found = self._by_study.setdefault(study, {})
        seen = self._seen.setdefault(study, set())
        tags = [int(k) for k in ds.keys()]  # plain ints: BaseTag comparisons are Python-level and slow
        private = [t for t in tags if t & 0x10000]
        watched = [t for t in tags if t == _BURNED_IN_TAG or profile.watched(t)]
        for tag in watched:
            act = profile.action(tag)
            if act is None and tag != _BURNED_IN_TAG:
                continue
            elem = ds.get_item(tag)
            if isinstance(elem, RawDataElement):  # not decoded yet: skip values already seen undecoded
                if not elem.length or not elem.value:
                    continue
                raw = (tag, bytes(elem.value))
                if raw in seen:
                    continue
                seen.add(raw)
            try:
                text = _text(ds[tag].value)
            except Exception:  # noqa: BLE001 - an undecodable value is still present
                text = "(present, value unreadable)"
            if text is None:
                continue
            if tag == _BURNED_IN_TAG:
                if text.strip().upper() != "YES":
                    continue
                kw, act = BURNED_IN_KEYWORD, "X"
            else:
                kw = keyword_for_tag(tag) or _tag_text(tag)
            if (kw, text) not in found:
                found[(kw, text)] = PHIFinding(path, kw, text, _tag_text(tag), act or "", series)
        if private:
            _, seen_private = self._private.setdefault((study, series), (path, set()))
            seen_private.update(private)

    def by_study(self) -> dict[str, list[PHIFinding]]:
        """Findings per StudyInstanceUID ("" for files without one), profile attributes first."""
        out = {study: list(found.values()) for study, found in self._by_study.items()}
        for (study, series), (path, tags) in self._private.items():
            shown = ", ".join(_tag_text(t) for t in sorted(tags)[:PRIVATE_TAGS_SHOWN])
            more = ", ..." if len(tags) > PRIVATE_TAGS_SHOWN else ""
            value = f"{len(tags)} private tag(s) in series {series or '(none)'}: {shown}{more}"
            out.setdefault(study, []).append(PHIFinding(path, PRIVATE_KEYWORD, value, "(odd group)", "X", series))
        return {study: found for study, found in out.items() if found}


def phi_in_dataset(ds: Dataset, path: Path | str = "") -> list[PHIFinding]:
    """Identifying attributes present and non-empty in one header."""
    scan = PHIScan()
    scan.add(ds, Path(path))
    return [f for found in scan.by_study().values() for f in found]


def phi_in_files(paths: Iterable[Path], *, max_files: int | None = None) -> list[PHIFinding]:
    """Identifying attributes in the headers of ``paths``.

    Args:
        paths: DICOM files (typically the slices of one series).
        max_files: read at most this many files; None (the default) reads all of them, since a header
            that differs on one slice is exactly what the check must not miss.

    Returns:
        The findings, unique by (study, keyword, value).
    """
    scan = PHIScan()
    for i, p in enumerate(paths):
        if max_files is not None and i >= max_files:
            break
        scan.add(pydicom.dcmread(p, stop_before_pixels=True), Path(p))
    return [f for found in scan.by_study().values() for f in found]

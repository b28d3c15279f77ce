"""LIDC-IDRI import: LIDC cases -> a lungvl site dataset (DESIGN.md section 2).

A case is an LIDC ``LidcReadMessage`` XML beside its CT series. :func:`import_lidc` parses it
(:mod:`~lungvl_model.data.lidc_xml`), builds the consensus nodules
(:mod:`~lungvl_model.data.lidc_consensus`, whose conventions apply) and writes the site: symlinked
DICOM, ``annotations/<series>.nii.gz`` label maps, ``labels.csv``, ``reports.jsonl`` and ``site.toml``.

``malignant`` stays empty (LIDC has no pathology for these reads); ``malignancy_score`` is the
radiologists' mean rating. The report text is derived from the reader annotations, not a radiologist's
report. The public names of the parsing and consensus modules are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungvl_model.data.dicom_io import SeriesError, read_series, scan_dicom_tree
from lungvl_model.data.lidc_consensus import (
    CLUSTER_MIN_DISTANCE_MM,
    CONSENSUS_FRACTION,
    ClusterRatings,
    ConsensusNodule,
    LidcAnnotation,
    ReaderNodule,
    annotate_series,
    cluster_nodules,
    consensus_mask,
    exam_lung_rads,
    fill_contour,
    nodule_lung_rads,
    reader_nodules,
    roi_slice,
    slice_sop_uids,
    summarize_ratings,
    texture_to_type,
)
from lungvl_model.data.lidc_xml import (
    LidcNodule,
    LidcNonNodule,
    LidcReadingSession,
    LidcReadMessage,
    LidcRoi,
    is_lidc_xml,
    parse_lidc_xml,
)
from lungvl_model.data.nifti_io import write_label_nifti
from lungvl_model.data.site_layout import (
    ReportRecord,
    mask_path,
    site_paths,
    toml_dumps,
    write_labels,
    write_reports,
)

__all__ = [
    "CLUSTER_MIN_DISTANCE_MM",
    "CONSENSUS_FRACTION",
    "LIDC_REFERENCES",
    "ClusterRatings",
    "ConsensusNodule",
    "LidcAnnotation",
    "LidcCaseResult",
    "LidcImportSummary",
    "LidcNodule",
    "LidcNonNodule",
    "LidcReadMessage",
    "LidcReadingSession",
    "LidcRoi",
    "ReaderNodule",
    "annotate_series",
    "cluster_nodules",
    "consensus_mask",
    "exam_lung_rads",
    "fill_contour",
    "find_lidc_xml",
    "import_lidc",
    "is_lidc_xml",
    "nodule_lung_rads",
    "parse_lidc_xml",
    "reader_nodules",
    "report_text",
    "roi_slice",
    "slice_sop_uids",
    "summarize_ratings",
    "texture_to_type",
]

log = logging.getLogger(__name__)
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)+")

LIDC_REFERENCES: tuple[str, ...] = (
    "Armato III SG, McLennan G, Bidaut L, et al. (2015). Data From LIDC-IDRI. The Cancer Imaging Archive. "
    "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX",
    "Armato SG III, McLennan G, Bidaut L, et al. The Lung Image Database Consortium (LIDC) and Image "
    "Database Resource Initiative (IDRI): a completed reference database of lung nodules on CT scans. "
    "Medical Physics 38:915-931, 2011.",
    "Clark K, Vendt B, Smith K, et al. The Cancer Imaging Archive (TCIA): maintaining and operating a "
    "public information repository. Journal of Digital Imaging 26(6):1045-1057, 2013.",
)


# ----------------------------------------------------------------------------------------------
# Site import
# ----------------------------------------------------------------------------------------------


def report_text(nodules: Sequence[ConsensusNodule], n_readers: int, exam_category: str = "") -> str:
    """Short factual text of the consensus findings (not a radiologist's report).

    Args:
        nodules: consensus nodules, largest first.
        n_readers: reading sessions of the case.
        exam_category: exam Lung-RADS category, mentioned when not empty.
    """
    parts = [
        f"Derived from {n_readers} LIDC reader annotation{'s' if n_readers != 1 else ''}, not a radiologist's report."
    ]
    if not nodules:
        parts.append("No nodule of 3 mm or more was marked.")
    else:
        n = len(nodules)
        parts.append(f"{n} nodule{'s' if n != 1 else ''} of 3 mm or more.")
    for nod in nodules:
        m, r = nod.measurement, nod.ratings
        words = [r.type.replace("_", "-") if r.type else None, r.margin, "nodule"]
        desc = " ".join(w for w in words if w)
        calc = " with calcification" if r.calcification == 1 else ""
        extra = [f"{nod.n_readers} of {n_readers} readers"]
        if r.malignancy_score is not None:
            extra.append(f"mean malignancy rating {r.malignancy_score:.1f} of 5")
        parts.append(
            f"A {m.longest_diameter_mm:.1f} x {m.short_axis_mm:.1f} mm (mean {m.mean_diameter_mm:.1f} mm) "
            f"{desc}{calc} at z = {float(nod.centroid_lps[2]):.1f} mm ({', '.join(extra)})."
        )
    if exam_category:
        parts.append(f"Lung-RADS category derived from these measurements: {exam_category}.")
    return " ".join(parts)


@dataclass
class LidcCaseResult:
    """Outcome of one case of :func:`import_lidc`.

    Attributes:
        case: display name (folder path relative to the import source).
        xml: the annotation file.
        status: ``"ok"`` or ``"failed"``.
        reason: why it failed ("" when ok).
        study_uid: StudyInstanceUID ("" when unknown).
        series_uid: SeriesInstanceUID ("" when unknown).
        nodules: the consensus nodules (masks dropped).
        n_readers: reading sessions.
        n_small: clusters of < 3 mm marks.
        lung_rads: exam category ("" when unknown).
        study_date: StudyDate (YYYYMMDD, shifted by TCIA; "" when absent).
        age: patient age in years, None when absent (LIDC headers usually have none).
        sex: ``F`` / ``M``, "" when absent.
        warnings: tolerated problems.
        seconds: time spent on the case.
    """

    case: str
    xml: Path
    status: str = "ok"
    reason: str = ""
    study_uid: str = ""
    series_uid: str = ""
    nodules: list[ConsensusNodule] = field(default_factory=list)
    n_readers: int = 0
    n_small: int = 0
    lung_rads: str = ""
    study_date: str = ""
    age: int | None = None
    sex: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LidcImportSummary:
    """What :func:`import_lidc` did.

    Attributes:
        out: the site directory written.
        cases: one result per annotation file found.
        dicom_mode: ``"symlink"`` or ``"copy"`` (how DICOM files were placed).
        seconds: total time.
    """

    out: Path
    cases: list[LidcCaseResult] = field(default_factory=list)
    dicom_mode: str = "symlink"
    seconds: float = 0.0

    @property
    def ok(self) -> list[LidcCaseResult]:
        """Imported cases."""
        return [c for c in self.cases if c.status == "ok"]

    @property
    def failed(self) -> list[LidcCaseResult]:
        """Cases that could not be imported."""
        return [c for c in self.cases if c.status != "ok"]


def find_lidc_xml(src: str | Path) -> list[Path]:
    """LIDC annotation files (root ``LidcReadMessage``) at or below ``src``, sorted."""
    p = Path(src)
    if p.is_file():
        return [p] if is_lidc_xml(p) else []
    found = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(".xml") and is_lidc_xml(Path(dirpath) / name):
                found.append(Path(dirpath) / name)
    return found


def _place_files(files: Sequence[Path], dest: Path, mode: str) -> str:
    """Symlink (or copy, when symlinks fail) ``files`` into ``dest``; returns the mode used."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.name
        if target.is_symlink() or target.exists():
            target.unlink()
        if mode == "symlink":
            try:
                target.symlink_to(f.resolve())
                continue
            except (OSError, NotImplementedError):
                mode = "copy"
        shutil.copy2(f, target)
    return mode


def _import_case(xml: Path, out: Path, result: LidcCaseResult, mode: str, seen: dict[str, str]) -> str:
    """Import one case into ``out``; fills ``result`` and returns the DICOM placement mode used."""
    message = parse_lidc_xml(xml)
    scan = scan_dicom_tree(xml.parent)
    infos = list(scan.series.values())
    info = next((i for i in infos if i.series_uid == message.series_uid), None)
    if info is None and len(infos) == 1:
        info = infos[0]
        if message.series_uid:
            result.warnings.append(f"series {info.series_uid} used; the XML names {message.series_uid}")
    if info is None:
        skipped = "; ".join(f"{s.path.name}: {s.reason}" for s in scan.skipped[:3])
        raise SeriesError(
            f"{xml.parent}: no CT series matching the XML's {message.series_uid!r} "
            f"({len(infos)} series found{'; skipped ' + skipped if skipped else ''})"
        )
    if info.series_uid in seen:
        raise ValueError(f"series {info.series_uid} already imported from case {seen[info.series_uid]}")
    volume = read_series(info.files)
    result.study_uid, result.series_uid = volume.study_uid, volume.series_uid
    result.study_date = str(volume.meta.get("StudyDate", "") or "")
    result.age = _parse_age(volume.meta.get("PatientAge"))
    sex = str(volume.meta.get("PatientSex", "") or "").strip().upper()
    result.sex = sex if sex in ("F", "M") else ""
    ann = annotate_series(message, volume, slice_sop_uids(info.files, volume))
    mode = _place_files(info.files, site_paths(out)["dicom"] / volume.study_uid / volume.series_uid, mode)
    write_label_nifti(ann.label_map, volume, mask_path(out, volume.series_uid))
    for nod in ann.nodules:
        nod.mask = None
    result.nodules, result.n_readers, result.n_small = ann.nodules, ann.n_readers, ann.n_small
    result.lung_rads = exam_lung_rads(ann.nodules)
    result.warnings.extend(ann.warnings)
    result.warnings.extend(volume.issues)
    return mode


def _site_toml(out: Path) -> str:
    """``site.toml`` text; other tables of an existing file are kept."""
    data: dict[str, Any] = {}
    path = site_paths(out)["toml"]
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
    site = dict(data.get("site") or {})
    site.update(
        name="lidc",
        cohort="lidc",
        description=(
            "LIDC-IDRI chest CT (The Cancer Imaging Archive, Creative Commons Attribution 3.0) with nodule "
            "labels derived from the radiologists' annotations (consensus of >= 50 % of the readers of each "
            "nodule). Do not attempt re-identification (TCIA data usage policy). Cite the references."
        ),
        license="CC BY 3.0",
        references=list(LIDC_REFERENCES),
    )
    data["site"] = site
    try:
        return toml_dumps(data)
    except TypeError:
        return toml_dumps({"site": site})


def _case_name(xml: Path, base: Path, used: set[str]) -> str:
    """Display name of a case.

    Its nearest folder not named like a UID (``LIDC-IDRI-0001`` in TCIA's
    ``<patient>/<study UID>/<series UID>/`` layout), looking no higher than ``base``; the XML path
    relative to ``base`` when that name is already taken.
    """
    folder = xml.parent
    name = folder.name
    while _UID_RE.fullmatch(folder.name) and folder != base and base in folder.parents:
        folder = folder.parent
        name = folder.name
    if name in used or not name:
        name = xml.relative_to(base).as_posix() if base in xml.parents else xml.as_posix()
    return name


def _parse_age(text: Any) -> int | None:
    s = str(text or "").strip().upper()
    return int(s[:-1]) if len(s) > 1 and s[-1] == "Y" and s[:-1].isdigit() else None


#: Written into a site directory made by :func:`import_lidc`; only such a folder (or an empty one) is written to.
IMPORT_MARKER = ".lungvl_lidc.json"
_IMPORT_ENTRIES = frozenset(
    {IMPORT_MARKER, "dicom", "annotations", "labels.csv", "reports.jsonl", "site.toml", ".cache"}
)


def check_import_out_dir(out: Path) -> None:
    """Refuse an ``out`` the importer must not write into; changes nothing.

    Its labels.csv, reports.jsonl and site.toml would replace a user's files.

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder that is not an earlier import, or an
            earlier import holding other entries (named).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; choose a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    names = sorted(c.name for c in out.iterdir())
    if IMPORT_MARKER not in names:
        raise FileExistsError(
            f"--out {out} is not empty and not an earlier LIDC import ({len(names)} entries: {', '.join(names[:5])}); "
            "choose a new or empty folder"
        )
    other = [n for n in names if n not in _IMPORT_ENTRIES]
    if other:
        raise FileExistsError(f"--out {out} is an earlier LIDC import but also holds {other[:5]}; move them away")


def import_lidc(
    src: str | Path, out: str | Path, *, progress: Callable[[int, int, str], None] | None = None
) -> LidcImportSummary:
    """Import LIDC-IDRI cases as a lungvl site directory (DESIGN.md section 2).

    A case is an XML file with a ``LidcReadMessage`` root beside its CT series (any nesting below
    ``src``; ``src`` may also be a single case folder or the XML itself). For each case the series'
    files are symlinked (copied when symlinks are impossible) into ``out/dicom/<study>/<series>/`` and
    the consensus label map is written to ``annotations/<series>.nii.gz``; ``labels.csv`` (nodule rows
    and one study row per study), ``reports.jsonl`` and ``site.toml`` are written for all cases.
    A case that fails is recorded with its reason; the others go on.

    Args:
        src: folder with LIDC cases, or one case.
        out: site directory to write (created).
        progress: called as ``progress(done, total, case)`` after each case.

    Returns:
        The summary.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        FileExistsError: ``out`` holds something an earlier import did not write (nothing is changed).
        ValueError: no LIDC XML under ``src``.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"LIDC source {src} does not exist")
    check_import_out_dir(out)
    xmls = find_lidc_xml(src)
    if not xmls:
        raise ValueError(f"{src}: no LIDC-IDRI XML annotation file found (give a case folder with its XML and DICOM)")
    out.mkdir(parents=True, exist_ok=True)
    (out / IMPORT_MARKER).write_text(json.dumps({"importer": "lungvl import-lidc", "source": str(src)}) + "\n")
    summary = LidcImportSummary(out=out)
    base = src if src.is_dir() else src.parent
    mode = "symlink"
    seen: dict[str, str] = {}
    for i, xml in enumerate(xmls):
        result = LidcCaseResult(case=_case_name(xml, base, {c.case for c in summary.cases}), xml=xml)
        t1 = time.perf_counter()
        try:
            mode = _import_case(xml, out, result, mode, seen)
            seen[result.series_uid] = result.case
        except Exception as e:  # noqa: BLE001 - one bad case never stops the import
            result.status, result.reason = "failed", f"{type(e).__name__}: {e}"
            result.nodules = []
            log.warning("LIDC case %s failed: %s", result.case, result.reason)
        result.seconds = round(time.perf_counter() - t1, 2)
        summary.cases.append(result)
        if progress:
            progress(i + 1, len(xmls), result.case)
    summary.dicom_mode = mode
    rows: list[dict[str, Any]] = []
    reports: list[ReportRecord] = []
    by_study: dict[str, list[LidcCaseResult]] = {}
    for c in summary.ok:
        by_study.setdefault(c.study_uid, []).append(c)
    for study_uid, cases in by_study.items():
        nodules = [n for c in cases for n in c.nodules]
        for c in cases:
            rows.extend(n.label_row(study_uid, c.series_uid) for n in c.nodules)
        exam = "" if any(not c.lung_rads for c in cases) else exam_lung_rads(nodules)
        rows.append(
            {
                "study_uid": study_uid,
                "level": "study",
                "series_uid": cases[0].series_uid if len(cases) == 1 else None,
                "nodule_count": len(nodules),
                "age": cases[0].age,
                "sex": cases[0].sex or None,
                "lung_rads": exam or None,
            }
        )
        text = " ".join(report_text(c.nodules, c.n_readers, exam if len(cases) == 1 else c.lung_rads) for c in cases)
        reports.append(ReportRecord(study_uid, text, cases[0].study_date))
    paths = site_paths(out)
    write_labels(paths["labels"], rows)
    write_reports(paths["reports"], reports)
    paths["toml"].write_text(_site_toml(out), encoding="utf-8")
    summary.seconds = round(time.perf_counter() - t0, 2)
    return summary

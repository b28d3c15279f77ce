"""What a site directory holds: usable studies, what was skipped and why, labels, PHI.

The catalogue is what training reads and what ``lungvl site check`` prints. One bad study (or file,
or report line, or labels.csv row) never stops the rest: it is recorded with its reason. labels.csv is
validated against :mod:`lungvl_model.data.labels_schema` here, so training and the site check use the
same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lungvl_model.data.dicom_io import (
    ScanResult,
    SeriesError,
    SeriesInfo,
    SkippedFile,
    read_series,
    scan_dicom_tree,
)
from lungvl_model.data.labels_schema import ProblemLog
from lungvl_model.data.phi import PHIFinding
from lungvl_model.data.site_layout import (
    ReportRecord,
    SiteDataError,
    SiteManifest,
    lobe_map_path,
    mask_path,
    read_labels,
    read_reports,
    site_paths,
)


@dataclass
class StudyEntry:
    """One study of a site.

    Attributes:
        study_uid: StudyInstanceUID.
        series: the CT series used for it (the one with most slices), None when it has none.
        status: ``"usable"`` or ``"skipped"``.
        reason: why it was skipped (empty when usable).
        report: its line of ``reports.jsonl``, if any.
        study_labels: its ``level="study"`` row of ``labels.csv``, if any.
        nodule_labels: its ``level="nodule"`` rows.
        mask: nodule label map path when it exists.
        lobes: lobe map path when it exists.
        notes: non-fatal remarks (extra series ignored, no report...).
        phi: identifying attributes found in the headers of all its DICOM files.
    """

    study_uid: str
    series: SeriesInfo | None = None
    status: str = "usable"
    reason: str = ""
    report: ReportRecord | None = None
    study_labels: dict[str, str] | None = None
    nodule_labels: list[dict[str, str]] = field(default_factory=list)
    mask: Path | None = None
    lobes: Path | None = None
    notes: list[str] = field(default_factory=list)
    phi: list[PHIFinding] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """True when the study can be used for training."""
        return self.status == "usable"

    @property
    def prior_study_uid(self) -> str | None:
        """The prior study named by its report, if any."""
        return self.report.prior_study_uid if self.report else None

    @property
    def has_labels(self) -> bool:
        """True when labels.csv or a mask describes the study."""
        return self.study_labels is not None or bool(self.nodule_labels) or self.mask is not None


@dataclass
class SiteCatalogue:
    """Everything found in a site directory.

    Attributes:
        site_dir: the site directory.
        manifest: its ``[site]`` table, None when site.toml is missing or unreadable (see ``problems``).
        studies: every study found, usable or not, by StudyInstanceUID.
        skipped_files: files that are not part of a usable series, with their reasons.
        problems: site.toml, reports.jsonl and labels.csv problems (a training run skips those lines).
        phi_unassigned: identifying attributes in DICOM files without a StudyInstanceUID.
        phi_files: DICOM headers scanned for identifying attributes (0 when not asked).
        phi_failures: ``"file: why"`` for headers the PHI scan could not read through.
    """

    site_dir: Path
    manifest: SiteManifest | None
    studies: dict[str, StudyEntry]
    skipped_files: list[SkippedFile]
    problems: list[str]
    phi_unassigned: list[PHIFinding] = field(default_factory=list)
    phi_files: int = 0
    phi_failures: list[str] = field(default_factory=list)

    @property
    def usable(self) -> list[StudyEntry]:
        """Usable studies, sorted by study UID."""
        return [s for k, s in sorted(self.studies.items()) if s.usable]

    @property
    def skipped(self) -> list[StudyEntry]:
        """Skipped studies, sorted by study UID."""
        return [s for k, s in sorted(self.studies.items()) if not s.usable]


def _pick_series(candidates: list[SeriesInfo]) -> tuple[SeriesInfo, list[str]]:
    ordered = sorted(candidates, key=lambda s: (-len(s.files), s.series_uid))
    notes = [f"additional series {s.series_uid} ({len(s.files)} slices) ignored" for s in ordered[1:]]
    return ordered[0], notes


def build_catalogue(
    site_dir: str | Path,
    *,
    verify: bool = False,
    phi: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    scan: ScanResult | None = None,
) -> SiteCatalogue:
    """Catalogue a site directory (DESIGN.md section 2).

    Args:
        site_dir: the site directory.
        verify: read every chosen series' pixels and geometry; a study whose series fails
            (missing slices, uneven spacing, tilt, unreadable pixels) is marked skipped with the reason.
        phi: look for identifying attributes (:mod:`lungvl_model.data.phi`) in every DICOM header of the
            site, while the headers are scanned.
        progress: called as ``progress(done, total, study_uid)`` while verifying.
        scan: a scan of ``site_dir/dicom`` already made (skips re-reading headers, unless ``phi`` is
            asked and the scan has no PHI results).

    Returns:
        The catalogue.

    Raises:
        SiteDataError: when ``site_dir`` does not exist or has no ``dicom/`` folder.
    """
    paths = site_paths(site_dir)
    root = paths["root"]
    if not root.is_dir():
        raise SiteDataError(f"site directory {root} does not exist")
    if not paths["dicom"].is_dir():
        raise SiteDataError(f"{root}: no dicom/ folder (see the site layout in README.md)")
    problems: list[str] = []
    manifest: SiteManifest | None = None
    if paths["toml"].exists():
        try:
            manifest = SiteManifest.from_toml(paths["toml"])
        except SiteDataError as e:
            problems.append(str(e))
    else:
        problems.append(f"{paths['toml'].name}: missing")
    if scan is None or (phi and scan.phi is None):
        scan = scan_dicom_tree(paths["dicom"], phi=phi)
    reports, report_problems = read_reports(paths["reports"])
    problems += report_problems
    label_rows, label_problems = read_labels(paths["labels"])
    problems += label_problems

    studies: dict[str, StudyEntry] = {}
    for study_uid, candidates in scan.by_study().items():
        series, notes = _pick_series(candidates)
        entry = StudyEntry(study_uid, series=series, notes=notes)
        m, lobes = mask_path(root, series.series_uid), lobe_map_path(root, series.series_uid)
        entry.mask = m if m.exists() else None
        entry.lobes = lobes if lobes.exists() else None
        studies[study_uid] = entry
    # studies whose every file was skipped still get a row, with the reasons
    skipped_by_study: dict[str, list[SkippedFile]] = {}
    for sk in scan.skipped:
        if sk.study_uid and sk.study_uid not in studies:
            skipped_by_study.setdefault(sk.study_uid, []).append(sk)
    for study_uid, files in skipped_by_study.items():
        reasons = "; ".join(sorted({f.reason for f in files}))
        studies[study_uid] = StudyEntry(
            study_uid, status="skipped", reason=f"no axial CT image series ({len(files)} file(s): {reasons[:200]})"
        )
    unmatched = ProblemLog()  # one line per study, the repeats summarised
    for uid, rec in reports.items():
        if uid in studies:
            studies[uid].report = rec
        else:
            unmatched.add(
                ("", "reports.jsonl: study without CT"), f"reports.jsonl: study {uid} has no CT series in dicom/"
            )
    orphans: dict[str, int] = {}
    for row in label_rows:
        labelled = studies.get(row["study_uid"])
        if labelled is None:
            orphans[row["study_uid"]] = orphans.get(row["study_uid"], 0) + 1
            continue
        if row["level"] == "study":  # the schema requires level: "study" or "nodule"
            labelled.study_labels = row
        else:
            labelled.nodule_labels.append(row)
    for uid, n in orphans.items():
        unmatched.add(
            ("", "labels.csv: study without CT"),
            f"labels.csv: study {uid} has no CT series in dicom/ ({n} row(s) unused)",
        )
    problems += unmatched.lines()
    for entry in studies.values():
        if entry.usable and entry.report is None:
            entry.notes.append("no report in reports.jsonl (image-only stages only)")
        if entry.prior_study_uid and entry.prior_study_uid not in studies:
            entry.notes.append(f"prior study {entry.prior_study_uid} not found")

    cat = SiteCatalogue(root, manifest, studies, scan.skipped, problems)
    if phi and scan.phi is not None:
        for study_uid, found in scan.phi.by_study().items():
            if study_uid in studies:
                studies[study_uid].phi = found
            else:
                cat.phi_unassigned += found
        cat.phi_files, cat.phi_failures = scan.phi.files, list(scan.phi.failures)
    todo = [e for e in studies.values() if e.series is not None]
    for i, entry in enumerate(sorted(todo, key=lambda e: e.study_uid)):
        assert entry.series is not None
        if verify:
            try:
                vol = read_series(entry.series.files)
                entry.notes += vol.issues
            except SeriesError as e:
                entry.status, entry.reason = "skipped", str(e)
        if progress:
            progress(i + 1, len(todo), entry.study_uid)
    return cat

"""``lungvl site check``: a per-study verdict, PHI findings and label completeness for a site.

The verdict is the one training reaches: the same catalogue (:func:`build_catalogue`), the same
labels.csv schema (:mod:`lungvl_model.data.labels_schema`), the same reports.jsonl reader. PHI is looked
for in every DICOM header (:mod:`lungvl_model.data.phi`: the PS3.15 basic profile, UIDs excepted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.labels_schema import count_problems
from lungvl_model.data.phi import PHIFinding


@dataclass
class SiteCheckReport:
    """Result of checking a site (JSON-ready fields).

    Attributes:
        site_dir: the directory checked.
        site_name: from site.toml (else the folder name).
        studies: one dict per study: study_uid, status, reason, notes, slices, report, labels, mask.
        phi: one dict per finding, unique per study by (keyword, value): study_uid ("" for files without
            one), series_uid, keyword, tag, action (PS3.15 profile action), value, file (where first seen).
        phi_failures: headers the PHI scan could not read through (``"file: why"``).
        problems: site.toml, reports.jsonl and labels.csv problems (bad lines and rows, labels for
            unknown studies...): a training run would skip those lines.
        skipped_files: files that are not part of a usable series, with their reasons.
        summary: counts.
    """

    site_dir: str
    site_name: str
    studies: list[dict[str, Any]] = field(default_factory=list)
    phi: list[dict[str, str]] = field(default_factory=list)
    phi_failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def _phi_dict(study_uid: str, f: PHIFinding) -> dict[str, str]:
    return {
        "study_uid": study_uid,
        "series_uid": f.series_uid,
        "keyword": f.keyword,
        "tag": f.tag,
        "action": f.action,
        "value": f.value,
        "file": str(f.path),
    }


def check_site(site_dir: str | Path, progress: Callable[[int, int, str], None] | None = None) -> SiteCheckReport:
    """Check every study of a site: readable series, geometry, report, labels, PHI in every header.

    Args:
        site_dir: the site directory.
        progress: ``progress(done, total, study_uid)``.

    Returns:
        The report; ``summary["usable"] > 0`` means the site can train, ``summary["problems"] > 0`` that
        a training run would skip some reports.jsonl or labels.csv lines.

    Raises:
        SiteDataError: when ``site_dir`` does not exist or has no ``dicom/`` folder.
    """
    cat = build_catalogue(site_dir, verify=True, phi=True, progress=progress)
    name = cat.manifest.name if cat.manifest else Path(site_dir).name
    rep = SiteCheckReport(str(cat.site_dir), name, problems=list(cat.problems))
    for uid, e in sorted(cat.studies.items()):
        if e.study_labels is not None and e.nodule_labels:
            labels = f"study+{len(e.nodule_labels)} nodule(s)"
        elif e.nodule_labels:
            labels = f"{len(e.nodule_labels)} nodule(s)"
        elif e.study_labels is not None:
            labels = "study"
        else:
            labels = "from report" if e.report else "-"
        rep.studies.append(
            {
                "study_uid": uid,
                "series_uid": e.series.series_uid if e.series else "",
                "status": e.status,
                "reason": e.reason,
                "notes": list(e.notes),
                "slices": len(e.series.files) if e.series else 0,
                "report": e.report is not None,
                "labels": labels,
                "mask": e.mask is not None,
            }
        )
        rep.phi += [_phi_dict(uid, f) for f in e.phi]
    rep.phi += [_phi_dict("", f) for f in cat.phi_unassigned]
    rep.phi_failures = list(cat.phi_failures)
    rep.skipped_files = [{"path": str(s.path), "reason": s.reason} for s in cat.skipped_files]
    usable = cat.usable
    rep.summary = {
        "studies": len(cat.studies),
        "usable": len(usable),
        "skipped": len(cat.studies) - len(usable),
        "with_report": sum(e.report is not None for e in usable),
        "with_labels": sum(e.has_labels for e in usable),
        "with_mask": sum(e.mask is not None for e in usable),
        "phi_findings": len(rep.phi),
        "phi_attributes": len({f["keyword"] for f in rep.phi}),
        "phi_studies": len({f["study_uid"] for f in rep.phi}),
        "phi_files_scanned": cat.phi_files,
        "skipped_files": len(cat.skipped_files),
        "problems": count_problems(cat.problems),  # the rows a summary line stands for included
    }
    return rep

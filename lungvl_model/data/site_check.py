"""``lungvl site check``: a per-study verdict, PHI findings and label completeness for a site."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lungvl_model.data.catalogue import build_catalogue


@dataclass
class SiteCheckReport:
    """Result of checking a site (JSON-ready fields).

    Attributes:
        site_dir: the directory checked.
        site_name: from site.toml (else the folder name).
        studies: one dict per study: study_uid, status, reason, notes, slices, report, labels, mask.
        phi: one dict per finding: study_uid, keyword, value.
        problems: file-level problems (bad report lines, labels for unknown studies...).
        skipped_files: files that are not part of a usable series, with their reasons.
        summary: counts.
    """

    site_dir: str
    site_name: str
    studies: list[dict[str, Any]] = field(default_factory=list)
    phi: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def check_site(site_dir: str | Path, progress: Callable[[int, int, str], None] | None = None) -> SiteCheckReport:
    """Check every study of a site: readable series, geometry, report, labels, PHI.

    Args:
        site_dir: the site directory.
        progress: ``progress(done, total, study_uid)``.

    Returns:
        The report; ``summary["usable"] > 0`` means the site can train.
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
        rep.phi += [{"study_uid": uid, "keyword": f.keyword, "value": f.value} for f in e.phi]
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
        "skipped_files": len(cat.skipped_files),
        "problems": len(cat.problems),
    }
    return rep

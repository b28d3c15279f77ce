"""DICOM SEG + SR for every usable study of some site directories (``lungvl evaluate --export-dicom``).

:func:`lungvl_model.evaluation.evaluate.evaluate` keeps metrics, not the per-study explanations (their
masks would hold a whole test set in memory), so the export explains each study again with the same
settings and writes ``<out>/<site>/<study_uid>/{seg.dcm, sr.dcm, report.json}`` one study at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungvl_model.atomic_file import write_text_atomic
from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.dicom_io import SeriesError, read_series
from lungvl_model.export.write import DicomExport, write_dicom
from lungvl_model.inference.explain import explain_study


@dataclass(frozen=True)
class StudyExport:
    """One study's export: its files, or why it has none."""

    site: str
    study_uid: str
    export: DicomExport | None
    error: str = ""

    def to_dict(self, root: Path) -> dict[str, Any]:
        """JSON-ready row of the export index (paths relative to ``root``)."""
        row: dict[str, Any] = {"site": self.site, "study_uid": self.study_uid}
        if self.export is not None:
            row.update(self.export.to_dict(relative_to=root))
        else:
            row["error"] = self.error
        return row


def export_sites(
    model: Any,
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **explain_kwargs: Any,
) -> list[StudyExport]:
    """Explain every usable study of ``site_dirs`` and write its SEG, SR and report.json.

    Args:
        model: the LungVL model.
        site_dirs: site directories.
        out_dir: root folder; ``index.json`` there lists every study's files (or its error).
        provenance: report.json ``provenance`` (the model's identity).
        progress: ``progress(done, total, study_uid)``.
        **explain_kwargs: passed to :func:`~lungvl_model.inference.explain.explain_study` (calibration,
            candidate filter, nodule-risk head...).

    Returns:
        One row per usable study; a study whose series cannot be read has ``error`` set.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    todo = []
    for d in site_dirs:
        cat = build_catalogue(d)
        name = cat.manifest.name if cat.manifest else Path(d).name
        todo += [(name, e, cat) for e in cat.usable]
    rows: list[StudyExport] = []
    for i, (name, e, cat) in enumerate(todo):
        assert e.series is not None
        try:
            vol = read_series(e.series.files)
            prior = None
            prior_entry = cat.studies.get(e.prior_study_uid or "")
            if prior_entry is not None and prior_entry.series is not None:
                prior = read_series(prior_entry.series.files)
        except SeriesError as err:
            rows.append(StudyExport(name, e.study_uid, None, str(err)))
            continue
        exp = explain_study(model, vol, prior=prior, **explain_kwargs)
        exp.provenance = dict(provenance or {})
        folder = root / name / e.study_uid
        report = exp.to_dict()
        export = write_dicom(exp, vol, e.series.files, folder, report)
        report["dicom"] = export.to_dict(relative_to=folder)
        write_text_atomic(folder / "report.json", json.dumps(report, indent=2, default=float))
        rows.append(StudyExport(name, e.study_uid, export))
        if progress:
            progress(i + 1, len(todo), e.study_uid)
    index = [r.to_dict(root) for r in rows]
    write_text_atomic(root / "index.json", json.dumps(index, indent=2))
    return rows

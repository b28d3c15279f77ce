"""``lungvl explain``: findings, risk and a grounded explanation for one study."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lungvl.console import err, out
from lungvl.params import CHECKED_HELP


def _load_study(site: Path | None, study: str | None, dicom: Path | None):  # noqa: ANN202
    """The study's CT volume and the DICOM files it was read from: ``(CTVolume, list[Path])``."""
    from lungvl_model.data.catalogue import build_catalogue
    from lungvl_model.data.dicom_io import read_series, read_series_dir, scan_dicom_tree

    if dicom is not None:
        scan = scan_dicom_tree(dicom)
        if len(scan.series) != 1:
            return read_series_dir(dicom), []  # raises SeriesError naming the folder and what it found
        files = list(next(iter(scan.series.values())).files)
        return read_series(files), files
    if site is None or study is None:
        raise ValueError("give --dicom SERIES_DIR, or --site SITE_DIR with --study STUDY_UID")
    cat = build_catalogue(site)
    entry = cat.studies.get(study)
    if entry is None or entry.series is None:
        raise ValueError(f"study {study} not found in {site} ({len(cat.studies)} studies there)")
    return read_series(entry.series.files), list(entry.series.files)


def explain(
    model_dir: Path | None = typer.Option(
        None, "--model", help="checkpoint directory (default: $LUNGVL_MODEL, else the shipped models/lungvl-tiny-v1)"
    ),
    out_dir: Path = typer.Option(..., "--out", help="output directory"),
    site: Path | None = typer.Option(None, "--site", help="site directory"),
    study: str | None = typer.Option(None, "--study", help="StudyInstanceUID in --site"),
    dicom: Path | None = typer.Option(None, "--dicom", help="a folder with one CT series"),
    prior: str | None = typer.Option(None, "--prior", help="prior StudyInstanceUID (in --site) or a series folder"),
    ask: str | None = typer.Option(None, "--ask", help='e.g. "what about nodule 2?"'),
    threshold: float | None = typer.Option(None, "--threshold", help="override the deferral entropy threshold"),
    checked_candidates: int = typer.Option(24, "--checked-candidates", min=0, help=CHECKED_HELP),
) -> None:
    """Write report.json, report.md, nodule_<k>.png overlays, seg.dcm (DICOM SEG) and sr.dcm (TID 1500 SR)."""
    from lungvl_model.export.provenance import model_identity
    from lungvl_model.inference.calibration import load_state
    from lungvl_model.inference.checkpoint_parts import explain_parts
    from lungvl_model.inference.explain import explain_study
    from lungvl_model.inference.narrative import CheckedDecoding
    from lungvl_model.inference.render import write_explanation
    from lungvl_model.shipped import shipped_model_dir
    from lungvl_model.training.checkpoint import load_checkpoint

    model_dir = model_dir if model_dir is not None else shipped_model_dir()  # none there: exit 2, one line
    model, meta = load_checkpoint(model_dir)  # a damaged checkpoint: exit 6; a bad study: exit 2 (lungvl.errors)
    volume, files = _load_study(site, study, dicom)
    prior_vol = None
    if prior is not None:
        p = Path(prior)
        prior_vol = (_load_study(None, None, p) if p.is_dir() else _load_study(site, prior, None))[0]
    parts = explain_parts(model_dir)
    calibration = load_state(model_dir)
    exp = explain_study(
        model,
        volume,
        prior=prior_vol,
        ask=ask,
        threshold=threshold,
        calibration=calibration,
        checked=CheckedDecoding(candidates=checked_candidates),
        **parts,
    )
    exp.provenance = {
        **model_identity(model_dir, meta, model.config),
        "calibration": calibration is not None,
        **{name: part is not None for name, part in parts.items()},
    }
    # seg.dcm (kept findings) and sr.dcm (TID 1500 measurement report) beside report.json
    paths = write_explanation(exp, volume, out_dir, source_files=files)
    out.print(
        json.dumps({k: exp.to_dict()[k] for k in ("model", "lung_rads_rule_engine", "defer_to_radiologist")}, indent=1)
    )
    err.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)

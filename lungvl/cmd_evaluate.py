"""``lungvl evaluate``: the metric table of a checkpoint on held-out site directories."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import typer

from lungvl.console import err, out, print_error, progress_callback
from lungvl.params import CHECKED_HELP


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "value" in v:
        if v["value"] is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
            return "n/a"
        return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


ROWS = (
    ("Dice (native resolution, per study)", "dice"),
    ("Dice per found nodule (native resolution)", "dice_found_nodules"),
    ("HD95 mm", "hd95_mm"),
    ("malignancy AUC: lungvl study head", "auc_model_malignancy"),
    ("malignancy AUC: nodule-level head, noisy-OR per study", "auc_nodule_malignancy"),
    ("malignancy AUC per nodule: nodule-level head (found nodules)", "auc_nodule_level_head"),
    ("malignancy AUC per nodule: Brock, measured features (found nodules)", "auc_nodule_level_brock_measured"),
    ("malignancy AUC: Brock, true features", "auc_brock_true"),
    ("malignancy AUC: Brock, measured features", "auc_brock_measured"),
    ("malignancy ECE", "ece_model_malignancy"),
    ("Lung-RADS accuracy: model head", "accuracy_lung_rads_model"),
    ("Lung-RADS accuracy: rule engine on measured findings", "accuracy_lung_rads_rule"),
    ("Lung-RADS accuracy: stated in generated report", "accuracy_report_lung_rads"),
    ("growth AUC (>1.5 mm / 12 mo)", "auc_growth"),
    ("BLEU-4", "bleu4"),
    ("ROUGE-L", "rouge_l"),
    ("clinical-concept F1", "concept_f1"),
)


#: Rows that measure the segmenter's findings: the only ones the DynUNet anchor column reports (the
#: anchor replaces segmentation only; the risk heads and report text stay lungvl's).
SEGMENTER_ROWS = frozenset(
    {"dice", "dice_found_nodules", "hd95_mm", "auc_brock_true", "auc_brock_measured", "accuracy_lung_rads_rule"}
)


def results_markdown(res: dict[str, Any], peer: dict[str, Any] | None) -> str:
    """results.md: overall table (+ the DynUNet anchor's segmentation-dependent rows) and per-cohort rows."""
    o = res["overall"]
    head = "| metric | lungvl |" + (" DynUNet segmentation anchor |" if peer else "")
    lines = [f"# lungvl evaluation ({o['n_studies']} studies)", "", head, "|---|---|" + ("---|" if peer else "")]
    for name, key in ROWS:
        other = ""
        if peer:
            other = f" {_fmt(peer['overall'].get(key)) if key in SEGMENTER_ROWS else '—'} |"
        lines.append(f"| {name} | {_fmt(o.get(key))} |" + other)
    for name, src in (("lungvl", o), ("DynUNet", peer["overall"] if peer else None)):
        if src is None:
            continue
        d = src["detection"]
        lines.append(
            f"| detection sensitivity / FP per scan ({name}) | {d.get('sensitivity', math.nan):.3f} / "
            f"{d.get('fp_per_scan', math.nan):.2f} |" + (" |" if peer else "")
        )
    fr = o.get("froc")
    if fr:
        sens = " / ".join(f"{v:.3f}" for v in fr["sensitivity"])
        lines.append(
            f"| FROC sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per scan (LUNA16) | {sens} (CPM {fr['cpm']:.3f}; "
            f"{fr['n_nodules']} nodules, {fr['n_scans']} scans) |" + (" |" if peer else "")
        )
    facts = o.get("facts")
    if facts and facts.get("n_reports"):
        lines.append(
            f"| unsupported facts / contradictions per report | {facts['unsupported_per_report']:.3f} / "
            f"{facts['contradictions_per_report']:.3f} ({int(facts['n_reports'])} reports) |" + (" |" if peer else "")
        )
    resampled = o.get("finding_sentences_resampled")
    if resampled is not None and resampled == resampled:  # NaN: no finding sentence written
        lines.append(
            f"| finding sentences chosen among sampled ones (the greedy one faulted by the fact check) | "
            f"{resampled:.3f} |" + (" |" if peer else "")
        )
    rc = o.get("risk_coverage")
    if rc:
        lines.append(
            f"| risk-coverage: AURC; error kept / all at {rc['deferral_rate']:.2f} deferral | {rc['aurc']:.3f}; "
            f"{rc['error_kept']:.3f} / {rc['error_all']:.3f} (ratio {_fmt(rc['ratio'])}) |" + (" |" if peer else "")
        )
    dfr = o.get("deferral", {})
    if dfr:
        lines.append(
            f"| deferral rate / error all / error non-deferred | {dfr['deferral_rate']:.3f} / "
            f"{dfr['error_rate_all']:.3f} / {dfr['error_rate_kept']:.3f} |" + (" |" if peer else "")
        )
    concepts = o.get("concepts")
    if concepts and any(c["gold"] for c in concepts.values()):
        lines += [
            "",
            "## Clinical concepts of the generated text (the dominant nodule's and the report's)",
            "",
            "| concept | in reference | stated in both | agree | precision | recall |",
            "|---|---|---|---|---|---|",
        ]
        for k, c in concepts.items():
            lines.append(
                f"| {k} | {int(c['gold'])} | {int(c['predicted'])} | {int(c['hits'])} | {_fmt(c['precision'])} | "
                f"{_fmt(c['recall'])} |"
            )
    lines += [
        "",
        "## By cohort and slice thickness",
        "",
        "| group | n | malignancy AUC | Lung-RADS acc | Dice |",
        "|---|---|---|---|---|",
    ]
    for group in ("by_cohort", "by_slice"):
        for k, m in res[group].items():
            if not m.get("n_studies"):
                continue
            lines.append(
                f"| {k} | {m['n_studies']} | {_fmt(m['auc_model_malignancy'])} | "
                f"{_fmt(m['accuracy_lung_rads_model'])} | {_fmt(m['dice'])} |"
            )
    return "\n".join(lines) + "\n"


def evaluate(
    site_dirs: list[Path] = typer.Argument(..., help="held-out (test) site directories"),
    model_dir: Path | None = typer.Option(
        None, "--model", help="checkpoint directory (default: $LUNGVL_MODEL, else the shipped models/lungvl-tiny-v1)"
    ),
    out_dir: Path = typer.Option(..., "--out", help="output directory"),
    validation: list[Path] = typer.Option(
        [],
        "--validation",
        help="validation site (repeatable; neither training nor test): fit the heads' temperatures and the "
        "deferral policy on it first, then evaluate with them",
    ),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="store the calibration fitted on --validation in the checkpoint (calibration.json)"
    ),
    seg_peer: Path | None = typer.Option(None, "--seg-peer", help="DynUNet anchor directory (lungvl train --peer)"),
    export_dicom: Path | None = typer.Option(
        None,
        "--export-dicom",
        help="also write each test study's DICOM SEG + Comprehensive 3D SR (and report.json) under "
        "DIR/<site>/<study_uid>/, with DIR/index.json; the studies are explained again for it",
    ),
    checked_candidates: int = typer.Option(
        24,
        "--checked-candidates",
        min=0,
        help=CHECKED_HELP,
    ),
    finding_fp_per_scan: float = typer.Option(
        1.0,
        "--finding-fp-per-scan",
        help="with --validation and a candidate filter: the finding threshold is the lowest filter score with at "
        "most this many false positives per validation scan (LUNA16's headline point is 1)",
    ),
) -> None:
    """Score a checkpoint; writes metrics.json, results.md, lung_rads_confusion.png and risk_coverage.png."""
    from lungvl_model.evaluation.evaluate import evaluate as run
    from lungvl_model.evaluation.plots import plot_confusion
    from lungvl_model.evaluation.risk_coverage import RiskCoverage, plot_risk_coverage
    from lungvl_model.inference.calibration import load_state, save_state
    from lungvl_model.inference.checkpoint_parts import explain_parts
    from lungvl_model.inference.narrative import CheckedDecoding
    from lungvl_model.training.checkpoint import load_checkpoint
    from lungvl_model.training.peer import dynunet_seg_fn, load_dynunet

    if not (finding_fp_per_scan > 0 and math.isfinite(finding_fp_per_scan)):
        print_error(f"--finding-fp-per-scan must be a number > 0, got {finding_fp_per_scan!r}")
        raise typer.Exit(2)
    if calibrate and not validation:
        print_error(
            "--calibrate needs --validation SITE: a calibration fitted on the test studies would grade the "
            "deferral on the data it was fitted to"
        )
        raise typer.Exit(2)
    if calibrate and model_dir is None:
        print_error(
            "--calibrate writes calibration.json into the checkpoint: give --model (the shipped model is not changed)"
        )
        raise typer.Exit(2)
    from lungvl_model.shipped import shipped_model_dir

    model_dir = model_dir if model_dir is not None else shipped_model_dir()  # none there: exit 2, one line
    overlap = sorted({p.resolve() for p in validation} & {p.resolve() for p in site_dirs})
    if overlap:
        print_error(f"--validation site(s) {', '.join(map(str, overlap))} are also test sites; keep them apart")
        raise typer.Exit(2)
    # said before the run: "--validation A B" makes B a test site (the option takes one value, repeat it)
    err.print(
        f"test site(s): {', '.join(map(str, site_dirs))}; validation site(s): "
        f"{', '.join(map(str, validation)) or 'none'}",
        highlight=False,
        markup=False,
    )
    model, meta = load_checkpoint(model_dir)
    state = load_state(model_dir)
    kwargs = explain_parts(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_callback("evaluate") as cb:
        res = run(
            model, site_dirs, validation_dirs=validation, calibration=state, progress=cb,
            checked=CheckedDecoding(candidates=checked_candidates), finding_fp_per_scan=finding_fp_per_scan,
            **kwargs,
        )  # fmt: skip
    fitted = res.pop("calibration_state", None)
    peer = None
    if seg_peer is not None:
        net, _ = load_dynunet(seg_peer)
        with progress_callback("evaluate DynUNet anchor") as cb:
            peer = run(
                model, site_dirs, calibration=fitted or state, progress=cb, seg_fn=dynunet_seg_fn(net),
                **{**kwargs, "fine_detector": None},  # the anchor's own candidates only
            )  # fmt: skip
    if calibrate and fitted is not None:
        path = save_state(model_dir, fitted)
        err.print(
            f"calibration fitted on {len(validation)} validation site(s) -> {path}", highlight=False, markup=False
        )
    if export_dicom is not None:
        from lungvl_model.export.batch import export_sites
        from lungvl_model.export.provenance import model_identity

        with progress_callback("export DICOM SEG + SR") as cb:
            rows = export_sites(
                model, site_dirs, export_dicom, provenance=model_identity(model_dir, meta, model.config),
                progress=cb, calibration=fitted or state, **kwargs,
            )  # fmt: skip
        n_seg = sum(1 for r in rows if r.export is not None and r.export.seg is not None)
        n_err = sum(1 for r in rows if r.export is None)
        err.print(
            f"DICOM export: {len(rows) - n_err} SR(s), {n_seg} SEG(s), {n_err} unreadable -> {export_dicom}",
            highlight=False,
        )
    (out_dir / "metrics.json").write_text(json.dumps({"lungvl": res, "dynunet_anchor": peer}, indent=2, default=float))
    md = results_markdown(res, peer)
    (out_dir / "results.md").write_text(md)
    plot_confusion(res["overall"]["lung_rads_confusion"], out_dir / "lung_rads_confusion.png")
    rc = res["overall"].get("risk_coverage")
    if rc:
        c = rc["curve"]
        curve = RiskCoverage(
            coverage=np.asarray(c["coverage"], float),
            risk=np.asarray(c["risk"], float),
            threshold=np.asarray([math.inf if t is None else t for t in c["threshold"]], float),
            n=int(c["n"]),
            error_all=float(c["error_all"]),
        )
        plot_risk_coverage(curve, out_dir / "risk_coverage.png")
    out.print(md)

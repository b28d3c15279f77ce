"""``lungvl evaluate``: the metric table of a checkpoint on held-out site directories."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from lungvl.console import err, out, progress_callback


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "value" in v:
        if v["value"] is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
            return "n/a"
        return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


ROWS = (
    ("Dice (native resolution)", "dice"),
    ("HD95 mm", "hd95_mm"),
    ("malignancy AUC: lungvl", "auc_model_malignancy"),
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
SEGMENTER_ROWS = frozenset({"dice", "hd95_mm", "auc_brock_true", "auc_brock_measured", "accuracy_lung_rads_rule"})


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
    dfr = o.get("deferral", {})
    if dfr:
        lines.append(
            f"| deferral rate / error all / error non-deferred | {dfr['deferral_rate']:.3f} / "
            f"{dfr['error_rate_all']:.3f} / {dfr['error_rate_kept']:.3f} |" + (" |" if peer else "")
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
    site_dirs: list[Path] = typer.Argument(..., help="held-out site directories"),
    model_dir: Path = typer.Option(..., "--model", help="checkpoint directory"),
    out_dir: Path = typer.Option(..., "--out", help="output directory"),
    calibrate: bool = typer.Option(False, "--calibrate", help="store the deferral threshold in the checkpoint"),
    seg_peer: Path | None = typer.Option(None, "--seg-peer", help="DynUNet anchor directory (lungvl train --peer)"),
) -> None:
    """Score a checkpoint; writes metrics.json, results.md and lung_rads_confusion.png."""
    from lungvl_model.evaluation.evaluate import evaluate as run
    from lungvl_model.evaluation.plots import plot_confusion
    from lungvl_model.inference.calibration import load_threshold, save_threshold
    from lungvl_model.training.checkpoint import load_checkpoint
    from lungvl_model.training.peer import dynunet_seg_fn, load_dynunet

    model, _ = load_checkpoint(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_callback("evaluate") as cb:
        res = run(model, site_dirs, threshold=load_threshold(model_dir), calibrate=calibrate, progress=cb)
    peer = None
    if seg_peer is not None:
        net, _ = load_dynunet(seg_peer)
        with progress_callback("evaluate DynUNet anchor") as cb:
            peer = run(model, site_dirs, threshold=load_threshold(model_dir), progress=cb, seg_fn=dynunet_seg_fn(net))
    if calibrate and "calibrated_threshold" in res:
        save_threshold(model_dir, res["calibrated_threshold"], res["calibration"])
        err.print(f"calibrated deferral threshold {res['calibrated_threshold']:.3f} nats -> {model_dir}")
    (out_dir / "metrics.json").write_text(json.dumps({"lungvl": res, "dynunet_anchor": peer}, indent=2, default=float))
    md = results_markdown(res, peer)
    (out_dir / "results.md").write_text(md)
    plot_confusion(res["overall"]["lung_rads_confusion"], out_dir / "lung_rads_confusion.png")
    out.print(md)

"""``lungvl evaluate``: run the explanation pipeline on labelled studies and score every output.

Per study: explanation (findings, generated report, heads, deferral) → native-resolution Dice/HD95,
detection, malignancy (model vs Brock on true features vs Brock on measured features), Lung-RADS
(model head, rule engine on measured findings), growth, calibration, BLEU-4/ROUGE-L, clinical-concept
F1 (labeler on generated vs reference report), deferral. Optionally calibrates the per-sentence
entropy threshold (a key sentence is *correct* when the labeler's facts in it agree with the
reference report) and stores it beside the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungvl_model.data.catalogue import StudyEntry, build_catalogue
from lungvl_model.data.dataset import study_targets
from lungvl_model.data.dicom_io import SeriesError, read_series
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.targets import LUNG_RADS_CLASSES, lung_rads_index
from lungvl_model.evaluation.classification_metrics import (
    accuracy,
    bootstrap_ci,
    calibrate_entropy_threshold,
    confusion_matrix,
    deferral_summary,
    expected_calibration_error,
    roc_auc,
)
from lungvl_model.evaluation.segmentation_metrics import detection_summary, dice, hd95, match_detections
from lungvl_model.evaluation.text_metrics import bleu4, rouge_l_corpus
from lungvl_model.inference.explain import Explanation, explain_study
from lungvl_model.text.labeler import label_report
from lungvl_model.text.report_labels import concept_f1

Progress = Callable[[int, int, str], None]


@dataclass
class StudyResult:
    """Scores and raw outputs of one study."""

    study_uid: str
    site: str
    cohort: str
    slice_mm: float
    values: dict[str, Any] = field(default_factory=dict)


def _float(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key, "") or "nan")
    except ValueError:
        return math.nan


def reference_nodules(entry: StudyEntry) -> tuple[np.ndarray, np.ndarray]:
    """Reference centroids (LPS mm, ``(R, 3)``) and mean diameters ``(R,)`` from labels.csv."""
    pts, diam = [], []
    for r in entry.nodule_labels:
        c = [_float(r, k) for k in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")]
        if all(math.isfinite(v) for v in c):
            pts.append(c)
            d = _float(r, "mean_diameter_mm")
            diam.append(d if math.isfinite(d) else 0.0)
    return np.asarray(pts, float).reshape(-1, 3), np.asarray(diam, float)


def score_study(exp: Explanation, entry: StudyEntry, volume: Any) -> dict[str, Any]:
    """All per-study values that the aggregate metrics need."""
    t = study_targets(entry)
    v: dict[str, Any] = {"malignant": t.malignant, "lung_rads_true": t.lung_rads, "growth_true": t.growth_mm}
    pred = np.zeros(volume.shape, bool)
    for f in exp.findings:
        pred |= f.full_mask(volume.shape)
    if entry.mask is not None:
        ref = read_label_nifti(entry.mask, volume) > 0
        v["dice"] = dice(pred, ref)
        v["hd95"] = hd95(pred, ref, volume.spacing) if pred.any() and ref.any() else math.nan
    ref_pts, ref_diam = reference_nodules(entry)
    det = match_detections([f.centroid_lps for f in exp.findings], ref_pts, ref_diam)
    v["detection"] = (det.tp, det.fp, det.fn)
    v["model_malignancy"] = exp.model["malignancy_probability"]
    true_brock = [_float(r, "brock_probability") for r in entry.nodule_labels]
    true_brock = [b for b in true_brock if math.isfinite(b)]
    v["brock_true"] = max(true_brock) if true_brock else (0.0 if t.n_nodules == 0 else math.nan)
    measured = [f.brock_probability for f in exp.findings if f.brock_probability is not None]
    v["brock_measured"] = max(measured) if measured else 0.0
    v["lung_rads_model"] = lung_rads_index(exp.model["lung_rads"])
    v["lung_rads_rule"] = lung_rads_index(exp.rule_lung_rads)
    v["growth_model"] = exp.model["growth_mm_12_months"]
    ref_text = entry.report.text if entry.report else ""
    v["generated"], v["reference"] = exp.text, ref_text
    gen_lab, ref_lab = label_report(exp.text), label_report(ref_text)
    v["concept_f1"] = concept_f1(gen_lab, ref_lab) if ref_text else math.nan
    v["report_lung_rads"] = lung_rads_index(gen_lab.lung_rads)
    v["deferred"] = exp.defer
    v["sentences"] = [
        {"entropy": s.mean_entropy, "correct": concept_f1(label_report(s.text), ref_lab) >= 0.999}
        for s in exp.sentences
        if s.key and ref_text
    ]
    return v


def _auc_ci(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(y) & np.isfinite(s)
    y, s = y[ok], s[ok]
    if len(np.unique(y)) < 2:
        return {"value": math.nan, "low": math.nan, "high": math.nan, "n": int(len(y))}
    p, lo, hi = bootstrap_ci(roc_auc, y, s, n_boot=500, seed=0)
    return {"value": p, "low": lo, "high": hi, "n": int(len(y))}


def aggregate(results: Sequence[StudyResult]) -> dict[str, Any]:
    """The metric table over studies (95 % bootstrap intervals on AUCs)."""
    vals = [r.values for r in results]

    def col(key: str) -> np.ndarray:
        return np.asarray([v.get(key, math.nan) for v in vals], float)

    out: dict[str, Any] = {"n_studies": len(vals)}
    if not vals:
        return out
    out["dice"] = float(np.nanmean(col("dice"))) if np.isfinite(col("dice")).any() else math.nan
    out["hd95_mm"] = float(np.nanmean(col("hd95"))) if np.isfinite(col("hd95")).any() else math.nan
    out["detection"] = detection_summary([v["detection"] for v in vals])
    y = col("malignant")
    for name in ("model_malignancy", "brock_true", "brock_measured"):
        out[f"auc_{name}"] = _auc_ci(y, col(name))
    ok = np.isfinite(y)
    p = np.clip(col("model_malignancy")[ok], 0, 1)
    out["ece_model_malignancy"] = expected_calibration_error(y[ok].astype(int), p) if ok.any() else math.nan
    lr_true = col("lung_rads_true").astype(int)
    for name in ("lung_rads_model", "lung_rads_rule", "report_lung_rads"):
        pred = col(name).astype(int)
        known = lr_true >= 0
        out[f"accuracy_{name}"] = accuracy(lr_true[known], pred[known]) if known.any() else math.nan
    known = lr_true >= 0
    pred = np.clip(col("lung_rads_model").astype(int), 0, len(LUNG_RADS_CLASSES) - 1)
    out["lung_rads_confusion"] = confusion_matrix(lr_true[known], pred[known], len(LUNG_RADS_CLASSES)).tolist()
    g = col("growth_true")
    out["auc_growth"] = _auc_ci((g > 1.5).astype(float) * np.where(np.isfinite(g), 1, np.nan), col("growth_model"))
    with_ref = [v for v in vals if v.get("reference")]
    hyps, refs = [v["generated"] for v in with_ref], [v["reference"] for v in with_ref]
    out["bleu4"] = bleu4(hyps, refs) if refs else math.nan
    out["rouge_l"] = rouge_l_corpus(hyps, refs) if refs else math.nan
    out["concept_f1"] = float(np.nanmean(col("concept_f1"))) if np.isfinite(col("concept_f1")).any() else math.nan
    deferred = np.asarray([bool(v["deferred"]) for v in vals])
    correct = col("report_lung_rads") == col("lung_rads_true")
    out["deferral"] = deferral_summary(deferred[known], correct[known]) if known.any() else {}
    return out


def evaluate(
    model: Any,
    site_dirs: Sequence[str | Path],
    *,
    threshold: float | None = None,
    calibrate: bool = False,
    target_error: float = 0.1,
    progress: Progress | None = None,
    seg_fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on the labelled, usable studies of ``site_dirs``.

    Args:
        model: a LungVLModel.
        site_dirs: held-out site directories.
        threshold: sentence-entropy deferral threshold (default: config).
        calibrate: also compute the threshold that keeps the error rate of accepted key sentences
            at ``target_error`` (returned under ``calibrated_threshold``).
        target_error: see ``calibrate``.
        progress: ``progress(done, total, study_uid)``.
        seg_fn: optional replacement segmenter (for the DynUNet anchor), see ``explain_study``.

    Returns:
        ``{"overall": metrics, "by_cohort": {...}, "by_slice": {...}, "studies": [...]}``.
    """
    entries = []
    for d in site_dirs:
        cat = build_catalogue(d)
        cohort = cat.manifest.cohort if cat.manifest else "unknown"
        name = cat.manifest.name if cat.manifest else Path(d).name
        entries += [(name, cohort, e, cat) for e in cat.usable]
    results: list[StudyResult] = []
    for i, (name, cohort, e, cat) in enumerate(entries):
        assert e.series is not None
        try:
            vol = read_series(e.series.files)
        except SeriesError as err:
            results.append(StudyResult(e.study_uid, name, cohort, math.nan, {"error": str(err)}))
            continue
        prior = None
        if e.prior_study_uid and e.prior_study_uid in cat.studies and cat.studies[e.prior_study_uid].series:
            prior = read_series(cat.studies[e.prior_study_uid].series.files)  # type: ignore[union-attr]
        exp = explain_study(model, vol, prior=prior, threshold=threshold, seg_fn=seg_fn, with_text=seg_fn is None)
        results.append(StudyResult(e.study_uid, name, cohort, vol.spacing[0], score_study(exp, e, vol)))
        if progress:
            progress(i + 1, len(entries), e.study_uid)
    ok = [r for r in results if "error" not in r.values]
    out: dict[str, Any] = {"overall": aggregate(ok)}
    out["by_cohort"] = {c: aggregate([r for r in ok if r.cohort == c]) for c in sorted({r.cohort for r in ok})}
    out["by_slice"] = {
        b: aggregate([r for r in ok if (r.slice_mm >= 2.5) == (b == "thick (>=2.5 mm)")])
        for b in ("thin (<2.5 mm)", "thick (>=2.5 mm)")
    }
    sent = [s for r in ok for s in r.values.get("sentences", [])]
    if calibrate and sent:
        ent = np.asarray([s["entropy"] for s in sent])
        cor = np.asarray([s["correct"] for s in sent])
        out["calibrated_threshold"] = calibrate_entropy_threshold(ent, cor, target_error=target_error)
        out["calibration"] = {"key_sentences": len(sent), "correct": int(cor.sum()), "target_error": target_error}
    out["studies"] = [
        {
            "study_uid": r.study_uid,
            "site": r.site,
            "cohort": r.cohort,
            "slice_mm": r.slice_mm,
            **{k: v for k, v in r.values.items() if k not in ("sentences",)},
        }
        for r in results
    ]
    return out

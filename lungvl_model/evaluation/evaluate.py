"""``lungvl evaluate``: run the explanation pipeline on labelled studies and score every output.

Per study: explanation (findings, generated report, heads, deferral) → native-resolution Dice/HD95,
detection, malignancy (model vs Brock on true features vs Brock on measured features), Lung-RADS
(model head, rule engine on measured findings), growth, calibration, BLEU-4/ROUGE-L, clinical-concept
F1 (labeler on generated vs reference report), deferral. Optionally calibrates the per-sentence
entropy threshold (a key sentence is *correct* when the labeler's facts in it agree with the
reference report) and stores it beside the checkpoint.
"""

from __future__ import annotations

import dataclasses
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
from lungvl_model.evaluation.froc import froc_from_studies, operating_threshold
from lungvl_model.evaluation.risk_coverage import aurc, risk_coverage_curve, selective_error
from lungvl_model.evaluation.segmentation_metrics import (
    detection_summary,
    dice,
    found_nodule_dice,
    hd95,
    match_detections,
)
from lungvl_model.evaluation.text_metrics import bleu4, rouge_l_corpus
from lungvl_model.inference.calibration import (
    CalibrationRecord,
    CalibrationState,
    fit_calibration,
)
from lungvl_model.inference.candidate_filter import CandidateFilter
from lungvl_model.inference.deferral import DeferralSignals
from lungvl_model.inference.explain import Explanation, explain_study
from lungvl_model.inference.fact_check import fact_count_metrics
from lungvl_model.inference.narrative import CheckedDecoding
from lungvl_model.models.fine_detector import FineDetector
from lungvl_model.models.nodule_risk import NoduleRiskHead
from lungvl_model.text.labeler import label_report
from lungvl_model.text.report_labels import CONCEPT_KEYS, concept_counts, concept_f1
from lungvl_model.text.report_sections import decoder_target

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


def _num(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _located_rows(entry: StudyEntry) -> list[dict[str, str]]:
    """labels.csv nodule rows with a finite LPS centroid (the reference nodules, in order)."""
    keys = ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")
    return [r for r in entry.nodule_labels if all(math.isfinite(_float(r, k)) for k in keys)]


def reference_nodules(entry: StudyEntry) -> tuple[np.ndarray, np.ndarray]:
    """Reference centroids (LPS mm, ``(R, 3)``) and mean diameters ``(R,)`` from labels.csv."""
    pts, diam = [], []
    for r in _located_rows(entry):
        pts.append([_float(r, k) for k in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")])
        d = _float(r, "mean_diameter_mm")
        diam.append(d if math.isfinite(d) else 0.0)
    return np.asarray(pts, float).reshape(-1, 3), np.asarray(diam, float)


def report_wrong(report_lung_rads: int, lung_rads_true: int) -> bool:
    """A report is wrong when the Lung-RADS category it states differs from the reference (or is missing)."""
    return report_lung_rads != lung_rads_true


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
        v["found_dice"] = found_nodule_dice(pred, ref).dices
        v["hd95"] = hd95(pred, ref, volume.spacing) if pred.any() and ref.any() else math.nan
    ref_pts, ref_diam = reference_nodules(entry)
    det = match_detections([f.centroid_lps for f in exp.findings], ref_pts, ref_diam)
    v["detection"] = (det.tp, det.fp, det.fn)
    v["froc"] = {
        "candidates": [[[float(c) for c in pt], float(score)] for pt, score in exp.candidates],
        "ref_points": ref_pts.tolist(),
        "ref_diameters": ref_diam.tolist(),
    }
    v["model_malignancy"] = exp.model["malignancy_probability"]
    v["malignancy_logit"] = exp.model.get("malignancy_logit", math.nan)
    v["lung_rads_logits"] = exp.model.get("lung_rads_logits")
    v["nodule_malignancy"] = exp.model.get("nodule_malignancy_probability", math.nan)
    rows = _located_rows(entry)
    v["nodule_pairs"] = [
        [
            _num(exp.findings[i].malignancy_probability),
            _num(exp.findings[i].brock_probability),
            _float(rows[j], "malignant"),
        ]
        for i, j in det.pairs
    ]
    true_brock = [_float(r, "brock_probability") for r in entry.nodule_labels]
    true_brock = [b for b in true_brock if math.isfinite(b)]
    v["brock_true"] = max(true_brock) if true_brock else (0.0 if t.n_nodules == 0 else math.nan)
    measured = [f.brock_probability for f in exp.findings if f.brock_probability is not None]
    v["brock_measured"] = max(measured) if measured else 0.0
    v["lung_rads_model"] = lung_rads_index(exp.model["lung_rads"])
    v["lung_rads_rule"] = lung_rads_index(exp.rule_lung_rads)
    v["growth_model"] = exp.model["growth_mm_12_months"]
    ref_text = entry.report.text if entry.report else ""
    # the decoder writes FINDINGS and IMPRESSION only (the exam sentences come from the header): score those
    v["generated"], v["reference"] = decoder_target(exp.text), decoder_target(ref_text) if ref_text else ""
    gen_lab, ref_lab = label_report(exp.text), label_report(ref_text)
    v["concept_f1"] = concept_f1(gen_lab, ref_lab) if ref_text else math.nan
    v["concepts"] = concept_counts(gen_lab, ref_lab) if ref_text else {}
    v["report_lung_rads"] = lung_rads_index(gen_lab.lung_rads)
    v["deferred"] = exp.defer
    v["wrong"] = report_wrong(v["report_lung_rads"], v["lung_rads_true"]) if v["lung_rads_true"] >= 0 else None
    fc = exp.fact_check
    v["fact_unsupported"] = fc.n_unsupported if fc is not None else math.nan
    v["fact_contradictions"] = fc.n_contradictions if fc is not None else math.nan
    finding = [s for s in exp.sentences if s.section == "findings" and s.nodule is not None]
    v["finding_sentences"] = len(finding)
    v["finding_sentences_resampled"] = sum(s.decoding.startswith("sampled") for s in finding)
    v["signals"] = exp.signals.to_dict() if exp.signals is not None else None
    v["deferral_score"] = exp.deferral_score
    v["sentences"] = [
        {"entropy": s.mean_entropy, "correct": concept_f1(label_report(s.text), ref_lab) >= 0.999}
        for s in exp.sentences
        if s.key and ref_text
    ]
    return v


def concept_table(per_study: Sequence[dict[str, Sequence[int]]]) -> dict[str, dict[str, float]]:
    """Each clinical concept's counts summed over studies, with precision and recall (NaN when undefined).

    Args:
        per_study: each study's :func:`~lungvl_model.text.report_labels.concept_counts` (``{}`` without a
            reference report).

    Returns:
        ``{concept: {"hits", "predicted", "gold", "precision", "recall"}}`` for every concept of
        :data:`~lungvl_model.text.report_labels.CONCEPT_KEYS`.
    """
    out: dict[str, dict[str, float]] = {}
    for k in CONCEPT_KEYS:
        hits, predicted, gold = (sum(int(c[k][i]) for c in per_study if k in c) for i in range(3))
        out[k] = {
            "hits": hits,
            "predicted": predicted,
            "gold": gold,
            "precision": hits / predicted if predicted else math.nan,
            "recall": hits / gold if gold else math.nan,
        }
    return out


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
    found = [d for v in vals for d in v.get("found_dice", [])]
    out["dice_found_nodules"] = float(np.mean(found)) if found else math.nan
    out["n_found_nodules_segmented"] = len(found)
    out["hd95_mm"] = float(np.nanmean(col("hd95"))) if np.isfinite(col("hd95")).any() else math.nan
    out["detection"] = detection_summary([v["detection"] for v in vals])
    fr = [v["froc"] for v in vals if "froc" in v]
    if fr:
        out["froc"] = froc_from_studies(
            [f["candidates"] for f in fr],
            [np.asarray(f["ref_points"], float).reshape(-1, 3) for f in fr],
            [np.asarray(f["ref_diameters"], float) for f in fr],
            n_boot=500,
            seed=0,
        ).to_dict()
    y = col("malignant")
    for name in ("model_malignancy", "nodule_malignancy", "brock_true", "brock_measured"):
        out[f"auc_{name}"] = _auc_ci(y, col(name))
    pairs = np.asarray([p for v in vals for p in v.get("nodule_pairs", [])], float).reshape(-1, 3)
    out["auc_nodule_level_head"] = _auc_ci(pairs[:, 2], pairs[:, 0])
    out["auc_nodule_level_brock_measured"] = _auc_ci(pairs[:, 2], pairs[:, 1])
    out["facts"] = fact_count_metrics(col("fact_unsupported").tolist(), col("fact_contradictions").tolist())
    written = float(np.nansum(col("finding_sentences")))
    out["finding_sentences_resampled"] = (
        float(np.nansum(col("finding_sentences_resampled"))) / written if written else math.nan
    )
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
    out["concepts"] = concept_table([v.get("concepts", {}) for v in vals])
    deferred = np.asarray([bool(v["deferred"]) for v in vals])
    correct = col("report_lung_rads") == col("lung_rads_true")
    out["deferral"] = deferral_summary(deferred[known], correct[known]) if known.any() else {}
    scored = [v for v in vals if v.get("wrong") is not None and v.get("deferral_score") is not None]
    if scored:
        wrong = np.asarray([bool(v["wrong"]) for v in scored])
        score = np.asarray([float(v["deferral_score"]) for v in scored])
        curve = risk_coverage_curve(wrong, score)
        out["risk_coverage"] = {"aurc": aurc(curve), **selective_error(wrong, score, 0.3), "curve": curve.to_dict()}
    return out


def _run_studies(
    model: Any,
    site_dirs: Sequence[str | Path],
    explain_kwargs: dict[str, Any],
    progress: Progress | None,
) -> list[StudyResult]:
    """Explain and score every labelled, usable study of ``site_dirs`` (a study that cannot be read is an error row)."""
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
        exp = explain_study(model, vol, prior=prior, **explain_kwargs)
        results.append(StudyResult(e.study_uid, name, cohort, vol.spacing[0], score_study(exp, e, vol)))
        if progress:
            progress(i + 1, len(entries), e.study_uid)
    return results


def calibration_records(results: Sequence[StudyResult]) -> list[CalibrationRecord]:
    """One :class:`CalibrationRecord` per scored study with head logits, deferral signals and a reference category."""
    records = []
    for r in results:
        v = r.values
        if "error" in v or v.get("signals") is None or v.get("lung_rads_logits") is None or v.get("wrong") is None:
            continue
        logit = float(v["malignancy_logit"])
        if not math.isfinite(logit):
            continue
        y = v["malignant"]
        records.append(
            CalibrationRecord(
                study_uid=r.study_uid,
                malignancy_logit=logit,
                malignancy_label=None if y is None or not math.isfinite(float(y)) else int(y),
                lung_rads_logits=tuple(v["lung_rads_logits"]),
                lung_rads_label=int(v["lung_rads_true"]),
                signals=DeferralSignals.from_dict(v["signals"]),
                wrong=bool(v["wrong"]),
                malignancy_from_study_head=math.isnan(_num(v.get("nodule_malignancy"))),  # no nodule-level head
            )
        )
    return records


def fit_finding_threshold(results: Sequence[StudyResult], finding_fp_per_scan: float) -> float | None:
    """The validation scans' FROC operating point (candidate-filter score).

    The score with at most ``finding_fp_per_scan`` false positives per scan
    (:func:`~lungvl_model.evaluation.froc.operating_threshold`).

    Args:
        results: validation studies explained without a finding threshold (every filtered candidate scored).
        finding_fp_per_scan: false positives per scan allowed (> 0).

    Returns:
        The threshold in [0, 1], or None when no validation study has a candidate.
    """
    fr = [r.values["froc"] for r in results if "froc" in r.values]
    if not any(f["candidates"] for f in fr):
        return None
    t = operating_threshold(
        [f["candidates"] for f in fr],
        [np.asarray(f["ref_points"], float).reshape(-1, 3) for f in fr],
        [np.asarray(f["ref_diameters"], float) for f in fr],
        max_fp_per_scan=finding_fp_per_scan,
    )
    return min(1.0, max(0.0, t))


def fit_on_validation(
    results: Sequence[StudyResult],
    *,
    max_deferral_rate: float = 0.3,
    target_error: float = 0.1,
    finding_threshold: float | None = None,
) -> CalibrationState:
    """Temperatures, the deferral policy, the sentence-entropy threshold and the finding threshold from validation.

    Args:
        results: scored validation studies (never training or test studies), explained at the operating
            point the calibration will be used at (their reports are what the deferral policy is fitted on).
        max_deferral_rate: the deferral budget on validation.
        target_error: error rate of kept key sentences the entropy threshold aims at.
        finding_threshold: the finding threshold they were explained at (:func:`fit_finding_threshold` on a
            findings-only pass), stored as it is; None: none (no candidate filter).

    Raises:
        ValueError: no validation study has logits, signals and a reference Lung-RADS category.
    """
    records = calibration_records(results)
    if not records:
        raise ValueError(
            f"none of the {len(results)} validation studies has a reference Lung-RADS category and a generated report"
        )
    sent = [x for r in results for x in r.values.get("sentences", [])]
    thr = None
    if sent:
        thr = calibrate_entropy_threshold(
            np.asarray([x["entropy"] for x in sent]),
            np.asarray([x["correct"] for x in sent]),
            target_error=target_error,
        )
    state = fit_calibration(records, max_deferral_rate=max_deferral_rate, sentence_entropy_threshold=thr)
    if finding_threshold is not None:
        state = dataclasses.replace(state, finding_threshold=finding_threshold)
    sites = sorted({r.site for r in results})
    fitted_on = {"validation_sites": sites, "validation_studies": len(records), "key_sentences": len(sent)}
    return dataclasses.replace(state, metrics={**state.metrics, "fitted_on": fitted_on})


def evaluate(
    model: Any,
    site_dirs: Sequence[str | Path],
    *,
    threshold: float | None = None,
    validation_dirs: Sequence[str | Path] = (),
    calibration: CalibrationState | None = None,
    candidate_filter: CandidateFilter | None = None,
    fine_detector: FineDetector | None = None,
    nodule_risk: NoduleRiskHead | None = None,
    max_deferral_rate: float = 0.3,
    finding_fp_per_scan: float = 1.0,
    progress: Progress | None = None,
    seg_fn: Callable[..., Any] | None = None,
    checked: CheckedDecoding | None = None,
) -> dict[str, Any]:
    """Evaluate a model on the labelled, usable studies of ``site_dirs``.

    Args:
        model: a LungVLModel.
        site_dirs: held-out (test) site directories.
        threshold: sentence-entropy deferral threshold (default: the calibration's, else the config's).
        validation_dirs: validation sites, neither training nor test: when given, the heads' temperatures, the
            deferral policy and the sentence-entropy threshold are fitted on them first (returned under
            ``calibration_state``, a :class:`CalibrationState`) and the test sites are explained with them.
            With a candidate filter they are explained twice: findings only, every filtered candidate
            scored, for the finding threshold (FROC operating point); then in full at that threshold, so
            the deferral policy is fitted on reports written at the operating point it will be used at.
        calibration: a stored calibration to explain with (ignored when ``validation_dirs`` is given).
        candidate_filter: the checkpoint's nodule-candidate filter (None: every refined candidate is kept).
        fine_detector: the checkpoint's native-resolution detector (None: coarse candidates only).
        nodule_risk: the checkpoint's nodule-level risk head (None: no nodule-level malignancy).
        max_deferral_rate: deferral budget when fitting on ``validation_dirs``.
        finding_fp_per_scan: false positives per validation scan at the fitted finding threshold (with a
            candidate filter; LUNA16's headline operating point is 1).
        progress: ``progress(done, total, study_uid)``.
        seg_fn: optional replacement segmenter (for the DynUNet anchor), see ``explain_study``.
        checked: fact-checked N-best decoding of finding sentences (default ``CheckedDecoding()``; see
            ``explain_study``).

    Returns:
        ``{"overall": metrics, "by_cohort": {...}, "by_slice": {...}, "studies": [...]}`` (+ ``calibration``,
        ``calibration_state`` when fitted).
    """
    base = {
        "threshold": threshold,
        "seg_fn": seg_fn,
        "with_text": seg_fn is None,
        "candidate_filter": candidate_filter,
        "fine_detector": fine_detector,
        "nodule_risk": nodule_risk,
        "checked": checked,
    }
    out: dict[str, Any] = {}
    if validation_dirs:
        point = None
        if candidate_filter is not None:  # pass 1: the operating point, from every filtered candidate
            scan = {**base, "calibration": None, "with_text": False}
            point = fit_finding_threshold(
                [r for r in _run_studies(model, validation_dirs, scan, progress) if "error" not in r.values],
                finding_fp_per_scan,
            )
        at_point = CalibrationState(finding_threshold=point) if point is not None else None
        val = [
            r
            for r in _run_studies(model, validation_dirs, {**base, "calibration": at_point}, progress)
            if "error" not in r.values
        ]
        calibration = fit_on_validation(val, max_deferral_rate=max_deferral_rate, finding_threshold=point)
        out["calibration_state"] = calibration
        out["calibration"] = {"validation_studies": len(val), **calibration.to_dict()}
    results = _run_studies(model, site_dirs, {**base, "calibration": calibration}, progress)
    ok = [r for r in results if "error" not in r.values]
    out["overall"] = aggregate(ok)
    out["by_cohort"] = {c: aggregate([r for r in ok if r.cohort == c]) for c in sorted({r.cohort for r in ok})}
    out["by_slice"] = {
        b: aggregate([r for r in ok if (r.slice_mm >= 2.5) == (b == "thick (>=2.5 mm)")])
        for b in ("thin (<2.5 mm)", "thick (>=2.5 mm)")
    }
    out["studies"] = [
        {
            "study_uid": r.study_uid,
            "site": r.site,
            "cohort": r.cohort,
            "slice_mm": r.slice_mm,
            **{k: v for k, v in r.values.items() if k not in ("sentences", "froc")},
        }
        for r in results
    ]
    return out

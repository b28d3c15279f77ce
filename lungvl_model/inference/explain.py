"""Explain one CT study: findings, risk, a grounded narrative with confidence, and deferral.

Pipeline (DESIGN.md section 3, Inference): triage segmentation on the model grid → native-resolution
analysis of each candidate (:mod:`.findings`) → measurements, attenuation, lobe, juxtapleural →
comparison with a prior study → Brock (measured features) and Lung-RADS (rule engine) per nodule →
ranking by volume-weighted risk → generated explanation with per-sentence entropy confidence and
grounding boxes (:mod:`.narrative`) → risk heads on image + explanation → deferral and
disagreement flags. ``ask`` answers a question about one nodule with attention restricted to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lungvl_model.data.preprocess import body_center, preprocess
from lungvl_model.data.targets import LUNG_RADS_CLASSES
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.anatomy import (
    EMPHYSEMA_LAA,
    emphysema_index,
    is_juxtapleural,
    lobe_from_position,
    lung_mask,
)
from lungvl_model.inference.calibration import CalibrationState
from lungvl_model.inference.candidate_filter import CandidateFilter
from lungvl_model.inference.candidate_filter import score_findings as score_candidates
from lungvl_model.inference.deferral import DeferralSignals
from lungvl_model.inference.densitometry import emphysema_sentence
from lungvl_model.inference.exam_facts import ExamFacts, exam_sentences
from lungvl_model.inference.fact_check import FactCheck, check_report
from lungvl_model.inference.fact_constraint import restated_start
from lungvl_model.inference.finding_risk import clinical_rules, nodule_risk_scores
from lungvl_model.inference.findings import (
    Finding,
    GridMap,
    candidate_points,
    candidates,
    match_prior,
    measure_finding,
    merge_duplicates,
    refine_candidate,
    suppress_duplicates,
)
from lungvl_model.inference.fine_detection import REFINE_MARGIN_MM, DetectorMap
from lungvl_model.inference.narrative import (
    CheckedDecoding,
    Sentence,
    build_sentences,
    compose_report,
    generate_for_study,
    link_by_attention,
    write_findings_report,
)
from lungvl_model.inference.report_review import policy_for, review_report
from lungvl_model.models.fine_detector import FineDetector
from lungvl_model.models.fusion import TokenLayout
from lungvl_model.models.nodule_risk import NoduleRiskHead
from lungvl_model.text.report_sections import decoder_target
from lungvl_model.text.tokenizer import encode_reports
from lungvl_model.version import software_version

SegFn = Callable[[torch.Tensor], np.ndarray]
#: Version of the report.json layout (1: first versioned layout, with provenance and the fact check;
#: 2: ``provenance`` gains ``config`` / ``config_sha256``, and ``dicom`` lists the SEG and SR written beside it).
REPORT_SCHEMA_VERSION = 2


@dataclass
class Explanation:
    """Everything ``lungvl explain`` reports for one study (``to_dict`` is report.json).

    ``text`` is the report: the exam/patient sentences from the DICOM header (``exam_sentences``, never
    generated), then FINDINGS one finding at a time in ranked order, then IMPRESSION; ``sentences`` are
    the generated ones (``section`` says which).
    """

    study_uid: str
    series_uid: str
    findings: list[Finding]
    sentences: list[Sentence]
    text: str
    model: dict[str, Any]
    rule_lung_rads: str
    emphysema_index: float
    defer: bool
    defer_reasons: list[str]
    flags: list[str]
    patient: dict[str, Any]
    threshold: float
    prior_study_uid: str | None = None
    answer: dict[str, Any] | None = None
    grid: GridMap | None = None
    layout: TokenLayout | None = None
    prob: np.ndarray | None = field(default=None, repr=False)
    exam_sentences: list[str] = field(default_factory=list)
    candidates: list[tuple[tuple[float, float, float], float]] = field(default_factory=list)
    fact_check: FactCheck | None = None
    removed_sentences: list[Sentence] = field(default_factory=list)
    signals: DeferralSignals | None = None
    deferral_score: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (report.json)."""
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "software_version": software_version(),
            "provenance": self.provenance,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "prior_study_uid": self.prior_study_uid,
            "patient": self.patient,
            "findings": [f.to_dict() for f in self.findings],
            "explanation": self.text,
            "sentences": [s.to_dict() for s in self.sentences],
            "model": self.model,
            "lung_rads_rule_engine": self.rule_lung_rads,
            "emphysema_index_laa950": None if math.isnan(self.emphysema_index) else round(self.emphysema_index, 4),
            "defer_to_radiologist": self.defer,
            "defer_reasons": self.defer_reasons,
            "flags": self.flags,
            "deferral_entropy_threshold": self.threshold,
            "answer": self.answer,
            "exam_sentences": self.exam_sentences,
            "fact_check": self.fact_check.to_dict() if self.fact_check is not None else None,
            "removed_sentences": [s.to_dict() for s in self.removed_sentences],
            "deferral_signals": self.signals.to_dict() if self.signals is not None else None,
            "deferral_score": self.deferral_score,
        }


def patient_info(volume: CTVolume) -> dict[str, Any]:
    """Age and sex from the DICOM header; missing values are assumed and flagged."""
    age_txt = str(volume.meta.get("PatientAge", ""))
    m = re.match(r"(\d+)", age_txt)
    sex = str(volume.meta.get("PatientSex", "")).upper()
    return {
        "age": int(m.group(1)) if m else 62,
        "age_assumed": m is None,
        "sex": sex if sex in ("F", "M") else "",
        "sex_assumed": sex not in ("F", "M"),
    }


def analyse_candidates(
    model: Any,
    volume: CTVolume,
    prob_threshold: float,
    seg_fn: SegFn | None = None,
    candidate_filter: CandidateFilter | None = None,
    fine_detector: FineDetector | None = None,
    keep_threshold: float | None = None,
) -> tuple[list[Finding], dict[str, Any]]:
    """Triage + native-resolution analysis of one CT (no generation); returns findings and model state.

    Candidates: the coarse pass's components of ``prob > prob_threshold`` and, with a fine detector,
    the components of its sliding-window map over the lungs (:mod:`~.fine_detection`; each finding's
    ``model_probability`` is then its proposer's maximum probability). Every candidate is refined and
    measured at native resolution; two candidates refined onto the same nodule are suppressed as
    duplicates.

    Args:
        model: the LungVL model.
        volume: the CT.
        prob_threshold: triage threshold.
        seg_fn: another segmenter ``(1, 1, D, H, W) → (D, H, W)`` probabilities on the same grid (the
            DynUNet anchor); the model's own segmentation head when None.
        candidate_filter: a :class:`~lungvl_model.inference.candidate_filter.CandidateFilter`. When given,
            every refined candidate gets its ``nodule_probability``, duplicates are suppressed by that
            score, candidates below the filter's operating threshold are dropped, and the state's
            ``"candidates"`` holds every refined candidate (kept or not) as ``(LPS centroid, nodule
            probability)`` for FROC. None: every refined candidate is kept (suppression by triage
            probability) and ``"candidates"`` holds the triage components.
        fine_detector: the checkpoint's native-resolution detector
            (:class:`~lungvl_model.models.fine_detector.FineDetector`); None: coarse candidates only.
        keep_threshold: with a candidate filter, the score a finding must reach (at least the filter's
            own threshold): the calibration's validation operating point.
    """
    cfg = model.config
    pre = preprocess(volume, cfg.input)
    grid = GridMap.from_origin(volume, pre.spacing_mm, pre.origin_zyx_mm)
    device = next(model.parameters()).device
    image = torch.from_numpy(pre.image)[None, None].to(device)
    with torch.no_grad():
        vis = model.encode_image(image)
        prob = torch.sigmoid(model.seg_head(vis.scales[0]))[0, 0].float().cpu().numpy()
        if seg_fn is not None:
            prob = np.asarray(seg_fn(image), dtype=np.float32)
    if candidate_filter is not None and candidate_filter.triage_source == "fine_detector" and fine_detector is None:
        raise ValueError(
            "the candidate filter was fitted on a fine detector's probability; the checkpoint has no fine detector"
        )
    lungs = lung_mask(volume.hu)
    measured: list[Finding] = []
    detector_p: list[float] = []  # the fine detector's maximum over each measured candidate's mask
    proposals = [(cand, p, grid, None) for cand, p in candidates(prob, prob_threshold)]
    dmap = DetectorMap.of(fine_detector, volume, lungs) if fine_detector is not None else None
    if dmap is not None:
        proposals += [(cand, p, dmap.fine.grid, REFINE_MARGIN_MM) for cand, p in dmap.candidates()]
    for cand, p, on, margin in proposals:
        refined = refine_candidate(volume, cand, on, margin, lungs=lungs)
        if refined is not None:
            measured.append(measure_finding(volume, *refined, p))
            if dmap is not None:
                detector_p.append(dmap.over(*refined))
    if candidate_filter is None:
        findings = suppress_duplicates(measured)  # two triage components refined onto the same nodule
        findings = merge_duplicates(findings, measured, volume)
        # every triage component (also below the keep threshold) as (LPS centroid, max probability), for FROC
        points = candidate_points(volume, prob, grid, min(prob_threshold, 0.1))
        if fine_detector is not None:  # the fine candidates too, scored by their proposer
            points = [(f.centroid_lps, f.model_probability) for f in findings]
    else:
        detector_probability = detector_p if dmap is not None else None
        score_candidates(measured, volume, lungs, candidate_filter, detector_probability=detector_probability)
        scored = suppress_duplicates(measured, [f.nodule_probability or 0.0 for f in measured])
        scored = merge_duplicates(scored, measured, volume)  # one nodule, two proposals: measured on both masks
        points = [(f.centroid_lps, float(f.nodule_probability or 0.0)) for f in scored]
        keep = max(candidate_filter.threshold, keep_threshold if keep_threshold is not None else 0.0)
        findings = [f for f in scored if (f.nodule_probability or 0.0) >= keep]
    for f in findings:
        f.lobe = lobe_from_position(volume, np.asarray(f.centroid_zyx), lungs)
        f.juxtapleural = is_juxtapleural(f.full_mask(volume.shape), lungs, volume.spacing)
    state = {"vis": vis, "prob": prob, "grid": grid, "lungs": lungs, "shape": pre.image.shape, "candidates": points}
    return findings, state


def decoding_fact_counts(check: FactCheck, nodule: int | None, *, has_findings: bool) -> tuple[int, int, int, int]:
    """``(contradicted, unsupported, missing, supported)`` facts of one candidate text, for the N-best choice.

    Args:
        check: the candidate's fact check.
        nodule: the finding a finding sentence is written from; None for an IMPRESSION.
        has_findings: the study has kept findings.

    Returns:
        The counts; ``missing``: a finding sentence that does not state its finding's size and lobe (one each),
        or an IMPRESSION of a study with findings that states no supported size, lobe, type or Lung-RADS
        category of any finding (1).
    """
    kinds = [v.verdict for v in check.verdicts]
    supported = [v for v in check.verdicts if v.verdict == "supported"]
    if nodule is not None:
        said = {v.fact for v in supported if v.finding in (nodule, None)}
        missing = len({"size", "lobe"} - said)
    else:
        said = {v.fact for v in supported}
        missing = int(has_findings and not said & {"size", "lobe", "type", "lung_rads"})
    return kinds.count("contradiction"), kinds.count("unsupported"), missing, kinds.count("supported")


def explain_study(
    model: Any,
    volume: CTVolume,
    *,
    prior: CTVolume | None = None,
    ask: str | None = None,
    threshold: float | None = None,
    prob_threshold: float = 0.5,
    max_new_tokens: int | None = None,
    seg_fn: SegFn | None = None,
    with_text: bool = True,
    calibration: CalibrationState | None = None,
    candidate_filter: CandidateFilter | None = None,
    fine_detector: FineDetector | None = None,
    nodule_risk: NoduleRiskHead | None = None,
    site: Mapping[str, Any] | None = None,
    checked: CheckedDecoding | None = None,
) -> Explanation:
    """Run the whole explanation pipeline on one study.

    The report: exam/patient sentences from the header (:func:`~.exam_facts.exam_sentences`), then
    FINDINGS one sentence per kept finding in ranked order (each decoded from its finding slot and
    grounded on its mask; the negative sentence only when no finding is kept), then IMPRESSION from all
    slots (:func:`~.narrative.write_findings_report`). The rule engine (Brock, Lung-RADS, ranking) runs
    first because its outputs are slot attributes; its spiculation input is the heads' reading of the
    image with an empty explanation.

    Args:
        model: a trained :class:`~lungvl_model.models.lungvl.LungVLModel` (eval mode is set).
        volume: the study's CT.
        prior: the prior study's CT (12 months earlier), for growth and Lung-RADS context.
        ask: a question about one nodule ("what about nodule 2?").
        threshold: per-sentence mean-entropy deferral threshold (nats); default from the config.
        prob_threshold: triage probability threshold.
        max_new_tokens: generation length (default: the decoder's context).
        seg_fn: replacement segmenter for the triage pass (see :func:`analyse_candidates`).
        with_text: generate the explanation (False: findings and heads only, e.g. for a segmentation anchor).
        calibration: the checkpoint's calibration (temperatures, deferral policy, entropy threshold, finding
            threshold).
        candidate_filter: the checkpoint's nodule-candidate filter (None: every refined candidate is kept).
        fine_detector: the checkpoint's native-resolution detector (None: coarse candidates only).
        nodule_risk: the checkpoint's nodule-level risk head: each finding's malignancy and the study's
            noisy-OR, which is then the report's malignancy probability (None: the study head's).
        site: the study's site metadata for the exam facts (age, sex, smoking, protocol; see ``ExamFacts``).
        checked: fact-checked N-best decoding of the finding sentences (default
            :class:`~.narrative.CheckedDecoding`; ``CheckedDecoding(candidates=0)``: greedy only).

    Returns:
        The explanation.
    """
    model.eval()
    cfg = model.config
    if threshold is None and calibration is not None:
        threshold = calibration.sentence_entropy_threshold
    thr = float(cfg.heads.deferral_entropy if threshold is None else threshold)
    keep = calibration.finding_threshold if calibration is not None else None
    findings, st = analyse_candidates(model, volume, prob_threshold, seg_fn, candidate_filter, fine_detector, keep)
    patient = patient_info(volume)
    emph = emphysema_index(volume.hu, st["lungs"])
    flags: list[str] = []
    if prior is not None:
        prior_findings, _ = analyse_candidates(
            model, prior, prob_threshold, seg_fn, candidate_filter, fine_detector, keep
        )
        shift = volume.voxel_to_lps(body_center(volume.hu)) - prior.voxel_to_lps(body_center(prior.hu))
        match_prior(findings, prior_findings, shift)
    vis, grid, shape = st["vis"], st["grid"], st["shape"]
    vt, layout = model.tokens(vis)
    n_new = max_new_tokens or cfg.text.n_positions - 2
    device = vt.device
    # Brock and Lung-RADS are slot attributes, so the rule engine ranks the findings before generation;
    # its spiculation input is the heads' reading of the image with an empty explanation
    with torch.no_grad():
        blank = encode_reports(model.tokenizer, [" "], cfg.text.n_positions)
        blank_emb = model.embed_text(blank["input_ids"].to(device), blank["attention_mask"].to(device))
        spic_image = float(torch.sigmoid(model.heads(vis.pooled, blank_emb).spiculated_logit)[0])
    rule, rule_inputs = clinical_rules(findings, patient, emph > EMPHYSEMA_LAA, spic_image > 0.5)
    nodule_p = nodule_risk_scores(nodule_risk, vis, grid, volume, findings, patient, emph)
    site_meta = dict(site or {})
    if prior is not None and prior.meta.get("StudyDate"):
        site_meta.setdefault("prior_study_date", prior.meta["StudyDate"])
    facts = ExamFacts.from_volume(volume, site_meta)
    exam = exam_sentences(facts)  # from the header and site metadata only, never generated
    text, sentences, found, impression = "", [], [], []
    if with_text:

        def read_back(candidate: list[Sentence], section: str) -> FactCheck:
            probes = [
                Sentence(text=c.text, tokens=(0, 0), mean_entropy=0.0, confidence=1.0, key=True, low_confidence=False,
                         nodule=c.nodule, section=section)
                for c in candidate
            ]  # fmt: skip
            return check_report(
                probes, findings, facts, rule_lung_rads=rule, has_prior=prior is not None, emphysema_index=emph
            )

        def restate(candidate: list[Sentence], section: str) -> str | None:
            return restated_start([c.text for c in candidate], read_back(candidate, section), findings)

        def verify(candidate: list[Sentence], section: str) -> tuple[int, int, int, int]:
            nodule = candidate[0].nodule if section == "findings" and candidate else None
            return decoding_fact_counts(read_back(candidate, section), nodule, has_findings=bool(findings))

        found, impression = write_findings_report(
            model, vis, vt, layout, findings, grid=grid, volume=volume, grid_shape=shape, threshold=thr,
            max_new_tokens=n_new, verify=verify, checked=checked, restate=restate,
        )  # fmt: skip
        measured = emphysema_sentence(None if math.isnan(emph) else emph)
        if measured is not None:  # the lungs' densitometry, after the nodules (where reports write it)
            found.append(
                Sentence(text=measured, tokens=(0, 0), mean_entropy=0.0, confidence=1.0, key=False,
                         low_confidence=False, section="findings", decoding="measured")
            )  # fmt: skip
        sentences = found + impression
        text = compose_report(exam, found, impression)
    with torch.no_grad():
        enc = encode_reports(model.tokenizer, [decoder_target(text) or " "], cfg.text.n_positions)
        emb = model.embed_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        risk = model.heads(vis.pooled, emb)
    spic_p = float(torch.sigmoid(risk.spiculated_logit)[0])
    link_by_attention(sentences, findings)  # finding sentences: by construction; the IMPRESSION: while decoding
    mal_logit = float(risk.malignancy_logit[0])
    lr_logits = risk.lung_rads_logits[0].float().cpu().numpy()
    if calibration is not None:
        head_p = calibration.malignancy_probability(mal_logit)
        lr_probs = calibration.lung_rads_probabilities(lr_logits)
    else:
        head_p = float(torch.sigmoid(risk.malignancy_logit)[0])
        lr_probs = torch.softmax(risk.lung_rads_logits[0], -1).cpu().numpy()
    model_cat = LUNG_RADS_CLASSES[int(np.argmax(lr_probs))]
    mal_p = head_p if nodule_p is None else nodule_p
    model_out = {
        "malignancy_probability": round(mal_p, 4),
        "malignancy_source": "study head" if nodule_p is None else "nodule-level head, noisy-OR over findings",
        "study_head_malignancy_probability": round(head_p, 4),
        "nodule_malignancy_probability": None if nodule_p is None else round(nodule_p, 4),
        "malignancy_logit": round(mal_logit, 5),
        "lung_rads_logits": [round(float(v), 5) for v in lr_logits],
        "calibrated": calibration is not None,
        "lung_rads": model_cat,
        "lung_rads_probabilities": {c: round(float(p), 4) for c, p in zip(LUNG_RADS_CLASSES, lr_probs, strict=True)},
        "growth_mm_12_months": round(float(risk.growth_mm[0]), 3),
        "concepts": {
            "type": ["solid", "part_solid", "non_solid"][int(risk.type_logits[0].argmax())],
            "spiculated": round(spic_p, 4),
            "calcified": round(float(torch.sigmoid(risk.calcified_logit)[0]), 4),
            "juxtapleural": round(float(torch.sigmoid(risk.juxtapleural_logit)[0]), 4),
            "roundness": round(float(risk.roundness[0]), 4),
            "diameter_mm": round(float(risk.diameter_mm[0]), 2),
        },
        "malignancy_concept_contributions": {
            k: round(float(v), 4)
            for k, v in zip(
                ("solid", "part_solid", "non_solid", "spiculated", "calcified", "juxtapleural", "roundness", "size"),
                risk.concept_contribution[0],
                strict=True,
            )
        },
        "malignancy_residual_logit": round(float(risk.residual_logit[0]), 4),
    }
    reasons: list[str] = []
    review = None
    if with_text:
        review = review_report(
            sentences, findings, facts, rule_lung_rads=rule, rule_inputs=rule_inputs, model_lung_rads=model_cat,
            has_prior=prior is not None, malignancy_probability=mal_p, policy=policy_for(calibration, thr),
            emphysema_index=emph,
        )  # fmt: skip
        reasons += review.reasons
        flags += review.removal_notes
        sentences = review.kept
        kept = {id(s) for s in sentences}  # by identity: Sentence equality would compare heatmap arrays
        text = compose_report(exam, [s for s in found if id(s) in kept], [s for s in impression if id(s) in kept])
    if with_text and not sentences:
        reasons.append("the model generated no sentence")
    elif with_text and not any(s.key for s in sentences):
        reasons.append("the explanation states no clinical fact (no nodule, size, lobe, type or Lung-RADS statement)")
    if model_cat != rule and not with_text:
        flags.append(f"model Lung-RADS {model_cat} disagrees with the rule engine on measured findings ({rule})")
    if patient["age_assumed"] or patient["sex_assumed"]:
        flags.append("patient age/sex missing from the DICOM header: Brock uses age 62 / male")
    exp = Explanation(
        study_uid=volume.study_uid,
        series_uid=volume.series_uid,
        findings=findings,
        sentences=sentences,
        text=text,
        model=model_out,
        rule_lung_rads=rule,
        emphysema_index=emph,
        defer=bool(reasons) or (review is not None and review.defer),
        defer_reasons=reasons,
        flags=flags,
        patient=patient,
        threshold=thr,
        prior_study_uid=prior.study_uid if prior is not None else None,
        grid=grid,
        layout=layout,
        prob=st["prob"],
        exam_sentences=exam,
        candidates=st["candidates"],
        fact_check=review.fact_check if review is not None else None,
        removed_sentences=review.removed if review is not None else [],
        signals=review.signals if review is not None else None,
        deferral_score=review.score if review is not None else None,
    )
    if ask:
        exp.answer = answer_question(model, exp, vt, ask, n_new, volume)
    return exp


def answer_question(
    model: Any, exp: Explanation, vt: torch.Tensor, question: str, n_new: int, volume: CTVolume
) -> dict[str, Any]:
    """Focused explanation of one nodule: generation attending only to visual tokens around it."""
    m = re.search(r"nodule\s*(?:#|no\.?|number)?\s*(\d+)", question, re.IGNORECASE)
    k = int(m.group(1)) if m else 1
    target = next((f for f in exp.findings if f.index == k), None)
    if target is None or exp.layout is None or exp.grid is None:
        return {
            "question": question,
            "nodule": k,
            "answer": f"There is no nodule {k}; {len(exp.findings)} nodule(s) were found.",
        }
    centre = exp.grid.src_to_model(np.asarray(target.centroid_zyx))
    keep = []
    for _, _, g in exp.layout.blocks():
        shape = exp.prob.shape if exp.prob is not None else g
        cell = np.asarray(shape) / np.asarray(g)
        zz, yy, xx = np.meshgrid(*[np.arange(n) for n in g], indexing="ij")
        centres = (np.stack([zz, yy, xx], -1) + 0.5) * cell
        dist = np.linalg.norm((centres - centre) / cell, axis=-1)
        keep.append((dist <= 1.5).reshape(-1))
    mask = torch.from_numpy(np.concatenate(keep)).to(vt.device).long()[None]
    if int(mask.sum()) == 0:
        mask[0, int(np.argmin(np.concatenate([np.zeros(len(k_)) for k_ in keep])))] = 1
    gen = generate_for_study(model, vt, max_new_tokens=n_new, visual_mask=mask)
    text, sentences = build_sentences(
        gen, model.tokenizer, exp.layout, tuple(exp.prob.shape), threshold=exp.threshold, grid=exp.grid, volume=volume
    )
    facts = (
        f"Nodule {k}: {target.mean_diameter_mm:.1f} mm mean diameter ({target.longest_diameter_mm:.1f} x "
        f"{target.short_axis_mm:.1f} mm), {target.type.replace('_', '-')}, {target.lobe}, "
        f"volume {target.volume_mm3:.0f} mm3, Lung-RADS {target.lung_rads or 'n/a'}, "
        f"Brock {target.brock_probability if target.brock_probability is not None else 'n/a'}"
        + (f", growth {target.growth_mm:+.1f} mm since the prior" if target.growth_mm is not None else "")
        + "."
    )
    return {
        "question": question,
        "nodule": k,
        "measured": facts,
        "answer": text,
        "sentences": [s.to_dict() for s in sentences],
        "visual_tokens_used": int(mask.sum()),
    }

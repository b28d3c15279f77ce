"""Per-finding clinical rules and risk for ``explain``: Brock, Lung-RADS, ranking, nodule-level malignancy.

The rule engine runs on the measured findings (:mod:`lungvl_model.clinical`); its categories and Brock
probabilities are slot attributes of the findings-conditioned report, so they are computed before generation.
The nodule-level risk head (:mod:`lungvl_model.models.nodule_risk`) scores each finding from its native margin
profile and measured Brock inputs; the study's risk is the noisy-OR of its findings.
"""

from __future__ import annotations

import math
from typing import Any

from lungvl_model.clinical.brock import BrockInputs, brock_probability
from lungvl_model.clinical.lung_rads import InvalidFieldError, NoduleFinding, categorize_exam, categorize_nodule
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.anatomy import EMPHYSEMA_LAA
from lungvl_model.inference.findings import Finding, GridMap
from lungvl_model.models.nodule_risk import NoduleRiskHead, score_findings

__all__ = ["clinical_rules", "nodule_risk_scores"]


def clinical_rules(
    findings: list[Finding], patient: dict[str, Any], emphysema: bool, spiculated: bool
) -> tuple[str, list[NoduleFinding]]:
    """Brock and Lung-RADS per finding, ranking, and the exam category (with the rule engine's inputs)."""
    dominant = max(findings, key=lambda f: f.mean_diameter_mm) if findings else None
    rule_inputs = []
    for f in findings:
        spic = spiculated and f is dominant
        try:
            f.brock_probability = round(
                brock_probability(
                    BrockInputs(
                        age=patient["age"],
                        female=patient["sex"] == "F",
                        family_history=False,
                        emphysema=emphysema,
                        longest_diameter_mm=max(f.longest_diameter_mm, 0.5),
                        type=f.type,
                        upper_lobe=f.lobe in ("RUL", "LUL"),
                        nodule_count=len(findings),
                        spiculation=spic,
                    )
                ),
                5,
            )
        except ValueError as e:
            f.notes.append(f"Brock not computed: {e}")
        solid_c = f.solid_component_mm if f.type == "part_solid" else None
        try:
            nf = NoduleFinding(
                type=f.type,
                mean_diameter_mm=max(f.mean_diameter_mm, 0.1),
                solid_component_mm=solid_c,
                context=f.context,
                juxtapleural=f.juxtapleural and f.type == "solid",
                benign_pattern=f.calcified,
                suspicious_features=spic,
            )
            f.lung_rads = categorize_nodule(nf)
            rule_inputs.append(nf)
        except (InvalidFieldError, ValueError) as e:
            f.notes.append(f"Lung-RADS not computed: {e}")
        f.risk_score = round((f.brock_probability or 0.0) * f.volume_mm3 ** (1 / 3), 5)
    findings.sort(key=lambda f: -f.risk_score)
    for i, f in enumerate(findings, start=1):
        f.index = i
    return categorize_exam(rule_inputs), rule_inputs


def nodule_risk_scores(
    head: NoduleRiskHead | None,
    vis: Any,
    grid: GridMap,
    volume: CTVolume,
    findings: list[Finding],
    patient: dict[str, Any],
    emphysema: float,
) -> float | None:
    """Set each finding's ``malignancy_probability``; the study's noisy-OR (None without a head)."""
    if head is None:
        return None
    scales = [s[0] for s in vis.scales[: head.config.feature_scales]]
    emph = None if math.isnan(emphysema) else bool(emphysema > EMPHYSEMA_LAA)
    probs, study = score_findings(
        head, scales, grid, volume.hu, volume.spacing, findings, patient=patient, emphysema=emph
    )
    for f, p in zip(findings, probs, strict=True):
        f.malignancy_probability = round(float(p), 5)
    return float(study)

"""The last step before a report leaves ``explain``: fact check, removal of unsupported sentences, deferral.

Every generated sentence is read back (:func:`~lungvl_model.inference.fact_check.check_report`) against the
measured findings, the rule engine's category and the exam facts of the header. A sentence that states a fact
nothing supports (a patient age the header does not hold, a nodule where none was kept, a comparison without a
prior) is removed from the report and listed; a contradiction (a size, lobe, type or category that disagrees
with the finding the sentence grounds) stays visible and defers the report. The deferral decision combines the
fact check with the other signals (:class:`~lungvl_model.inference.deferral.DeferralSignals`) under the
checkpoint's calibrated policy, or, uncalibrated, the hard rules plus the per-sentence entropy threshold; a
FINDINGS sentence that does not state its finding's size and lobe also defers the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lungvl_model.clinical.borderline import borderline_size_mm
from lungvl_model.clinical.lung_rads import NoduleFinding
from lungvl_model.inference.calibration import CalibrationState
from lungvl_model.inference.deferral import DeferralPolicy, DeferralSignals, decide, deferral_score
from lungvl_model.inference.exam_facts import ExamFacts
from lungvl_model.inference.fact_check import FactCheck, check_report
from lungvl_model.inference.findings import Finding
from lungvl_model.inference.narrative import Sentence

__all__ = ["KEY_FINDING_FACTS", "Review", "incomplete_finding_sentences", "policy_for", "review_report"]


@dataclass
class Review:
    """What the review decided.

    Attributes:
        fact_check: the verdicts of every generated sentence (before removal).
        kept: the generated sentences that stay in the report, in order.
        removed: the generated sentences removed for an unsupported fact.
        signals: the deferral signals of the report as generated.
        defer: hand the report to a radiologist.
        reasons: why (each names the signal, its value and the threshold).
        score: the deferral score (higher deferred first; for the risk–coverage curve).
    """

    fact_check: FactCheck
    kept: list[Sentence]
    removed: list[Sentence]
    signals: DeferralSignals
    defer: bool
    reasons: list[str]
    score: float

    @property
    def removal_notes(self) -> list[str]:
        """One line per removed sentence, naming its unsupported facts."""
        out = []
        for c in self.fact_check.sentences:
            if not c.kept:
                facts = ", ".join(sorted({v.fact for v in c.verdicts if v.verdict == "unsupported"}))
                out.append(f"removed {c.text!r}: unsupported {facts} (no finding or header value says so)")
        return out


def policy_for(calibration: CalibrationState | None, entropy_threshold: float) -> DeferralPolicy:
    """The calibrated policy, else the hard rules plus the per-sentence entropy threshold (nats)."""
    if calibration is not None and calibration.deferral_policy is not None:
        return calibration.deferral_policy
    return DeferralPolicy(entropy_threshold=entropy_threshold)


def review_report(
    sentences: Sequence[Sentence],
    findings: Sequence[Finding],
    exam: ExamFacts,
    *,
    rule_lung_rads: str,
    rule_inputs: Sequence[NoduleFinding],
    model_lung_rads: str,
    has_prior: bool,
    malignancy_probability: float,
    policy: DeferralPolicy,
    emphysema_index: float | None = None,
) -> Review:
    """Fact-check the generated sentences, drop the unsupported ones and decide on deferral.

    Args:
        sentences: the generated sentences (findings then impression; the header's exam sentences are not
            generated and are not passed).
        findings: the kept findings (ranked, ``index`` set).
        exam: the exam facts of the header and site metadata.
        rule_lung_rads: the rule engine's exam category on the measured findings.
        rule_inputs: the findings as given to the rule engine (for the borderline-size signal).
        model_lung_rads: the model head's category.
        has_prior: a prior study was compared.
        malignancy_probability: the report's calibrated malignancy probability.
        policy: the deferral policy (:func:`policy_for`).
        emphysema_index: the measured LAA-950, the source of emphysema statements (None: unknown).

    Returns:
        The :class:`Review`.
    """
    check = check_report(
        sentences, findings, exam, rule_lung_rads=rule_lung_rads, has_prior=has_prior, emphysema_index=emphysema_index
    )
    kept = [s for s, c in zip(sentences, check.sentences, strict=True) if c.kept]
    removed = [s for s, c in zip(sentences, check.sentences, strict=True) if not c.kept]
    signals = DeferralSignals(
        max_key_entropy=max((s.mean_entropy for s in sentences if s.key), default=0.0),
        lung_rads_disagreement=model_lung_rads != rule_lung_rads,
        unsupported_facts=check.n_unsupported,
        contradictions=check.n_contradictions,
        borderline_mm=borderline_size_mm(rule_inputs),
        malignancy_probability=min(max(float(malignancy_probability), 0.0), 1.0),
        weakest_finding_score=min(
            (min(max(float(f.nodule_probability), 0.0), 1.0) for f in findings if f.nodule_probability is not None),
            default=1.0,
        ),
    )
    defer, reasons = decide(signals, policy)
    incomplete = incomplete_finding_sentences(sentences, check)
    reasons = check.defer_reasons + incomplete + [r for r in reasons if not r.startswith("text–finding contradictions")]
    return Review(
        check,
        kept,
        removed,
        signals,
        defer or check.defer or bool(incomplete),
        reasons,
        deferral_score(signals, policy),
    )


#: What a FINDINGS sentence must state about its finding for the report to go out without a radiologist.
KEY_FINDING_FACTS = ("size", "lobe")


def incomplete_finding_sentences(sentences: Sequence[Sentence], check: FactCheck) -> list[str]:
    """One deferral reason per FINDINGS sentence that does not state its finding's size and lobe.

    A finding sentence is the report's description of a kept finding; one that leaves out where it is or how
    big it is (a vague or garbled sentence, even a true one) does not describe the finding, so the report
    goes to a radiologist.
    """
    out = []
    for s, c in zip(sentences, check.sentences, strict=True):
        if s.section != "findings" or s.nodule is None or not c.kept:
            continue
        said = {v.fact for v in c.verdicts}  # a contradicted size or lobe defers as a contradiction already
        missing = [f for f in KEY_FINDING_FACTS if f not in said]
        if missing:
            out.append(f"the sentence about nodule {s.nodule} does not state its {' and '.join(missing)}: {s.text!r}")
    return out

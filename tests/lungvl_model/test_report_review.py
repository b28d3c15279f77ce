"""The review before a report leaves explain: unsupported sentences removed, contradictions defer."""

from __future__ import annotations

import math

from lungvl_model.clinical.lung_rads import NoduleFinding
from lungvl_model.inference.calibration import CalibrationState
from lungvl_model.inference.deferral import DeferralPolicy
from lungvl_model.inference.exam_facts import ExamFacts
from lungvl_model.inference.findings import Finding
from lungvl_model.inference.narrative import Sentence
from lungvl_model.inference.report_review import policy_for, review_report


def _finding() -> Finding:
    return Finding(
        centroid_zyx=(0.0, 0.0, 0.0), centroid_lps=(0.0, 0.0, 0.0), longest_diameter_mm=9.0, short_axis_mm=7.0,
        mean_diameter_mm=8.0, volume_mm3=math.pi * 8.0**3 / 6, solid_component_mm=8.0, type="solid",
        calcified=False, lobe="RUL", index=1, lung_rads="4A",
    )  # fmt: skip


def _sentence(text: str, nodule: int | None = None, entropy: float = 0.1, key: bool = True) -> Sentence:
    return Sentence(text=text, tokens=(0, 1), mean_entropy=entropy, confidence=0.9, key=key, low_confidence=False,
                    nodule=nodule)  # fmt: skip


RULE_INPUTS = [NoduleFinding(type="solid", mean_diameter_mm=8.0)]
EXAM = ExamFacts(slice_thickness_mm=2.5, slice_thickness_source="SliceThickness")


def _review(sentences: list[Sentence], **kw: object):  # noqa: ANN202
    args = {
        "rule_lung_rads": "4A", "rule_inputs": RULE_INPUTS, "model_lung_rads": "4A", "has_prior": False,
        "malignancy_probability": 0.2, "policy": DeferralPolicy(),
    }  # fmt: skip
    args.update(kw)
    return review_report(sentences, [_finding()], EXAM, **args)  # type: ignore[arg-type]


def test_supported_report_is_kept_and_not_deferred() -> None:
    s = [_sentence("A 9 x 7 mm solid nodule in the right upper lobe.", nodule=1), _sentence("Lung-RADS 4A.")]
    r = _review(s)
    assert r.kept == s and r.removed == [] and not r.defer, r.reasons
    assert r.signals.contradictions == 0 and r.signals.unsupported_facts == 0
    assert r.signals.borderline_mm == 0.0  # 8 mm sits on the 8 mm solid threshold


def test_unsupported_sentence_is_removed_and_named() -> None:
    ok = _sentence("A 9 x 7 mm solid nodule in the right upper lobe.", nodule=1)
    made_up = _sentence("68-year-old man with a 40 pack-year history.", key=False)
    r = _review([ok, made_up])
    assert r.kept == [ok] and r.removed == [made_up]
    assert r.signals.unsupported_facts >= 2  # age, sex, pack-years: nothing in the header says so
    assert any("68-year-old" in n for n in r.removal_notes)
    assert r.defer  # the default policy allows no unsupported fact


def test_contradiction_defers_and_names_both_values() -> None:
    wrong = _sentence("A 9 x 7 mm solid nodule in the left lower lobe.", nodule=1)
    r = _review([wrong])
    assert r.defer and r.kept == [wrong]  # a contradiction stays visible
    assert any("left lower lobe" in x.lower() or "LLL" in x for x in r.reasons), r.reasons
    assert any("RUL" in x for x in r.reasons), r.reasons


def test_model_rule_disagreement_defers_under_the_default_policy() -> None:
    s = [_sentence("A 9 x 7 mm solid nodule in the right upper lobe.", nodule=1)]
    r = _review(s, model_lung_rads="2")
    assert r.defer and r.signals.lung_rads_disagreement
    assert any("disagrees" in x for x in r.reasons)


def test_uncalibrated_policy_uses_the_entropy_threshold() -> None:
    assert policy_for(None, 1.5).entropy_threshold == 1.5
    fitted = DeferralPolicy(defer_on_lung_rads_disagreement=False)
    assert policy_for(CalibrationState(deferral_policy=fitted), 1.5) is fitted
    s = [_sentence("A 9 x 7 mm solid nodule in the right upper lobe.", nodule=1, entropy=2.0)]
    r = _review(s, policy=policy_for(None, 1.5))
    assert r.defer and any("entropy" in x for x in r.reasons)


def test_a_finding_sentence_without_its_size_or_lobe_defers() -> None:
    vague = _sentence("A solid nodule, as described.", nodule=1)
    vague.section = "findings"
    r = _review([vague])
    assert r.defer and r.signals.contradictions == 0 and r.kept == [vague]
    assert any(x.startswith("the sentence about nodule 1 does not state its size and lobe") for x in r.reasons), (
        r.reasons
    )
    complete = _sentence("A 9 x 7 mm solid nodule in the right upper lobe.", nodule=1)
    complete.section = "findings"
    assert not _review([complete]).defer
    in_impression = _sentence("Solid nodule.", nodule=1)
    in_impression.section = "impression"  # the rule is about the FINDINGS description
    assert not any("does not state" in x for x in _review([in_impression]).reasons)
    wrong_lobe = _sentence("A 9 x 7 mm solid nodule in the left lower lobe.", nodule=1)
    wrong_lobe.section = "findings"  # a stated but wrong lobe is a contradiction, not an omission
    assert not any("does not state" in x for x in _review([wrong_lobe]).reasons)


def test_weakest_finding_score_signal() -> None:
    s = [_sentence("A 9 x 7 mm solid nodule in the right upper lobe.", nodule=1), _sentence("Lung-RADS 4A.")]
    assert _review(s).signals.weakest_finding_score == 1.0  # no candidate filter: no score
    weak, strong = _finding(), _finding()
    weak.nodule_probability, strong.nodule_probability = 0.55, 0.97
    strong.index = 2
    args = {
        "rule_lung_rads": "4A", "rule_inputs": RULE_INPUTS, "model_lung_rads": "4A", "has_prior": False,
        "malignancy_probability": 0.2, "policy": DeferralPolicy(),
    }  # fmt: skip
    r = review_report(s, [weak, strong], EXAM, **args)  # type: ignore[arg-type]
    assert r.signals.weakest_finding_score == 0.55

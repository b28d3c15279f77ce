from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest

from lungvl_model.clinical.borderline import (
    NON_SOLID_THRESHOLDS_MM,
    PART_SOLID_COMPONENT_THRESHOLDS_MM,
    PART_SOLID_TOTAL_THRESHOLDS_MM,
    SOLID_THRESHOLDS_MM,
    borderline_size_mm,
)
from lungvl_model.clinical.lung_rads import NoduleFinding, UncoveredFindingError, categorize_nodule
from lungvl_model.inference.deferral import (
    BORDERLINE_CAP_MM,
    FEATURES,
    HARD_RULE_SCORE,
    DeferralPolicy,
    DeferralSignals,
    LearnedScore,
    decide,
    deferral_score,
    disagreement_rule_holds,
    features,
    fit_policy,
)


def sig(**kw: Any) -> DeferralSignals:
    base: dict[str, Any] = {
        "max_key_entropy": 0.5,
        "lung_rads_disagreement": False,
        "unsupported_facts": 0,
        "contradictions": 0,
        "borderline_mm": math.inf,
        "malignancy_probability": 0.1,
    }
    return DeferralSignals(**{**base, **kw})


# ------------------------------------------------------------------------------------------- borderline


@pytest.mark.parametrize(
    ("finding", "expected"),
    [
        (NoduleFinding("solid", 7.2), 0.8),  # baseline thresholds 6, 8, 15
        (NoduleFinding("solid", 4.5, context="new"), 0.5),  # new: 4, 6, 8
        (NoduleFinding("solid", 5.0, context="growing"), 3.0),  # growing: only 8
        (NoduleFinding("solid", 9.5), 1.5),  # 8 -> 1.5 (10 is not a threshold without the juxtapleural flag)
        (NoduleFinding("solid", 9.5, juxtapleural=True), 0.5),  # juxtapleural: < 10 -> 2
        (NoduleFinding("solid", 9.0, suspicious_features=True), 3.0),  # 3/4A/4B all become 4X: only 6 remains
        (NoduleFinding("solid", 7.0, context="stable", prior_category="3"), 1.0),  # 6 inactive (2 either side)
        (NoduleFinding("solid", 9.0, context="stable", prior_category="4A"), 6.0),  # only 15 changes it
        (NoduleFinding("part_solid", 10.0, solid_component_mm=5.0), 1.0),  # component 6 (4 inactive at baseline)
        (NoduleFinding("part_solid", 10.0, solid_component_mm=4.3, context="new"), 0.3),  # new: component 4
        (NoduleFinding("part_solid", 6.4, solid_component_mm=2.0), 0.4),  # total 6
        (NoduleFinding("non_solid", 27.0), 3.0),
        (NoduleFinding("non_solid", 27.0, context="growing"), 3.0),  # >= 30 and growing is uncovered: a change
    ],
)
def test_borderline_by_hand(finding: NoduleFinding, expected: float) -> None:
    assert borderline_size_mm([finding]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "finding",
    [
        NoduleFinding("solid", 7.0, benign_pattern=True),
        NoduleFinding("solid", 7.0, context="slow_growing"),
        NoduleFinding("solid", 7.0, context="stable", prior_category="4B"),
        NoduleFinding("non_solid", 31.0, context="stable"),
    ],
)
def test_borderline_is_inf_when_size_cannot_change_the_category(finding: NoduleFinding) -> None:
    assert borderline_size_mm([finding]) == math.inf


def test_borderline_takes_the_closest_finding() -> None:
    assert borderline_size_mm([]) == math.inf
    assert borderline_size_mm([NoduleFinding("solid", 11.0), NoduleFinding("solid", 5.8)]) == pytest.approx(0.2)


def _cat(f: NoduleFinding) -> str:
    try:
        return categorize_nodule(f)
    except UncoveredFindingError:
        return "uncovered"


def _configs() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for ctx in ("baseline", "new", "growing", "stable", "slow_growing"):
        priors = (None, "2", "3", "4A", "4B") if ctx == "stable" else (None,)
        for prior in priors:
            for susp in (False, True):
                for jux in (False, True):
                    out.append(
                        (
                            "solid",
                            dict(
                                type="solid",
                                context=ctx,
                                prior_category=prior,
                                suspicious_features=susp,
                                juxtapleural=jux,
                            ),
                        )
                    )
                out.append(
                    (
                        "total",
                        dict(
                            type="part_solid",
                            context=ctx,
                            prior_category=prior,
                            suspicious_features=susp,
                            solid_component_mm=2.5,
                        ),
                    )
                )
                out.append(
                    (
                        "component",
                        dict(
                            type="part_solid",
                            mean_diameter_mm=12.0,
                            context=ctx,
                            prior_category=prior,
                            suspicious_features=susp,
                        ),
                    )
                )
        out.append(("non_solid", dict(type="non_solid", context=ctx)))
    return out


def test_every_category_change_is_at_an_active_threshold() -> None:
    """Scan sizes: wherever the rule engine changes category, a table threshold lies there and counts."""
    grid = [round(0.1 * k, 1) for k in range(26, 360)]
    for dim, kw in _configs():
        if dim == "component":
            grid_d = [g for g in grid if g <= 12.0]
            make = [NoduleFinding(**kw, solid_component_mm=g) for g in grid_d]  # type: ignore[misc]
            table = PART_SOLID_COMPONENT_THRESHOLDS_MM
        else:
            grid_d = grid
            make = [NoduleFinding(**kw, mean_diameter_mm=g) for g in grid_d]  # type: ignore[misc]
            table = {
                "solid": SOLID_THRESHOLDS_MM,
                "total": PART_SOLID_TOTAL_THRESHOLDS_MM,
                "non_solid": NON_SOLID_THRESHOLDS_MM,
            }[dim]
        cats = [_cat(f) for f in make]
        for i in range(len(grid_d) - 1):
            if cats[i] != cats[i + 1]:
                a, b = grid_d[i], grid_d[i + 1]
                ts = [t for t in table if a < t <= b + 1e-9]
                assert ts, f"{dim} {kw}: category {cats[i]} -> {cats[i + 1]} between {a} and {b}, no table threshold"
                assert borderline_size_mm([make[i]]) <= ts[0] - a + 1e-9, (dim, kw, a)


# ------------------------------------------------------------------------------------------- signals & policy


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_key_entropy": -0.1}, "max_key_entropy.*-0.1"),
        ({"max_key_entropy": math.nan}, "max_key_entropy"),
        ({"lung_rads_disagreement": 1}, "lung_rads_disagreement.*1"),
        ({"unsupported_facts": -1}, "unsupported_facts.*-1"),
        ({"contradictions": 1.5}, "contradictions.*1.5"),
        ({"contradictions": True}, "contradictions.*True"),
        ({"borderline_mm": -2.0}, "borderline_mm.*-2.0"),
        ({"malignancy_probability": 1.2}, "malignancy_probability.*1.2"),
    ],
)
def test_invalid_signals(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sig(**kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_contradictions": -1}, "max_contradictions.*-1"),
        ({"max_unsupported_facts": 0.5}, "max_unsupported_facts.*0.5"),
        ({"defer_on_lung_rads_disagreement": "yes"}, "defer_on_lung_rads_disagreement.*yes"),
        ({"entropy_threshold": -1.0}, "entropy_threshold.*-1.0"),
        ({"max_deferral_rate": 0.0}, "max_deferral_rate.*0.0"),
        ({"max_deferral_rate": 1.5}, "max_deferral_rate.*1.5"),
    ],
)
def test_invalid_policy(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeferralPolicy(**kw)


def test_invalid_learned_score() -> None:
    ok = dict(mean=(0.0,) * 5, scale=(1.0,) * 5, weight=(1.0,) * 5, bias=0.0, threshold=0.5, l2=0.1)
    LearnedScore(**ok)  # type: ignore[arg-type]
    for key, bad, match in [
        ("scale", (1.0, 0.0, 1.0, 1.0, 1.0), "scale must be > 0"),
        ("weight", (1.0, 2.0), "weight must be a list of 5"),
        ("threshold", 1.5, "threshold.*1.5"),
        ("feature_names", ("a", "b", "c", "d", "e"), "feature_names"),
        ("feature_names", tuple(reversed(FEATURES)), "in that order"),
        ("feature_names", (FEATURES[0],) * 5, "distinct"),
    ]:
        with pytest.raises(ValueError, match=match):
            LearnedScore(**{**ok, key: bad})  # type: ignore[arg-type]


def test_signals_and_policy_json_round_trip() -> None:
    s = sig(borderline_mm=math.inf, contradictions=2)
    assert DeferralSignals.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    old = {k: v for k, v in s.to_dict().items() if k != "weakest_finding_score"}  # written before it existed
    assert DeferralSignals.from_dict(old).weakest_finding_score == 1.0
    learned = LearnedScore(
        mean=(1, 2, 3, 4, 0.5), scale=(1, 1, 2, 2, 1), weight=(0.5, -0.2, 0, 1, -1), bias=-1.0, threshold=0.4, l2=0.1
    )  # type: ignore[arg-type]
    p = DeferralPolicy(max_unsupported_facts=None, entropy_threshold=1.5, max_deferral_rate=0.25, learned=learned)
    assert DeferralPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        DeferralPolicy.from_dict({**p.to_dict(), "extra": 1})
    d = p.to_dict()
    del d["max_contradictions"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['max_contradictions'\]"):
        DeferralPolicy.from_dict(d)


def test_features() -> None:
    f = features(sig(max_key_entropy=1.25, borderline_mm=0.75, malignancy_probability=0.8, weakest_finding_score=0.6))
    assert f.tolist() == pytest.approx([1.25, 0.75, 0.8, 0.4, 0.6])
    assert features(sig(malignancy_probability=0.8), ("malignancy_uncertainty",)).tolist() == pytest.approx([0.4])
    assert features(sig(borderline_mm=math.inf))[1] == BORDERLINE_CAP_MM


# ------------------------------------------------------------------------------------------- decide


def test_hard_rules_name_signal_value_and_threshold() -> None:
    defer, why = decide(sig(contradictions=2, unsupported_facts=1, lung_rads_disagreement=True), DeferralPolicy())
    assert defer and len(why) == 3
    assert "contradictions: 2 > 0 allowed" in why[0]
    assert "unsupported facts in the text: 1 > 0 allowed" in why[1]
    assert "Lung-RADS" in why[2]
    assert decide(sig(), DeferralPolicy()) == (False, [])
    relaxed = DeferralPolicy(max_contradictions=2, max_unsupported_facts=None, defer_on_lung_rads_disagreement=False)
    assert decide(sig(contradictions=2, unsupported_facts=5, lung_rads_disagreement=True), relaxed) == (False, [])
    defer, why = decide(sig(max_key_entropy=1.2), DeferralPolicy(entropy_threshold=1.0))
    assert defer and why == ["max key-sentence entropy 1.200 nats > threshold 1.000"]


def test_learned_rule_by_hand() -> None:
    # standardised entropy only: p = sigmoid(2 * (entropy - 1)); threshold 0.5 <=> entropy >= 1. A score
    # fitted before weakest_finding_score existed (four features) reads only its four.
    learned = LearnedScore(
        mean=(1.0, 0.0, 0.0, 0.0),
        scale=(1.0, 1.0, 1.0, 1.0),
        weight=(2.0, 0.0, 0.0, 0.0),
        bias=0.0,
        threshold=0.5,
        l2=0.1,
        feature_names=FEATURES[:4],
    )
    policy = DeferralPolicy(learned=learned)
    assert learned.probability(sig(max_key_entropy=1.5)) == pytest.approx(1 / (1 + math.exp(-1.0)))
    defer, why = decide(sig(max_key_entropy=1.5), policy)
    assert defer and why == [
        "learned error score 0.731 >= threshold 0.500: max key-sentence entropy 1.5 nats "
        "(validation mean 1 nats, +1.00 log-odds)"
    ]
    assert decide(sig(max_key_entropy=0.9), policy) == (False, [])
    assert deferral_score(sig(max_key_entropy=0.9), policy) == pytest.approx(1 / (1 + math.exp(0.2)))
    assert deferral_score(sig(contradictions=1), policy) == HARD_RULE_SCORE
    never = DeferralPolicy(learned=dataclasses.replace(learned, threshold=None))
    assert decide(sig(max_key_entropy=5.0), never) == (False, [])


# ------------------------------------------------------------------------------------------- fit


def test_fit_defers_exactly_the_wrong_high_entropy_reports() -> None:
    ent = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.9, 2.0]
    wrong = [False] * 8 + [True, True]
    policy, summary = fit_policy([sig(max_key_entropy=e) for e in ent], wrong, max_deferral_rate=0.3)
    assert policy.learned is not None and policy.learned.weight[0] > 0
    # budget 3, but deferring the third-highest (a right report) gains nothing: fewest deferrals win
    assert summary == {
        "n": 10,
        "n_hard": 0,
        "n_learned": 2,
        "deferral_rate": 0.2,
        "error_all": 0.2,
        "error_kept": 0.0,
        "note": "",
        "lung_rads_disagreement": {
            "n": 10,
            "disagreeing": 0,
            "error_disagreeing": summary["lung_rads_disagreement"]["error_disagreeing"],
            "error_agreeing": 0.2,
            "rule": True,
            "why": "no validation report disagrees: kept",
        },
    }
    assert math.isnan(summary["lung_rads_disagreement"]["error_disagreeing"])
    assert decide(sig(max_key_entropy=1.9), policy)[0] and not decide(sig(max_key_entropy=0.8), policy)[0]


def test_fit_counts_hard_rules_in_the_budget() -> None:
    signals = [sig(contradictions=1), sig(contradictions=1)] + [sig(max_key_entropy=e) for e in (0.1, 0.2, 0.3, 2.0)]
    wrong = [True, False, False, False, False, True]
    policy, summary = fit_policy(signals, wrong, max_deferral_rate=0.5)  # floor(3) - 2 hard = 1 learned
    assert summary["n_hard"] == 2 and summary["n_learned"] == 1 and summary["error_kept"] == 0.0
    _, summary = fit_policy(signals, wrong, max_deferral_rate=0.34)  # floor(2.04) - 2 = 0 left
    assert summary["n_learned"] == 0 and "budget" in summary["note"]
    assert summary["deferral_rate"] == pytest.approx(2 / 6)


def test_disagreement_rule_kept_only_where_validation_supports_it() -> None:
    agree, disagree = sig(), sig(lung_rads_disagreement=True)
    # informative: 2 of 2 disagreeing wrong, 1 of 8 agreeing wrong, 2 <= floor(0.3 * 10)
    keep, why = disagreement_rule_holds([disagree] * 2 + [agree] * 8, np.array([1, 1, 1] + [0] * 7, bool), 0.3)
    assert keep and why["error_disagreeing"] == 1.0 and why["error_agreeing"] == 0.125 and "kept" in why["why"]
    # a head giving one category to every study disagrees everywhere: over budget, off
    keep, why = disagreement_rule_holds([disagree] * 10, np.array([1] * 7 + [0] * 3, bool), 0.3)
    assert not keep and "alone defers 10 of 10" in why["why"]
    # within budget but no more often wrong than the agreeing reports: off
    keep, why = disagreement_rule_holds([disagree] * 2 + [agree] * 8, np.array([1, 0] + [1] * 4 + [0] * 4, bool), 0.3)
    assert not keep and "uninformative" in why["why"]
    # fitted policy: the rule is off, so a disagreeing report is not deferred for it
    policy, summary = fit_policy([disagree] * 10, [True] * 7 + [False] * 3, max_deferral_rate=0.3)
    assert not policy.defer_on_lung_rads_disagreement and summary["n_hard"] == 0
    assert decide(disagree, policy) == (False, [])
    policy, _ = fit_policy([disagree] * 2 + [agree] * 8, [True] * 3 + [False] * 7, max_deferral_rate=0.3)
    assert policy.defer_on_lung_rads_disagreement and decide(disagree, policy)[0]


def test_weakest_finding_score_enters_the_learned_score_and_its_reason() -> None:
    # wrong reports are those whose weakest kept finding scored just above the operating point
    score = [0.95, 0.9, 0.92, 0.97, 0.99, 0.93, 0.55, 0.52, 0.91, 0.94]
    wrong = [False] * 6 + [True, True] + [False] * 2
    policy, summary = fit_policy([sig(weakest_finding_score=v) for v in score], wrong, max_deferral_rate=0.3)
    assert policy.learned is not None and policy.learned.weight[FEATURES.index("weakest_finding_score")] < 0
    assert summary["n_learned"] == 2 and summary["error_kept"] == 0.0
    defer, why = decide(sig(weakest_finding_score=0.5), policy)
    assert defer and "lowest candidate-filter score of a kept finding 0.5" in why[0]
    assert not decide(sig(weakest_finding_score=0.96), policy)[0]


def test_fit_without_both_outcomes_has_no_learned_score() -> None:
    policy, summary = fit_policy([sig(), sig(max_key_entropy=2.0)], [False, False])
    assert policy.learned is None and "all right or all wrong" in summary["note"]
    assert summary["deferral_rate"] == 0.0


def test_fit_generalises_on_synthetic_reports() -> None:
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[list[DeferralSignals], np.ndarray]:
        border = rng.exponential(2.0, n)
        ent = rng.gamma(2.0, 0.3, n)
        p = rng.random(n)
        logit = -3.0 + 1.5 * ent + 2.0 * np.exp(-border) + 2.0 * (1 - np.abs(2 * p - 1))
        wrong = rng.random(n) < 1 / (1 + np.exp(-logit))
        contra = rng.random(n) < 0.05
        wrong |= contra
        s = [
            sig(
                max_key_entropy=float(e), borderline_mm=float(b), malignancy_probability=float(q), contradictions=int(c)
            )
            for e, b, q, c in zip(ent, border, p, contra, strict=True)
        ]
        return s, wrong

    val_s, val_y = draw(600)
    policy, summary = fit_policy(val_s, val_y, max_deferral_rate=0.3)
    assert summary["deferral_rate"] <= 0.3 and summary["error_kept"] < summary["error_all"]
    assert policy.learned is not None and all(w > 0 for w in policy.learned.weight[:1])
    assert policy.learned.weight[1] < 0  # closer to a threshold = more likely wrong
    test_s, test_y = draw(2000)
    deferred = np.array([decide(s, policy)[0] for s in test_s])
    assert deferred.mean() < 0.36
    assert test_y[~deferred].mean() < 0.8 * test_y.mean()


@pytest.mark.parametrize(
    ("wrong", "kw", "match"),
    [
        ([True], {}, "one entry per report"),
        ([2, 0], {}, "boolean or 0/1"),
        ([True, False], {"l2": -1.0}, "l2"),
        ([True, False], {"max_deferral_rate": 0.0}, "max_deferral_rate"),
    ],
)
def test_fit_invalid_args(wrong: list[Any], kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_policy([sig(), sig()], wrong, **kw)

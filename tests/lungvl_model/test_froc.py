"""FROC (LUNA16 protocol) on scans whose curve is computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lungvl_model.evaluation.froc import (
    LUNA16_FP_RATES,
    FrocInputError,
    froc,
    froc_from_studies,
    match_scan,
    operating_threshold,
)

# Scan 0: nodule A at the origin (10 mm: radius 5), nodule B at x=50 (6 mm: radius 3).
#   c1 (1,0,0) 0.9 hits A; c2 (0,3,0) 0.4 hits A again (A keeps 0.9); c3 (100,0,0) 0.8 FP;
#   c4 (50,0,4) 0.3 is 4 mm from B (> 3): FP.
# Scan 1: nodule C at the origin (8 mm: radius 4). c5 (0,0,2) 0.7 hits C; c6 0.6 FP; c7 0.2 FP.
CAND_P = [
    np.array([[1, 0, 0], [0, 3, 0], [100, 0, 0], [50, 0, 4]], float),
    np.array([[0, 0, 2], [30, 30, 30], [-40, 0, 0]], float),
]
CAND_S = [np.array([0.9, 0.4, 0.8, 0.3]), np.array([0.7, 0.6, 0.2])]
REF_P = [np.array([[0, 0, 0], [50, 0, 0]], float), np.array([[0, 0, 0]], float)]
REF_D = [np.array([10.0, 6.0]), np.array([8.0])]


def test_match_scan_keeps_best_hit_and_lists_fps() -> None:
    nod, fps = match_scan(CAND_P[0], CAND_S[0], REF_P[0], REF_D[0])
    assert nod.tolist() == [0.9, -math.inf]
    assert sorted(fps.tolist()) == [0.3, 0.8]


def test_froc_by_hand() -> None:
    # thresholds 0.9 .8 .7 .6 .3 .2 -> (FP/scan, TP): (0,1) (.5,1) (.5,2) (1,2) (1.5,2) (2,2), 3 nodules
    r = froc(CAND_P, CAND_S, REF_P, REF_D)
    third = 1 / 3
    assert r.sensitivity == pytest.approx([third, third, 2 * third, 2 * third, 2 * third, 2 * third, 2 * third])
    assert r.cpm == pytest.approx(4 / 7)
    assert r.curve_fps.tolist() == [0, 0, 0.5, 0.5, 1.0, 1.5, 2.0]
    assert r.curve_sensitivity == pytest.approx([0, third, third, 2 * third, 2 * third, 2 * third, 2 * third])
    assert (r.n_scans, r.n_nodules, r.n_detected, r.n_false_positives) == (2, 3, 2, 4)
    assert r.fp_rates == LUNA16_FP_RATES


def test_excluded_reference_hits_are_ignored() -> None:
    # c3 now lies on an excluded finding: FPs 0.6 0.3 0.2 -> (0,1) (0,2) (.5,2) (1,2) (1.5,2)
    ex_p = [np.array([[100, 0, 0]], float), np.zeros((0, 3))]
    ex_d = [np.array([4.0]), np.zeros(0)]
    r = froc(CAND_P, CAND_S, REF_P, REF_D, excluded_points=ex_p, excluded_diameters=ex_d)
    assert r.sensitivity == pytest.approx([2 / 3] * 7)
    assert r.n_false_positives == 3


def test_small_references_become_excluded() -> None:
    # B (6 mm) excluded; c4 is outside its radius so still an FP; 2 nodules: (0,1) (.5,1) (.5,2) ...
    r = froc(CAND_P, CAND_S, REF_P, REF_D, min_diameter_mm=7.0)
    assert r.n_nodules == 2
    assert r.sensitivity == pytest.approx([0.5, 0.5, 1, 1, 1, 1, 1])
    assert r.cpm == pytest.approx(6 / 7)


def test_min_radius_turns_near_miss_into_hit() -> None:
    # radius >= 4 mm: c4 (4 mm from B) hits B at 0.3 -> (0,1) (.5,1) (.5,2) (1,2) (1,3) (1.5,3)
    r = froc(CAND_P, CAND_S, REF_P, REF_D, min_radius_mm=4.0)
    assert r.sensitivity == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1])
    assert r.cpm == pytest.approx(16 / 21)


def test_tied_scores_enter_together() -> None:
    # a TP and an FP at the same score: 1 FP per scan is needed for any sensitivity
    r = froc([np.array([[0, 0, 0], [9, 9, 9]], float)], [np.array([0.5, 0.5])], [np.zeros((1, 3))], [np.array([4.0])])
    assert r.sensitivity == pytest.approx([0, 0, 0, 1, 1, 1, 1])


def test_scan_without_candidates_or_nodules() -> None:
    r = froc([np.zeros((0, 3)), CAND_P[1]], [np.zeros(0), CAND_S[1]], [REF_P[0], np.zeros((0, 3))], [REF_D[0], []])
    # 2 nodules never hit; 3 FPs over 2 scans
    assert r.sensitivity == pytest.approx([0.0] * 7) and r.n_false_positives == 3 and r.n_nodules == 2
    none = froc([CAND_P[1]], [CAND_S[1]], [np.zeros((0, 3))], [np.zeros(0)])
    assert math.isnan(none.cpm) and none.n_nodules == 0


def test_bootstrap_is_seeded_and_collapses_on_identical_scans() -> None:
    r1 = froc(CAND_P, CAND_S, REF_P, REF_D, n_boot=200, seed=3)
    r2 = froc(CAND_P, CAND_S, REF_P, REF_D, n_boot=200, seed=3)
    assert r1.cpm_ci == r2.cpm_ci and r1.sensitivity_ci == r2.sensitivity_ci
    assert r1.cpm_ci is not None and 0.0 <= r1.cpm_ci[0] <= r1.cpm_ci[1] <= 1.0
    same = froc([CAND_P[0]] * 3, [CAND_S[0]] * 3, [REF_P[0]] * 3, [REF_D[0]] * 3, n_boot=50)
    assert same.cpm_ci == pytest.approx((same.cpm, same.cpm))
    assert froc(CAND_P, CAND_S, REF_P, REF_D).cpm_ci is None


def test_from_studies_matches_arrays() -> None:
    studies = [
        [(tuple(p), float(s)) for p, s in zip(cp, cs, strict=True)] for cp, cs in zip(CAND_P, CAND_S, strict=True)
    ]
    r = froc_from_studies(studies, REF_P, REF_D)
    assert r.cpm == pytest.approx(4 / 7)
    assert r.to_dict()["n_nodules"] == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cand_points": [np.zeros((2, 2))]}, r"cand_points of scan 0 must have shape \(N, 3\), got \(2, 2\)"),
        ({"cand_scores": [np.array([0.5, np.nan])]}, r"cand_scores of scan 0: value 1 is invalid: nan"),
        ({"cand_scores": [np.array([0.5])]}, r"cand_scores of scan 0 has 1 values for 2 points"),
        ({"ref_diameters": [np.array([-1.0])]}, r"ref_diameters of scan 0: value 0 is invalid: -1.0"),
        ({"ref_points": [np.array([[0, np.inf, 0]])]}, r"ref_points of scan 0: row 0 is not finite"),
        ({"ref_points": []}, r"ref_points has 0 scans, cand_points has 1"),
        ({"fp_rates": (1.0, 0.5)}, r"fp_rates must be positive and increasing"),
        ({"n_boot": -1}, r"n_boot must be >= 0, got -1"),
        ({"ci_level": 1.0}, r"ci_level must be in \(0, 1\), got 1.0"),
        ({"excluded_points": [np.zeros((0, 3))]}, r"given together"),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    args = {
        "cand_points": [np.zeros((2, 3))],
        "cand_scores": [np.array([0.5, 0.4])],
        "ref_points": [np.zeros((1, 3))],
        "ref_diameters": [np.array([5.0])],
    }
    kwargs = dict(kwargs)
    pos = {k: kwargs.pop(k) for k in list(kwargs) if k in args}
    args |= pos
    with pytest.raises(FrocInputError, match=match):
        froc(args["cand_points"], args["cand_scores"], args["ref_points"], args["ref_diameters"], **kwargs)
    with pytest.raises(FrocInputError, match="at least one scan"):
        froc([], [], [], [])


def test_operating_threshold_by_hand() -> None:
    # scan 1: the nodule hit at 0.9, false positives 0.8 and 0.3; scan 2: the nodule at 0.7, a false positive 0.5
    cands = [[((0, 0, 0), 0.9), ((50, 0, 0), 0.8), ((0, 50, 0), 0.3)], [((0, 0, 0), 0.7), ((60, 0, 0), 0.5)]]
    refs, diam = [[[0, 0, 0]], [[0, 0, 0]]], [[10.0], [10.0]]
    # budget per scan -> false positives allowed over 2 scans: 0 -> 0.9; 1 -> 0.7 (0.8 is in); 2 -> 0.5; 4 -> 0.3
    got = [operating_threshold(cands, refs, diam, max_fp_per_scan=b) for b in (0.0, 0.5, 1.0, 2.0)]
    assert got == [0.9, 0.7, 0.5, 0.3]
    # the top candidate is a false positive and nothing may be: nothing is kept
    assert operating_threshold([[((50, 0, 0), 0.9)]], [[[0, 0, 0]]], [[10.0]], max_fp_per_scan=0.0) == math.inf
    with pytest.raises(FrocInputError, match="max_fp_per_scan"):
        operating_threshold(cands, refs, diam, max_fp_per_scan=-1.0)
    with pytest.raises(FrocInputError, match="one of each per scan"):
        operating_threshold(cands, refs[:1], diam, max_fp_per_scan=1.0)

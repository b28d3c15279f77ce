from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lungvl_model.evaluation.risk_coverage import aurc, plot_risk_coverage, risk_coverage_curve, selective_error


def test_curve_without_ties_by_hand() -> None:
    c = risk_coverage_curve(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]))
    # kept in score order: errors 0 | 0 1 | 0 1 0 | 0 1 0 1
    assert c.coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert c.risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert c.threshold.tolist() == [0.2, 0.3, 0.4, math.inf]
    assert c.error_all == 0.5 and c.n == 4
    assert aurc(c) == pytest.approx((0.0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_ties_are_kept_or_deferred_together() -> None:
    error = np.array([False, True, True, True, False])
    score = np.array([1.0, 1.0, 2.0, 2.0, 3.0])
    c = risk_coverage_curve(error, score)
    # groups: {1: [ok, wrong]}, {2: [wrong, wrong]}, {3: [ok]}
    assert c.coverage.tolist() == pytest.approx([0.4, 0.8, 1.0])
    assert c.risk.tolist() == pytest.approx([0.5, 0.75, 0.6])
    assert aurc(c) == pytest.approx(0.4 * 0.5 + 0.4 * 0.75 + 0.2 * 0.6)
    perm = np.array([4, 2, 0, 3, 1])
    c2 = risk_coverage_curve(error[perm], score[perm])
    assert c2.coverage.tolist() == c.coverage.tolist() and c2.risk.tolist() == c.risk.tolist()


@pytest.mark.parametrize(
    ("rate", "deferral", "error_kept", "ratio", "threshold"),
    [
        (0.0, 0.0, 0.6, 1.0, math.inf),
        (0.3, 0.2, 0.75, 0.75 / 0.6, 3.0),  # the tie group at 2 would take deferral to 0.6
        (0.6, 0.6, 0.5, 0.5 / 0.6, 2.0),
        (0.59, 0.2, 0.75, 0.75 / 0.6, 3.0),
    ],
)
def test_selective_error_by_hand(
    rate: float, deferral: float, error_kept: float, ratio: float, threshold: float
) -> None:
    r = selective_error(np.array([0, 1, 1, 1, 0]), np.array([1.0, 1.0, 2.0, 2.0, 3.0]), rate)
    assert r["deferral_rate"] == pytest.approx(deferral)
    assert r["coverage"] == pytest.approx(1 - deferral)
    assert r["error_all"] == pytest.approx(0.6)
    assert r["error_kept"] == pytest.approx(error_kept)
    assert r["ratio"] == pytest.approx(ratio)
    assert r["threshold"] == threshold and r["n"] == 5


def test_a_perfect_score_meets_the_acceptance_ratio() -> None:
    error = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    r = selective_error(error, error.astype(float), 0.3)
    assert r["deferral_rate"] == pytest.approx(0.2) and r["error_kept"] == 0.0 and r["ratio"] == 0.0
    # a constant score can defer nothing (one tie group): ratio 1
    assert selective_error(error, np.zeros(10), 0.3)["ratio"] == 1.0
    # an inverted score defers the right reports: 3 of 10 at most, all correct ones
    assert selective_error(error, -error.astype(float) + np.arange(10) * 1e-3, 0.3)["ratio"] > 1.0


def test_hard_rule_scores_may_be_infinite_and_no_error_gives_nan_ratio() -> None:
    c = risk_coverage_curve(np.array([1, 0, 0]), np.array([np.inf, 0.2, 0.1]))
    assert c.risk.tolist() == pytest.approx([0.0, 0.0, 1 / 3])
    assert math.isnan(selective_error(np.zeros(4, bool), np.arange(4.0), 0.3)["ratio"])


def test_to_dict_is_json_ready() -> None:
    d = risk_coverage_curve(np.array([0, 1]), np.array([0.0, 1.0])).to_dict()
    assert d["threshold"] == [1.0, None] and d["coverage"] == [0.5, 1.0]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    c = risk_coverage_curve(rng.random(50) < 0.3, rng.random(50))
    out = plot_risk_coverage(c, tmp_path / "rc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("error", "score", "match"),
    [
        ([], [], "must not be empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], [0.1], "same length"),
        ([0, 2], [0.1, 0.2], "boolean or 0/1.*2"),
        ([0, 1], [0.1, math.nan], "NaN"),
        ([0, 1], [0.1, -math.inf], "-inf"),
    ],
)
def test_invalid_inputs(error: list[object], score: list[object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        risk_coverage_curve(np.array(error), np.array(score))


@pytest.mark.parametrize("rate", [-0.1, 1.0, True, "0.3"])
def test_invalid_rate(rate: object) -> None:
    with pytest.raises(ValueError, match="max_deferral_rate"):
        selective_error(np.array([0, 1]), np.array([0.0, 1.0]), rate)  # type: ignore[arg-type]

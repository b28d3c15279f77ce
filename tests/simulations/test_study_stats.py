"""Study statistics on hand-built runs (no simulation, no registry): per-seed values, t-intervals, pairing, JSON."""

from __future__ import annotations

import json
import math

import pytest

from simulations.study_config import Cell
from simulations.study_results import comparisons, gap_estimates, paired_rows, results_json
from simulations.study_stats import (
    FINAL_METRICS,
    Estimate,
    StudyRun,
    arm_label,
    by_arm,
    estimate,
    gap_values,
    paired_difference,
    seed_values,
    t_interval,
)

COHORTS = {"scr": "screening", "ref": "referral", "low": "low_resource"}
T_975_2 = 4.302653  # scipy.stats.t.ppf(0.975, 2)
T_975_1 = 12.706205  # scipy.stats.t.ppf(0.975, 1)


def run(cell: Cell, seed: int, sites: dict[str, dict[str, float]], run_id: int = 0) -> StudyRun:
    """A finished run whose final round (2) holds ``sites``; round 1 holds decoys that must be ignored."""
    c = Cell.from_dict({**cell.to_dict(), "seed": seed})
    rounds = {
        1: {f"site:{s}": {k: -99.0 for k in m} for s, m in sites.items()},
        2: {f"site:{s}": dict(m) for s, m in sites.items()},
    }
    return StudyRun(run_id or 100 + seed, "finished", c, dict(COHORTS), {"study": "t"}, rounds)


def auc(scr: float, ref: float, low: float) -> dict[str, dict[str, float]]:
    return {"scr": {"val_auc": scr}, "ref": {"val_auc": ref}, "low": {"val_auc": low}}


FEDAVG = Cell("fedavg", 1.0, 0.0)
FEDAVGM = Cell("fedavgm", 1.0, 0.9)


@pytest.mark.parametrize(
    ("values", "mean", "low", "high", "n"),
    [
        ([1.0, 2.0, 3.0], 2.0, 2.0 - T_975_2 / math.sqrt(3), 2.0 + T_975_2 / math.sqrt(3), 3),  # sd 1
        ([1.0, 2.0, 3.0, math.nan, None], 2.0, 2.0 - T_975_2 / math.sqrt(3), 2.0 + T_975_2 / math.sqrt(3), 3),
        ([0.5, 0.5], 0.5, 0.5, 0.5, 2),  # no spread: a zero-width interval
        ([0.0, 1.0], 0.5, 0.5 - T_975_1 * math.sqrt(0.5) / math.sqrt(2), 0.5 + T_975_1 * 0.5, 2),
    ],
)
def test_t_interval_by_hand(values, mean, low, high, n) -> None:
    est = t_interval(values)
    assert (est.mean, est.n, est.method) == (pytest.approx(mean), n, "Student t")
    assert est.low == pytest.approx(low, abs=1e-5) and est.high == pytest.approx(high, abs=1e-5)


def test_t_interval_of_one_two_three_is_the_documented_example() -> None:
    est = t_interval([1, 2, 3])
    assert (round(est.low, 4), round(est.high, 4)) == (-0.4841, 4.4841)
    assert est.fmt() == "2.000 [-0.484, 4.484] (n=3)" and not est.excludes_zero


def test_t_interval_with_one_or_no_replicate() -> None:
    one = t_interval([0.7])
    assert one.mean == 0.7 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    assert one.fmt() == "0.700 (n=1, no interval)" and not one.excludes_zero
    assert one.to_dict() == {"mean": 0.7, "low": None, "high": None, "n": 1}
    none = t_interval([math.nan])
    assert none.n == 0 and none.fmt() == "n/a" and none.to_dict() == {"mean": None, "low": None, "high": None, "n": 0}


def test_invalid_args() -> None:
    with pytest.raises(ValueError, match="confidence must be in \\(0, 1\\), got 1.5"):
        t_interval([1.0, 2.0], confidence=1.5)
    runs = [run(FEDAVG, 0, auc(0.5, 0.5, 0.5)), run(FEDAVGM, 0, auc(0.5, 0.5, 0.5), run_id=7)]
    with pytest.raises(ValueError, match="runs 100 and 7 both have seed 0"):
        seed_values(runs, "val_auc")  # two arms' runs passed as one arm


def test_estimate_keeps_its_method() -> None:
    assert estimate([0.1, 0.9], n_boot=50).method == "percentile bootstrap"
    assert Estimate(1.0, 0.5, 1.5, 3).method == "percentile bootstrap"


def test_seed_values_average_the_sites_first() -> None:
    runs = [
        run(FEDAVG, 0, auc(0.6, 0.9, 0.3)),
        run(FEDAVG, 1, {"scr": {"val_auc": 0.8}, "ref": {}, "low": {"val_auc": 0.4}}),  # ref has no AUC
        run(FEDAVG, 2, {"scr": {}, "ref": {}, "low": {}}),  # no value: seed absent
    ]
    assert seed_values(runs, "val_auc") == pytest.approx({0: 0.6, 1: 0.6})
    assert seed_values(runs, "val_auc", cohorts=["screening", "referral"]) == pytest.approx({0: 0.75, 1: 0.8})
    assert seed_values(runs, "val_auc", exclude=["low_resource"]) == pytest.approx({0: 0.75, 1: 0.8})
    # the interval is over 2 seeds, not 5 (seed, site) values
    assert t_interval(seed_values(runs, "val_auc").values()).n == 2
    assert gap_values(runs, "val_auc") == pytest.approx({0: 0.3 - 0.75, 1: 0.4 - 0.8})


def test_paired_difference_uses_the_shared_seeds_only() -> None:
    a = [run(FEDAVGM, s, auc(v, v, v)) for s, v in ((0, 0.9), (1, 0.7), (2, 0.8))]
    b = [run(FEDAVG, s, auc(v, v, v)) for s, v in ((1, 0.5), (2, 0.7), (3, 0.1))]
    d = paired_difference(a, b, "val_auc")
    # seeds 1, 2: differences 0.2 and 0.1 -> mean 0.15, sd √0.005, n 2
    half = T_975_1 * math.sqrt(0.005) / math.sqrt(2)
    assert (d.n, d.method) == (2, "paired Student t") and d.mean == pytest.approx(0.15)
    assert d.low == pytest.approx(0.15 - half, abs=1e-5) and d.high == pytest.approx(0.15 + half, abs=1e-5)
    # a constant per-seed difference excludes 0 even though the arms' own intervals overlap widely
    c = [run(FEDAVG, s, auc(v - 0.05, v - 0.05, v - 0.05)) for s, v in ((0, 0.9), (1, 0.7), (2, 0.8))]
    shift = paired_difference(a, c, "val_auc")
    assert shift.mean == pytest.approx(0.05) and shift.excludes_zero and shift.low > 0
    assert paired_difference(a, [], "val_auc").n == 0


def test_arm_label_names_site_dro() -> None:
    assert arm_label(Cell("fedavgm", 1.0, 0.9, site_dro_step=0.5)) == "FedAvgM (η=1, β=0.9), site DRO η=0.5"


def _study() -> dict[str, list[StudyRun]]:
    """FedAvg, FedAvgM, centralised, local, a DP arm, a site-DRO arm; 3 seeds each (centralised misses seed 2)."""
    cells = [
        FEDAVG,
        FEDAVGM,
        Cell("centralised"),
        Cell("local"),
        Cell("fedavgm", 1.0, 0.9, dp="client", epsilon=2.0),
        Cell("fedavgm", 1.0, 0.9, site_dro_step=0.5),
        Cell("fedavgm", 0.5, 0.0),  # a FedAvgM sweep arm: compared with FedAvg and centralised only
    ]
    runs = []
    for i, cell in enumerate(cells):
        for seed in (0, 1, 2):
            if cell.strategy == "centralised" and seed == 2:
                continue
            v = 0.5 + 0.05 * i + 0.01 * seed
            runs.append(run(cell, seed, auc(v, v, v - 0.1 * (cell.site_dro_step == 0)), run_id=10 * i + seed + 1))
    return by_arm(runs)


def test_comparisons_follow_the_issue() -> None:
    assert comparisons(_study()) == [
        ("fedavgm-lr1-m0.9", "fedavg"),
        ("fedavgm-lr0.5-m0", "fedavg"),
        ("fedavg", "centralised"),
        ("fedavgm-lr1-m0.9", "centralised"),
        ("fedavgm-lr0.5-m0", "centralised"),
        ("local", "centralised"),
        ("fedavgm-lr1-m0.9-client2", "fedavgm-lr1-m0.9"),  # DP cost
        ("fedavgm-lr1-m0.9-sitedro0.5", "fedavgm-lr1-m0.9"),  # the cross-site penalty against its reference
    ]
    arms = _study()
    del arms["centralised"]
    assert all(ref != "centralised" for _, ref in comparisons(arms))  # an absent arm: the comparison is skipped


def test_results_json_round_trips_with_null_for_unreported_metrics(tmp_path) -> None:
    arms = _study()
    paired = paired_rows(arms)
    gaps = gap_estimates(arms)
    doc = results_json("t", arms, paired, gaps)
    text = json.dumps(doc, allow_nan=False)  # no NaN left
    back = json.loads(text)
    assert back["study"] == "t" and back["schema"] == 1 and back["interval"] == "95% Student-t over seeds"
    fedavg = back["arms"]["fedavg"]
    assert fedavg["label"] == "FedAvg" and fedavg["seeds"] == [0, 1, 2]
    # val_auc of FedAvg: per seed (0.5, 0.51, 0.52) - 0.1/3 -> mean 0.51 - 0.1/3, sd 0.01
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert fedavg["metrics"]["val_auc"] == pytest.approx(
        {"mean": 0.51 - 0.1 / 3, "low": 0.51 - 0.1 / 3 - half, "high": 0.51 - 0.1 / 3 + half, "n": 3}, abs=1e-5
    )
    assert fedavg["metrics"]["val_ece"] == {"mean": None, "low": None, "high": None, "n": 0}  # no run reported it
    row = next(
        p for p in back["paired"] if (p["arm"], p["reference"], p["metric"]) == ("fedavg", "centralised", "val_auc")
    )
    # FedAvg (i=0) - centralised (i=2): -0.1 at seeds 0 and 1 (centralised has no seed 2), no spread
    assert row["n"] == 2 and row["mean"] == pytest.approx(-0.1) and row["high"] == pytest.approx(-0.1)
    assert row["excludes_zero"] is True
    assert set(row) == {"arm", "reference", "metric", "mean", "low", "high", "n", "excludes_zero"}
    assert len(back["paired"]) == 8 * len(FINAL_METRICS)  # every comparison x FINAL_METRICS
    dro = back["low_resource_gap"]["fedavgm-lr1-m0.9-sitedro0.5"]
    assert dro["reference"] == "fedavgm-lr1-m0.9" and dro["metrics"]["val_auc"]["mean"] == pytest.approx(0.0)
    # the site-DRO arm closes the reference's gap of -0.1 at every seed: +0.1
    assert dro["vs_reference"]["val_auc"]["mean"] == pytest.approx(0.1) and dro["vs_reference"]["val_auc"]["n"] == 3
    assert back["low_resource_gap"]["fedavg"]["reference"] is None

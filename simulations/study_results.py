"""The numbers of a study report: per-seed t-intervals per arm, paired comparisons, the low-resource gap.

:mod:`simulations.study_report` renders them (results.md, PNGs); :func:`results_json` is the same numbers
as a document. Pure functions of the registry's runs (:mod:`simulations.study_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from simulations.study_stats import (
    FINAL_METRICS,
    Estimate,
    StudyRun,
    arm_label,
    dg_reference,
    dp_reference,
    gap_values,
    is_dg,
    paired_difference,
    paired_t_interval,
    seed_values,
    t_interval,
)

__all__ = [
    "GAP_METRICS", "INTERVAL", "comparisons", "final_estimates", "gap_estimates", "paired_rows", "results_json"
]  # fmt: skip

#: What every interval of the main tables and of results.json is.
INTERVAL: Final = "95% Student-t over seeds"
#: (metric, label) of the low-resource gap.
GAP_METRICS: tuple[tuple[str, str], ...] = (
    ("val_auc", "AUC"),
    ("val_lung_rads_acc", "Lung-RADS acc"),
    ("val_sensitivity", "sens. ≥4A"),
    ("val_dice_found", "Dice (found)"),
    ("val_dice", "Dice"),
)


def final_estimates(runs: Sequence[StudyRun]) -> dict[str, Estimate]:
    """Per FINAL_METRICS metric: the t-interval over the arm's seeds of the site-averaged final value."""
    return {m: t_interval(seed_values(runs, m).values()) for m, _ in FINAL_METRICS}


def comparisons(arms: dict[str, list[StudyRun]]) -> list[tuple[str, str]]:
    """The ``(arm, reference)`` pairs of the paired comparisons whose two arms are both in ``arms``.

    In order: each FedAvgM arm (DP off, no cross-site penalty) − FedAvg; FedAvg − centralised; each such
    FedAvgM arm − centralised; local-only − centralised; each DP arm − the same arm with DP off; each DG,
    group-DRO or site-DRO arm − FedAvgM with the same server lr and momentum (DP off, no penalty); then,
    when the study scored its starting model, centralised, FedAvg, each such FedAvgM arm and local-only
    − the initial model (what the training itself changed).
    """
    cells = {arm: runs[0].cell for arm, runs in arms.items()}
    plain_fedavgm = [a for a, c in cells.items() if c.strategy == "fedavgm" and c.dp == "none" and not is_dg(c)]
    pairs = [(a, "fedavg") for a in plain_fedavgm]
    pairs += [("fedavg", "centralised"), *((a, "centralised") for a in plain_fedavgm), ("local", "centralised")]
    pairs += [(a, dp_reference(c)) for a, c in cells.items() if c.dp != "none" and not is_dg(c)]
    pairs += [(a, dg_reference(c)) for a, c in cells.items() if is_dg(c)]
    pairs += [(a, "initial") for a in ("centralised", "fedavg", *plain_fedavgm, "local")]
    return list(dict.fromkeys((a, b) for a, b in pairs if a in arms and b in arms and a != b))


def paired_rows(arms: dict[str, list[StudyRun]]) -> list[dict[str, Any]]:
    """One row per comparison (:func:`comparisons`) and FINAL_METRICS metric: arm, reference, metric, estimate."""
    return [
        {"arm": a, "reference": b, "metric": m, "estimate": paired_difference(arms[a], arms[b], m)}
        for a, b in comparisons(arms)
        for m, _ in FINAL_METRICS
    ]


def gap_estimates(arms: dict[str, list[StudyRun]]) -> dict[str, dict[str, Any]]:
    """Per arm: the low-resource gap per metric, and for a cross-site penalty arm its paired change.

    Returns:
        arm -> ``{"metrics": {metric: Estimate}, "reference": arm or None, "vs_reference": {metric: Estimate}}``;
        ``vs_reference`` is the t-interval of the per-seed gap differences (arm − :func:`dg_reference`).
    """
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in arms.items():
        c = runs[0].cell
        ref = dg_reference(c) if is_dg(c) and dg_reference(c) in arms else None
        out[arm] = {
            "metrics": {m: t_interval(gap_values(runs, m).values()) for m, _ in GAP_METRICS},
            "reference": ref,
            "vs_reference": {}
            if ref is None
            else {m: paired_t_interval(gap_values(runs, m), gap_values(arms[ref], m)) for m, _ in GAP_METRICS},
        }
    return out


def results_json(
    name: str, arms: dict[str, list[StudyRun]], paired: list[dict[str, Any]], gaps: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The ``results.json`` document (schema 1): per arm and metric the t-interval, the paired rows, the gaps.

    NaN is None (JSON null), so the document dumps with ``allow_nan=False``.
    """

    def paired_dict(est: Estimate) -> dict[str, Any]:
        return {**est.to_dict(), "excludes_zero": est.excludes_zero}

    return {
        "study": name,
        "schema": 1,
        "interval": INTERVAL,
        "arms": {
            arm: {
                "label": arm_label(runs[0].cell),
                "seeds": sorted(r.cell.seed for r in runs),
                "metrics": {m: est.to_dict() for m, est in final_estimates(runs).items()},
            }
            for arm, runs in arms.items()
        },
        "paired": [
            {"arm": r["arm"], "reference": r["reference"], "metric": r["metric"], **paired_dict(r["estimate"])}
            for r in paired
        ],
        "low_resource_gap": {
            arm: {
                "metrics": {m: est.to_dict() for m, est in g["metrics"].items()},
                "reference": g["reference"],
                "vs_reference": {m: paired_dict(est) for m, est in g["vs_reference"].items()},
            }
            for arm, g in gaps.items()
        },
    }

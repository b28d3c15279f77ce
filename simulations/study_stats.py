"""The numbers of a study report, read from the registry alone (no run directory, no checkpoint).

Every finished run whose config carries a ``"study"`` tag (see :mod:`simulations.study_run`) is one
replicate of its *arm* (the cell without its seed). Only whole-split scalar metrics leave a site, so
there are no per-study predictions to resample: intervals are percentile bootstraps over the arm's
replicates, one value per (seed, site) at the final round (or per seed, for the gaps), and say so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from lungvl_model.evaluation.classification_metrics import bootstrap_ci
from server.registry import Registry
from simulations.study_config import Cell

__all__ = [
    "FINAL_METRICS",
    "Estimate",
    "StudyRun",
    "estimate",
    "load_study",
    "site_values",
]

#: (metric name, label) of the final table.
FINAL_METRICS: Final = (
    ("val_auc", "malignancy AUC"),
    ("val_lung_rads_acc", "Lung-RADS accuracy"),
    ("val_dice", "Dice"),
    ("val_concept_f1", "concept F1"),
    ("val_ece", "ECE"),
    ("val_loss", "validation loss (lower is better)"),
)
_DONE: Final = ("finished", "stopped_budget")


@dataclass
class StudyRun:
    """One finished run of a study, as the registry holds it.

    Attributes:
        run_id: registry run id.
        status: ``finished`` or ``stopped_budget``.
        cell: its grid cell.
        cohorts: site name -> cohort kind (screening, referral, low_resource, ...).
        tag: the whole study tag of the run config.
        rounds: round -> scope -> metric name -> value.
        privacy: the run's privacy-ledger rows.
    """

    run_id: int
    status: str
    cell: Cell
    cohorts: dict[str, str]
    tag: dict[str, Any]
    rounds: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    privacy: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_round(self) -> int:
        """The last round with any metric (0 when none)."""
        return max((r for r in self.rounds if r > 0), default=0)

    def final(self, scope: str) -> dict[str, float]:
        """Metrics of ``scope`` (``"global"`` or ``"site:<name>"``) at the final round."""
        return self.rounds.get(self.final_round, {}).get(scope, {})

    @property
    def epsilon(self) -> float | None:
        """ε spent: the client-level ε of the last round, else the largest patient-level ε of a site."""
        client = [p["epsilon"] for p in self.privacy if p["level"] == "client"]
        if client:
            return float(client[-1])
        last: dict[str, float] = {}
        for p in self.privacy:
            if p["level"] == "sample":
                last[p["site_name"]] = float(p["epsilon"])
        return max(last.values()) if last else None


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % percentile-bootstrap interval over ``n`` replicates (NaN when ``n = 0``)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float = math.nan

    def fmt(self, digits: int = 3) -> str:
        """``0.712 [0.650, 0.780] (n=6)``, or ``n/a`` without replicates."""
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"


def estimate(values: Iterable[float], *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of the finite ``values`` and its 95 % percentile-bootstrap interval.

    The interval comes from :func:`lungvl_model.evaluation.classification_metrics.bootstrap_ci` of the
    mean; it is widened to include the mean should the percentiles of a tiny sample miss it.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    point, low, high = bootstrap_ci(np.mean, v, n_boot=n_boot, seed=seed)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return Estimate(point, min(low, point), max(high, point), int(v.size), sd)


def load_study(registry: Registry, study: str | None = None) -> tuple[str, list[StudyRun]]:
    """The finished runs of one study in ``registry`` (the latest run per cell).

    Args:
        registry: the study's registry.
        study: study name; None picks the only study the registry holds.

    Returns:
        ``(study name, runs ordered by cell)``.

    Raises:
        ValueError: no study, or several and ``study`` is None (the message lists them).
    """
    tagged = [(r, r["config"].get("study")) for r in registry.runs() if isinstance(r.get("config"), dict)]
    names = sorted({t["study"] for _, t in tagged if t})
    if study is None:
        if len(names) != 1:
            raise ValueError(f"registry {registry.url} holds studies {names}; name the one to report")
        study = names[0]
    elif study not in names:
        raise ValueError(f"registry {registry.url} has no study {study!r}; it holds {names}")
    latest: dict[str, dict[str, Any]] = {}
    for run, tag in tagged:
        if tag and tag["study"] == study and run["status"] in _DONE:
            latest[tag["cell"]["cell_id"]] = run  # runs() is oldest first: the last one wins
    out: list[StudyRun] = []
    for run in latest.values():
        tag = run["config"]["study"]
        sr = StudyRun(run["id"], run["status"], Cell.from_dict(tag["cell"]), dict(tag.get("sites", {})), dict(tag))
        scenario_run = (run["config"].get("scenario") or {}).get("run") or {}
        if "holdout_fraction" not in sr.tag and "holdout_fraction" in scenario_run:  # studies tagged before it
            sr.tag["holdout_fraction"] = scenario_run["holdout_fraction"]
        for m in registry.metrics(run["id"]):
            sr.rounds.setdefault(m["round"], {}).setdefault(m["scope"], {})[m["name"]] = float(m["value"])
        sr.privacy = registry.privacy(run["id"])
        out.append(sr)
    out.sort(key=lambda r: (r.cell.arm, r.cell.seed))
    return study, out


def by_arm(runs: Sequence[StudyRun]) -> dict[str, list[StudyRun]]:
    """Runs grouped by arm, arms in first-seen order."""
    out: dict[str, list[StudyRun]] = {}
    for r in runs:
        out.setdefault(r.cell.arm, []).append(r)
    return out


def site_values(
    runs: Iterable[StudyRun], metric: str, *, cohorts: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[float]:
    """The final-round values of ``metric`` at every (run, site) replicate.

    Args:
        runs: the runs (usually one arm's seeds).
        metric: metric name, e.g. ``"val_auc"``.
        cohorts: keep only sites of these cohort kinds.
        exclude: leave out sites of these cohort kinds.

    Returns:
        One value per (run, site) that has the metric.
    """
    out = []
    for r in runs:
        for site, cohort in sorted(r.cohorts.items()):
            if (cohorts is not None and cohort not in cohorts) or cohort in exclude:
                continue
            v = r.final(f"site:{site}").get(metric)
            if v is not None:
                out.append(v)
    return out


def gap_values(runs: Iterable[StudyRun], metric: str, group: str = "low_resource") -> list[float]:
    """Per run: mean of ``metric`` at the ``group`` sites minus its mean at the other sites (final round)."""
    out = []
    for r in runs:
        inside = site_values([r], metric, cohorts=[group])
        rest = site_values([r], metric, exclude=[group])
        if inside and rest:
            out.append(float(np.mean(inside) - np.mean(rest)))
    return out


def curves(runs: Sequence[StudyRun], metric: str) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and sd over the runs of the ``global`` ``metric`` (rounds where any run has it)."""
    rounds = sorted({r for run in runs for r, s in run.rounds.items() if metric in s.get("global", {})})
    means, sds = [], []
    for rnd in rounds:
        vals = [
            run.rounds[rnd]["global"][metric] for run in runs if metric in run.rounds.get(rnd, {}).get("global", {})
        ]
        means.append(float(np.mean(vals)))
        sds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
    return rounds, means, sds


def cohort_kinds(runs: Iterable[StudyRun]) -> list[str]:
    """The cohort kinds of the study's sites, sorted."""
    return sorted({c for r in runs for c in r.cohorts.values()})


def mean_or_nan(values: Sequence[float]) -> float:
    """Mean of ``values`` (NaN when empty)."""
    return float(np.mean(values)) if len(values) else math.nan


def arm_label(cell: Cell) -> str:
    """A readable name of an arm, e.g. ``FedAvgM (η=1, β=0.9), client DP ε=2``."""
    name = {"local": "local-only", "fedavg": "FedAvg", "centralised": "centralised"}.get(cell.strategy, "")
    if cell.strategy == "fedavgm":
        name = f"FedAvgM (η={cell.server_lr:g}, β={cell.server_momentum:g})"
    if cell.dp != "none":
        name += f", {cell.dp}-level DP ε={cell.epsilon:g}"
    if cell.dg_penalty:
        name += f", DG variance λ={cell.dg_penalty:g}"
    if cell.dro_step:
        name += f", group-DRO η={cell.dro_step:g}"
    return name


def privacy_rows(arms: Mapping[str, list[StudyRun]], metric: str, n_boot: int) -> list[dict[str, Any]]:
    """One row per DP arm and its DP-off reference: strategy, kind, ε target, ε spent, metric estimate."""
    rows = []
    for arm, runs in arms.items():
        c = runs[0].cell
        if c.dg_penalty or c.dro_step or c.strategy == "centralised":
            continue
        spent = [r.epsilon for r in runs if r.epsilon is not None]
        rows.append(
            {
                "arm": arm,
                "strategy": c.strategy
                if c.strategy != "fedavgm"
                else f"fedavgm-lr{c.server_lr:g}-m{c.server_momentum:g}",
                "dp": c.dp,
                "epsilon": c.epsilon,
                "spent": max(spent) if spent else None,
                "estimate": estimate(site_values(runs, metric), n_boot=n_boot),
            }
        )
    return rows

"""The numbers of a study report, read from the registry alone (no run directory, no checkpoint).

Every finished run whose config carries a ``"study"`` tag (see :mod:`simulations.study_run`) is one
replicate of its *arm* (the cell without its seed). Only whole-split scalar metrics leave a site, so
there are no per-study predictions to resample. The sites of one run share its model, so they are not
independent replicates: a run's site values are averaged first (:func:`seed_values`), and the interval is a
Student-t interval over seeds (:func:`t_interval`). Arms that share a seed share the initial model and the
data order, so two arms are compared by their per-seed differences (:func:`paired_difference`).
:func:`estimate` (a percentile bootstrap over whatever values it is given) remains for descriptive tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from scipy import stats

from lungvl_model.evaluation.classification_metrics import bootstrap_ci
from server.registry import Registry
from simulations.study_config import Cell

__all__ = [
    "FINAL_METRICS",
    "Estimate",
    "StudyRun",
    "dg_reference",
    "dp_reference",
    "estimate",
    "is_dg",
    "load_study",
    "paired_difference",
    "paired_t_interval",
    "seed_values",
    "site_values",
    "t_interval",
]

#: (metric name, label) of the final table.
FINAL_METRICS: Final = (
    ("val_auc", "malignancy AUC"),
    ("val_lung_rads_acc", "Lung-RADS accuracy"),
    ("val_nodule_sensitivity", "nodule sensitivity"),
    ("val_dice_found", "Dice on found nodules"),
    ("val_dice", "whole-volume Dice"),
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
        curriculum: the run's curriculum phases as its server config holds them (``stage``, ``rounds``,
            ``local_steps``, ``batch_size``, ``seg_patch``...); empty for a run without one.
    """

    run_id: int
    status: str
    cell: Cell
    cohorts: dict[str, str]
    tag: dict[str, Any]
    rounds: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    privacy: list[dict[str, Any]] = field(default_factory=list)
    curriculum: list[dict[str, Any]] = field(default_factory=list)

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


_BOOTSTRAP: Final = "percentile bootstrap"
_T: Final = "Student t"


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval over ``n`` replicates (mean and bounds NaN when ``n = 0``).

    Attributes:
        mean: mean of the replicates.
        low: lower bound of the interval (NaN when it cannot be computed, e.g. one replicate of a t-interval).
        high: upper bound.
        n: number of replicates.
        sd: standard deviation of the replicates (ddof 1).
        method: how the interval was made (``"percentile bootstrap"``, ``"Student t"``).
    """

    mean: float
    low: float
    high: float
    n: int
    sd: float = math.nan
    method: str = _BOOTSTRAP

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (False when it has no bounds)."""
        return (self.low > 0 or self.high < 0) and math.isfinite(self.low) and math.isfinite(self.high)

    def fmt(self, digits: int = 3) -> str:
        """``0.712 [0.650, 0.780] (n=6)``; ``0.712 (n=1, no interval)``; ``n/a`` without replicates."""
        if self.n == 0:
            return "n/a"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.mean:.{digits}f} (n={self.n}, no interval)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"

    def to_dict(self) -> dict[str, float | int | None]:
        """``{"mean", "low", "high", "n"}`` with NaN as None (JSON null)."""
        bounds = {"mean": self.mean, "low": self.low, "high": self.high}
        return {**{k: None if math.isnan(v) else v for k, v in bounds.items()}, "n": self.n}


def _finite(values: Iterable[float | None]) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)


def estimate(values: Iterable[float], *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of the finite ``values`` and its 95 % percentile-bootstrap interval.

    The interval comes from :func:`lungvl_model.evaluation.classification_metrics.bootstrap_ci` of the
    mean; it is widened to include the mean should the percentiles of a tiny sample miss it.
    """
    v = _finite(values)
    if v.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    point, low, high = bootstrap_ci(np.mean, v, n_boot=n_boot, seed=seed)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return Estimate(point, min(low, point), max(high, point), int(v.size), sd)


def t_interval(values: Iterable[float], confidence: float = 0.95) -> Estimate:
    """Mean of the finite ``values`` and its Student-t interval, ``mean ± t(1 - α/2, n - 1) · sd / √n``.

    With one replicate there is no spread to estimate: the mean is given with NaN bounds (shown as "no
    interval"), not a zero-width interval that would read as certainty. Without replicates every field is NaN.

    Args:
        values: the replicates (one per seed); None, NaN and infinities are dropped.
        confidence: two-sided level in ``(0, 1)``.

    Returns:
        The estimate, ``method="Student t"``.

    Raises:
        ValueError: ``confidence`` outside ``(0, 1)``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    v = _finite(values)
    if v.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, method=_T)
    mean = float(v.mean())
    if v.size == 1:
        return Estimate(mean, math.nan, math.nan, 1, method=_T)
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1)) * sd / math.sqrt(v.size)
    return Estimate(mean, mean - half, mean + half, int(v.size), sd, _T)


def paired_t_interval(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Estimate:
    """Mean of the per-seed differences ``a[s] - b[s]`` over the seeds both hold, with its t-interval.

    Args:
        a: seed -> value of one arm.
        b: seed -> value of the reference arm.
        confidence: two-sided level in ``(0, 1)``.

    Returns:
        :func:`t_interval` of the differences (``method="paired Student t"``); ``n`` is the number of shared
        seeds.
    """
    est = t_interval([a[s] - b[s] for s in sorted(a.keys() & b.keys())], confidence)
    return dataclasses.replace(est, method="paired Student t")


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
        server = run["config"].get("server")
        phases = server.get("curriculum") if isinstance(server, dict) else None
        sr.curriculum = [dict(p) for p in phases or () if isinstance(p, dict)]
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


def _by_seed(runs: Iterable[StudyRun]) -> list[StudyRun]:
    seen: dict[int, int] = {}
    out = list(runs)
    for r in out:
        if r.cell.seed in seen:
            raise ValueError(
                f"runs {seen[r.cell.seed]} and {r.run_id} both have seed {r.cell.seed}: pass the runs of one arm"
            )
        seen[r.cell.seed] = r.run_id
    return out


def seed_values(
    runs: Iterable[StudyRun], metric: str, *, cohorts: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[int, float]:
    """Per run (one arm's seeds): the mean over its sites of the final-round ``metric``.

    Args:
        runs: the runs of one arm, one per seed.
        metric: metric name, e.g. ``"val_auc"``.
        cohorts: keep only sites of these cohort kinds.
        exclude: leave out sites of these cohort kinds.

    Returns:
        seed -> mean over the run's (kept) sites; a seed none of whose sites has the metric is absent.

    Raises:
        ValueError: two runs with the same seed (the runs of several arms).
    """
    out = {}
    for r in _by_seed(runs):
        vals = site_values([r], metric, cohorts=cohorts, exclude=exclude)
        if vals:
            out[r.cell.seed] = float(np.mean(vals))
    return out


def paired_difference(
    a_runs: Iterable[StudyRun],
    b_runs: Iterable[StudyRun],
    metric: str,
    *,
    cohorts: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    confidence: float = 0.95,
) -> Estimate:
    """Arm a minus arm b on ``metric``: the t-interval of the per-seed differences over their shared seeds.

    Args:
        a_runs: the runs of arm a, one per seed.
        b_runs: the runs of the reference arm b.
        metric: metric name.
        cohorts: keep only sites of these cohort kinds (both arms).
        exclude: leave out sites of these cohort kinds (both arms).
        confidence: two-sided level in ``(0, 1)``.

    Returns:
        The mean difference and its interval; ``n`` = seeds where both arms have the metric.
    """
    a = seed_values(a_runs, metric, cohorts=cohorts, exclude=exclude)
    b = seed_values(b_runs, metric, cohorts=cohorts, exclude=exclude)
    return paired_t_interval(a, b, confidence)


def gap_values(runs: Iterable[StudyRun], metric: str, group: str = "low_resource") -> dict[int, float]:
    """Per seed: mean of ``metric`` at the ``group`` sites minus its mean at the other sites (final round).

    Raises:
        ValueError: two runs with the same seed.
    """
    out = {}
    for r in _by_seed(runs):
        inside = site_values([r], metric, cohorts=[group])
        rest = site_values([r], metric, exclude=[group])
        if inside and rest:
            out[r.cell.seed] = float(np.mean(inside) - np.mean(rest))
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


def arm_label(cell: Cell) -> str:
    """A readable name of an arm, e.g. ``FedAvgM (η=1, β=0.9), client DP ε=2``."""
    names = {"initial": "initial model (no training)", "local": "local-only", "fedavg": "FedAvg"}
    name = {**names, "centralised": "centralised"}.get(cell.strategy, "")
    if cell.strategy == "fedavgm":
        name = f"FedAvgM (η={cell.server_lr:g}, β={cell.server_momentum:g})"
    if cell.dp != "none":
        name += f", {cell.dp}-level DP ε={cell.epsilon:g}"
    if cell.dg_penalty:
        name += f", DG variance λ={cell.dg_penalty:g}"
    if cell.dro_step:
        name += f", group-DRO η={cell.dro_step:g}"
    if cell.site_dro_step:
        name += f", site DRO η={cell.site_dro_step:g}"
    return name


def dp_reference(cell: Cell) -> str:
    """The arm of ``cell`` with DP off (what a DP arm's cost is measured against)."""
    return dataclasses.replace(cell, dp="none", epsilon=0.0).arm


def dg_reference(cell: Cell) -> str:
    """The FedAvgM arm with the same server lr and momentum, DP off, and no DG, group-DRO or site-DRO step."""
    return dataclasses.replace(cell, dp="none", epsilon=0.0, dg_penalty=0.0, dro_step=0.0, site_dro_step=0.0).arm


def is_dg(cell: Cell) -> bool:
    """Whether ``cell`` is a cross-site penalty row (DG variance penalty, group DRO or site DRO)."""
    return bool(cell.dg_penalty or cell.dro_step or cell.site_dro_step)


def privacy_rows(arms: Mapping[str, list[StudyRun]], metric: str) -> list[dict[str, Any]]:
    """One row per DP arm and DP-off arm: strategy, kind, ε target, ε spent, estimate, paired Δ vs DP off.

    ``estimate`` is the t-interval over seeds; ``delta`` the paired difference against :func:`dp_reference`
    (None for DP-off rows or when the reference arm is absent).
    """
    rows = []
    for arm, runs in arms.items():
        c = runs[0].cell
        if is_dg(c) or c.strategy == "centralised":
            continue
        ref = arms.get(dp_reference(c)) if c.dp != "none" else None
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
                "estimate": t_interval(seed_values(runs, metric).values()),
                "delta": None if ref is None else paired_difference(runs, ref, metric),
            }
        )
    return rows

"""``lungvl study report``: results.md, results.json and PNGs of a study, built from its registry alone.

The replicate is the seed: a run's site values are averaged first, and intervals are 95 % Student-t
intervals over seeds; arms are compared by their per-seed differences (they share seeds: the same initial
model and data order). Sections of ``results.md``: final metrics per arm, paired comparisons (FedAvgM,
FedAvg, centralised, local-only; the cost of DP; the cross-site penalties), convergence curves (mean ± sd
over seeds, ``convergence.png``), privacy–utility (``privacy_utility.png``), per site kind and
slice-thickness subgroup (descriptive bootstrap), the low-resource gap with and without the cross-site
penalty, and the local-only models on the other sites. ``results.json`` holds the final metrics, the paired
comparisons and the gaps as numbers (NaN as null).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats

from lungvl_model.atomic_file import write_json_atomic, write_text_atomic
from server.registry import Registry
from server.run_outputs import legend_or_note, pyplot, save_figure
from simulations.study_results import (
    GAP_METRICS,
    final_estimates,
    gap_estimates,
    paired_rows,
    results_json,
)
from simulations.study_stats import (
    FINAL_METRICS,
    Estimate,
    StudyRun,
    arm_label,
    by_arm,
    cohort_kinds,
    curves,
    estimate,
    load_study,
    privacy_rows,
    site_values,
)

__all__ = ["CURVE_METRICS", "write_report"]

CURVE_METRICS = (
    ("val_loss", "validation loss"), ("val_auc", "malignancy AUC"), ("val_lung_rads_acc", "Lung-RADS acc"),
    ("val_dice_found", "Dice on found nodules"),
)  # fmt: skip
_SLICES = ("thin", "medium", "thick")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def plot_convergence(arms: dict[str, list[StudyRun]], path: Path, title: str) -> None:
    """Global metrics per round, mean ± sd over seeds, one line per DP-off arm."""
    fig, axes = pyplot().subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 4))
    for ax, (metric, label) in zip(axes, CURVE_METRICS, strict=True):
        for runs in arms.values():
            if runs[0].cell.dp != "none":
                continue
            rounds, mean, sd = curves(runs, metric)
            if runs[0].cell.strategy == "initial":  # one scoring, no rounds: a reference line
                if mean:
                    ax.axhline(mean[0], color="0.3", linestyle=":", label=f"{arm_label(runs[0].cell)}")
                continue
            if not rounds:
                continue
            line = ax.plot(rounds, mean, marker="o", label=f"{arm_label(runs[0].cell)} (n={len(runs)})")[0]
            low = [m - s for m, s in zip(mean, sd, strict=True)]
            high = [m + s for m, s in zip(mean, sd, strict=True)]
            ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("round")
        ax.set_title(label)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    last = max((rnd for runs in arms.values() for r in runs for rnd in r.rounds), default=1)
    for ax in axes:  # curriculum phases: a dashed line where each stage begins, its name at the top
        ax.set_xlim(0.5, last + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        for i, (rnd, stage) in enumerate(_phase_starts(arms)):
            if i:
                ax.axvline(rnd - 0.5, color="0.6", linestyle="--", linewidth=0.8)
            x = rnd - 0.45 if i else rnd
            ax.text(x, 0.98, stage, transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="0.4")
    fig.suptitle(f"{title}: global validation metrics (mean ± sd over seeds)")
    save_figure(fig, path, rect=(0, 0.12, 1, 1))


def _phase_starts(arms: dict[str, list[StudyRun]]) -> list[tuple[int, str]]:
    """``(first round, stage)`` per curriculum phase; empty without a curriculum."""
    phases = next((r.curriculum for runs in arms.values() for r in runs if r.curriculum), [])
    starts, rnd = [], 1
    for p in phases:
        starts.append((rnd, str(p.get("stage", "?"))))
        rnd += int(p.get("rounds", 0))
    return starts


def schedule_text(runs: Sequence[StudyRun]) -> str:
    """The training schedule in words, e.g. ``4 rounds: seg 2 × 8 local steps (batch 4, 32³ patches), vl 2 × 4``."""
    first = next((r for r in runs if r.cell.strategy != "initial"), runs[0])
    rounds = first.tag.get("rounds")
    if not first.curriculum:
        return f"{rounds} rounds of {first.tag.get('local_steps')} local steps"
    parts = []
    for p in first.curriculum:
        patch = int(p.get("seg_patch") or 0)
        extra = f", {patch}³ patches" if p.get("stage") == "seg" and patch else ""
        steps = f"{p.get('rounds')} × {p.get('local_steps')} local steps"
        parts.append(f"{p.get('stage')} {steps} (batch {p.get('batch_size')}{extra})")
    return f"{rounds} rounds, a curriculum: " + ", ".join(parts)


def plot_privacy_utility(rows: list[dict[str, Any]], path: Path, title: str, metric: str) -> None:
    """Final ``metric`` against the ε target per strategy and DP kind; DP-off references as dashed lines."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for strategy in sorted({r["strategy"] for r in rows}):
        ref = [r for r in rows if r["strategy"] == strategy and r["dp"] == "none" and r["estimate"].n]
        for kind, marker in (("sample", "o"), ("client", "s")):
            pts = sorted((r["epsilon"], r["estimate"]) for r in rows if r["strategy"] == strategy and r["dp"] == kind)
            pts = [(e, est) for e, est in pts if est.n]
            if not pts:
                continue
            line = ax.errorbar(
                [e for e, _ in pts], [est.mean for _, est in pts],
                yerr=[[est.mean - est.low for _, est in pts], [est.high - est.mean for _, est in pts]],
                marker=marker, capsize=3, label=f"{strategy}, {kind}-level DP",
            )  # fmt: skip
            if ref:
                ax.axhline(ref[0]["estimate"].mean, ls="--", lw=1, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("ε target (δ fixed; dashed: same strategy without DP)")
    ax.set_ylabel(metric)
    legend_or_note(ax, "no DP cells with this metric", fontsize=7)
    ax.set_title(f"{title}: privacy–utility (95 % t-intervals over seeds)")
    save_figure(fig, path)


def _final_section(arms: dict[str, list[StudyRun]]) -> list[str]:
    rows = []
    for runs in arms.values():
        ests = final_estimates(runs)
        rows.append([arm_label(runs[0].cell), str(len(runs)), *(ests[m].fmt() for m, _ in FINAL_METRICS)])
    return [
        "## Final metrics",
        "",
        "Final round, every site's evaluation of the arm's model, averaged over the sites of each run; mean and "
        "95 % Student-t interval over the seeds (n = seeds where some site defines the metric: an AUC needs both "
        "classes at a site). Local-only: each site's own model on its own studies.",
        "",
        *_table(["arm", "seeds", *(label for _, label in FINAL_METRICS)], rows),
        "",
    ]


def _verdict(est: Estimate) -> str:
    if est.n < 2:
        return "fewer than 2 shared seeds with the metric"
    if est.excludes_zero:
        return "yes (higher)" if est.low > 0 else "yes (lower)"
    return "no difference detected"


def _paired_section(arms: dict[str, list[StudyRun]], rows: list[dict[str, Any]]) -> list[str]:
    labels = dict(FINAL_METRICS)
    body = [
        [
            arm_label(arms[r["arm"]][0].cell), arm_label(arms[r["reference"]][0].cell), labels[r["metric"]],
            r["estimate"].fmt(), _verdict(r["estimate"]),
        ]
        for r in rows
    ]  # fmt: skip
    return [
        "## Paired comparisons",
        "",
        "Arm − reference on the seeds both ran (same seed: same initial model and data order): per seed, the "
        "difference of the site-averaged final metrics; mean and 95 % Student-t interval of those differences "
        '(n = shared seeds). "≠ 0": the interval excludes 0 (higher/lower: the arm\'s value is above/below the '
        "reference's; for ECE and loss lower is better); otherwise no difference was detected, which with a few "
        "seeds is not evidence of equivalence.",
        "",
        *(
            _table(["arm", "reference", "metric", "difference", "≠ 0"], body)
            if body
            else ["No pair of arms to compare."]
        ),
        "",
    ]


def _privacy_section(rows: list[dict[str, Any]], metric: str) -> list[str]:
    body, notes = [], []
    for r in rows:
        if r["dp"] == "none" and not any(x["strategy"] == r["strategy"] and x["dp"] != "none" for x in rows):
            continue
        delta: Estimate | None = r["delta"]
        spent = "" if r["spent"] is None else f"{r['spent']:.3g}"
        target = "off" if r["dp"] == "none" else f"{r['epsilon']:g}"
        body.append([r["strategy"], r["dp"], target, spent, r["estimate"].fmt(), "" if delta is None else delta.fmt()])
        if delta is not None and delta.excludes_zero and delta.mean < 0:
            notes.append(
                f"- {r['strategy']} with {r['dp']}-level DP at ε = {r['epsilon']:g} loses {-delta.mean:.3f} {metric} "
                f"(paired 95 % interval of the difference [{delta.low:.3f}, {delta.high:.3f}], n={delta.n} seeds)."
            )
    return [
        "## Privacy–utility",
        "",
        f"Final {metric} per DP setting (ε spent: client-level ε of the last round, or the largest site's "
        "patient-level ε); 95 % t-interval over seeds, and Δ: the paired difference against the same strategy "
        "without DP (per-seed differences, t-interval). With a handful of sites, client-level noise (std σ·C over "
        "the expected number of sites) swamps the mean update at small ε: expect client-level DP at ε = 2 to cost "
        "most of the utility, which is the finding, not a bug. Every metric's DP cost is in the paired comparisons.",
        "",
        *_table(["strategy", "DP", "ε target", "ε spent", metric, "Δ vs no DP (paired)"], body),
        "",
        *(notes or ["- No DP setting has a paired interval wholly below its reference (or too few seeds to tell)."]),
        "",
        "![privacy-utility](privacy_utility.png)",
        "",
    ]


def _subgroup_section(arms: dict[str, list[StudyRun]], kinds: list[str], n_boot: int) -> list[str]:
    rows = []
    for runs in arms.values():
        cells = [arm_label(runs[0].cell)]
        for kind in kinds:
            cells.append(estimate(site_values(runs, "val_sensitivity", cohorts=[kind]), n_boot=n_boot).fmt(2))
            cells.append(estimate(site_values(runs, "val_auc", cohorts=[kind]), n_boot=n_boot).fmt(2))
        cells += [estimate(site_values(runs, f"val_auc_{g}"), n_boot=n_boot).fmt(2) for g in _SLICES]
        rows.append(cells)
    header = ["arm"]
    for kind in kinds:
        header += [f"{kind}: sens. LR≥4A", f"{kind}: AUC"]
    header += [f"AUC {g} slices" for g in _SLICES]
    return [
        "## Per site kind and subgroup",
        "",
        "Sensitivity for Lung-RADS ≥ 4A (true ≥ 4A called ≥ 4A) and malignancy AUC by site kind; malignancy AUC "
        "within slice-thickness groups (thin < 2 mm, medium 2–4 mm, thick ≥ 4 mm), computed inside each site. "
        "Descriptive only: percentile bootstrap over the (seed, site) values, which treats the sites of a run as "
        "independent (they are not); compare arms with the seed-level tables above.",
        "",
        *_table(header, rows),
        "",
    ]


def _gap_section(arms: dict[str, list[StudyRun]], gaps: dict[str, dict[str, Any]]) -> list[str]:
    rows = [[arm_label(arms[a][0].cell), *(g["metrics"][m].fmt() for m, _ in GAP_METRICS)] for a, g in gaps.items()]
    paired = [
        [arm_label(arms[a][0].cell), arm_label(arms[g["reference"]][0].cell), label, est.fmt(), _verdict(est)]
        for a, g in gaps.items()
        if g["reference"] is not None
        for m, label in GAP_METRICS
        for est in (g["vs_reference"][m],)
    ]
    lines = [
        "## Low-resource gap",
        "",
        "Per seed: the metric at the low-resource site(s) minus its mean at the other sites (negative: the "
        "low-resource site is worse); mean and 95 % Student-t interval over seeds.",
        "",
        *_table(["arm", *(label for _, label in GAP_METRICS)], rows),
        "",
    ]
    if paired:
        lines += [
            "### With and without the cross-site penalty",
            "",
            "Each DG / group-DRO / site-DRO arm against FedAvgM with the same server lr and momentum and no "
            "penalty: per-seed difference of the gaps (positive: the penalty narrows a negative gap), mean and "
            "paired 95 % Student-t interval over the shared seeds.",
            "",
            *_table(["arm", "reference", "metric", "gap difference", "≠ 0"], paired),
            "",
        ]
    return lines


def _local_section(arms: dict[str, list[StudyRun]], n_boot: int) -> list[str]:
    local = [runs for runs in arms.values() if runs[0].cell.strategy == "local"]
    if not local:
        return []
    rows = []
    for runs in local:
        for m, label in (("val_auc", "AUC"), ("val_lung_rads_acc", "Lung-RADS acc"), ("val_dice", "Dice")):
            own = estimate(site_values(runs, m), n_boot=n_boot)
            other = estimate(site_values(runs, f"x{m}"), n_boot=n_boot)
            rows.append([arm_label(runs[0].cell), label, own.fmt(), other.fmt()])
    return [
        "## Local-only models away from home",
        "",
        "Each site's own model on its own studies and on the other sites' studies (example-weighted).",
        "",
        *_table(["arm", "metric", "own site", "other sites"], rows),
        "",
    ]


def _few_seeds_note(arms: dict[str, list[StudyRun]]) -> str:
    k = max(len(runs) for runs in arms.values())
    if k < 2:
        return "With one seed per arm there is no interval (n=1). "
    t = float(stats.t.ppf(0.975, k - 1))
    return (
        f"With {k} seeds the half-width is t(0.975, {k - 1}) = {t:.2f} standard errors: intervals are wide, and "
        '"no difference detected" is not equivalence. '
    )


def _init_note(runs: Sequence[StudyRun]) -> str:
    """Where the arms started from, when the study named one model package for all of them."""
    inits = {str(r.tag.get("init_model")) for r in runs if r.tag.get("init_model")}
    if len(inits) != 1 or any(f"init{os.sep}seed_" in p for p in inits):
        return ""
    return f" Every arm starts from the same model package, `{Path(next(iter(inits))).name}`."


def _evaluation_note(runs: Sequence[StudyRun]) -> str:
    """What the sites' evaluation metrics were computed on."""
    frac = max(float(r.tag.get("holdout_fraction") or 0.0) for r in runs)
    if frac > 0:
        return (
            f"Each site scores the models on its hold-out patients (about {frac:.0%} of them, chosen by a hash of "
            "the patient ID, never trained on by any arm; centralised pools only the training patients)."
        )
    return (
        "Evaluation uses each site's own training studies (no hold-out split), which flatters every arm and "
        "local-only the most; compare arms, not absolute values."
    )


def write_report(
    run_dir: str | Path, *, study: str | None = None, n_boot: int | None = None, db_url: str | None = None
) -> Path:
    """Write ``results.md``, ``results.json``, ``convergence.png`` and ``privacy_utility.png`` into ``run_dir``.

    Args:
        run_dir: the study directory (its registry is the only input).
        study: the study name (None: the only one in the registry).
        n_boot: bootstrap resamples of the descriptive subgroup and local-only tables (default: the study's
            ``bootstrap`` setting from the run tags, else 2000); the main tables use t-intervals over seeds.
        db_url: the registry the study ran with (``lungvl study run --db``); default ``run_dir/registry.db``.
            Opened read-only.

    Returns:
        The path of ``results.md``.

    Raises:
        FileNotFoundError: no ``registry.db`` in ``run_dir`` (and no ``db_url``).
        ValueError: no finished run of a study in the registry.
    """
    out = Path(run_dir).expanduser().resolve()
    if db_url is None and not (out / "registry.db").exists():
        raise FileNotFoundError(f"no registry.db in {out} (run `lungvl study run` first, or give --db URL)")
    with Registry(db_url or out / "registry.db", read_only=True) as reg:
        name, runs = load_study(reg, study)
        where = reg.url
    source = "registry.db" if db_url is None else where
    if not runs:
        raise ValueError(f"study {name!r} has no finished run in {where}")
    boot = n_boot or int(runs[0].tag.get("bootstrap", 2000))
    arms = by_arm(runs)
    kinds = cohort_kinds(runs)
    primary = "val_auc"
    prows = privacy_rows(arms, primary)
    paired = paired_rows(arms)
    gaps = gap_estimates(arms)
    plot_convergence(arms, out / "convergence.png", name)
    plot_privacy_utility(prows, out / "privacy_utility.png", name, primary)
    first = runs[0]
    sites = ", ".join(f"{s} ({c})" for s, c in sorted(first.cohorts.items()))
    lines = [
        f"# Study {name}",
        "",
        f"{len(runs)} finished runs in {len(arms)} arms, read from `{source}` only; {schedule_text(runs)}; "
        f"sites: {sites}.{_init_note(runs)}",
        "",
        "How to read the intervals: only whole-split scalar metrics leave a site (no per-study prediction reaches "
        "the registry), and the sites of one run share its model, so the replicate is the seed: a run's site values "
        "are averaged first, and the intervals are 95 % Student-t intervals over seeds (not over studies or sites). "
        "Arms that share seeds share the initial model and data order, so paired comparisons use the per-seed "
        f"differences. {_few_seeds_note(arms)}{_evaluation_note(runs)}",
        "",
        *_final_section(arms),
        *_paired_section(arms, paired),
        "## Convergence",
        "",
        "![convergence](convergence.png)",
        "",
        *_privacy_section(prows, primary),
        *_subgroup_section(arms, kinds, boot),
        *_gap_section(arms, gaps),
        *_local_section(arms, boot),
    ]
    write_json_atomic(out / "results.json", results_json(name, arms, paired, gaps))
    return write_text_atomic(out / "results.md", "\n".join(lines) + "\n")

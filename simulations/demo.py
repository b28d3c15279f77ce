"""The main job behind ``make demo`` / ``lungvl demo``: the whole pipeline, small.

1. a federated DP-FedAvgM simulation on Flower's simulation engine (``simulations/scenarios/tiny.toml``:
   two synthetic sites, a screening and a referral cohort, tiny model, client-level DP);
2. the site check of every simulated site, and what the cohorts look like (HU per tissue, slice thickness,
   nodule mix, Lung-RADS, malignancy) and how well the report labeler recovers the generator's truth;
3. an explained report of one held-out synthetic study with the final global model, and with the shipped
   model (``models/lungvl-tiny-v1``) when the repository has it.

Outputs under ``out_dir``: ``config.json`` (resolved), ``metrics.json``, ``summary.md``,
``cohort_slices.png``, ``lung_rads_by_cohort.png``, ``federation/`` (the simulation run: registry.db,
checkpoints/, metrics CSVs, convergence.png, epsilon.png, summary.md, sites/), ``held_out/`` (a held-out
synthetic site), ``explanation/`` (report.json, report.md, nodule_<k>.png, seg.dcm, sr.dcm) and
``explanation_shipped/`` (the same with the shipped model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.dicom_io import read_series
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.site_check import check_site
from lungvl_model.data.synth import SynthConfig, generate_site
from lungvl_model.data.targets import LUNG_RADS_CLASSES
from lungvl_model.shipped import shipped_model_dir
from lungvl_model.text.labeler import label_report

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo job.

    Attributes:
        out_dir: output directory.
        cohorts: cohort profiles, one synthetic site each.
        studies_per_site: current studies per site (priors come on top).
        matrix: in-plane matrix of the synthetic CT.
        z_extent_mm: cranio-caudal coverage.
        seed: base seed (site i uses seed + i).
        scenario: simulation scenario whose strategy, DP and model settings are used (its sites are
            replaced by the cohort sites above).
    """

    out_dir: Path
    cohorts: tuple[str, ...] = ("screening", "referral", "low_resource")
    studies_per_site: int = 4
    matrix: int = 128
    z_extent_mm: float = 200.0
    seed: int = 0
    scenario: Path = field(default_factory=lambda: Path(__file__).resolve().parent / "scenarios" / "tiny.toml")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["cohorts"] = list(self.cohorts)
        d["scenario"] = str(self.scenario)
        return d


def tissue_stats(site_dir: Path) -> dict[str, float]:
    """HU statistics of the first study with nodules: lung, nodules, body, noise in the aorta-free body."""
    cat = build_catalogue(site_dir)
    for e in cat.usable:
        if e.mask is None or e.lobes is None or not e.nodule_labels or e.series is None:
            continue
        vol = read_series(e.series.files)
        nod = read_label_nifti(e.mask, vol)
        lobes = read_label_nifti(e.lobes, vol)
        lung = (lobes > 0) & (nod == 0)
        body = (vol.hu > -300) & (lobes == 0)
        return {
            "lung_median_hu": float(np.median(vol.hu[lung])),
            "nodule_mean_hu": float(np.mean(vol.hu[nod > 0])) if (nod > 0).any() else math.nan,
            "body_median_hu": float(np.median(vol.hu[body])),
            "slice_spacing_mm": float(vol.spacing[0]),
            "pixel_mm": float(vol.spacing[1]),
            "slices": int(vol.shape[0]),
        }
    return {}


def labeler_agreement(site_dir: Path) -> dict[str, float]:
    """How well the report labeler recovers the generator's truth from the report text."""
    cat = build_catalogue(site_dir)
    present_ok = cat_ok = cat_n = size_ok = size_n = n = 0
    for e in cat.usable:
        if e.report is None:
            continue
        n += 1
        lab = label_report(e.report.text)
        truth_present = bool(e.nodule_labels)
        present_ok += int(bool(lab.nodule_present) == truth_present)
        exam = (e.study_labels or {}).get("lung_rads", "")
        if exam:
            cat_n += 1
            cat_ok += int(lab.lung_rads == exam)
        sizes = [n_.size_mm for n_ in lab.nodules if n_.size_mm is not None]
        for row in e.nodule_labels:
            size_n += 1
            true = float(row["longest_diameter_mm"] or row["mean_diameter_mm"] or "nan")
            size_ok += int(
                any(abs(s - true) <= 1.0 or abs(s - float(row["mean_diameter_mm"] or 0)) <= 1.0 for s in sizes)
            )
    return {
        "reports": n,
        "nodule_present_accuracy": present_ok / n if n else math.nan,
        "lung_rads_accuracy": cat_ok / cat_n if cat_n else math.nan,
        "nodule_size_recall_1mm": size_ok / size_n if size_n else math.nan,
    }


def cohort_labels(site_dir: Path) -> dict[str, Any]:
    """Nodule mix, Lung-RADS distribution and malignancy prevalence from labels.csv."""
    cat = build_catalogue(site_dir)
    exams = [e.study_labels for e in cat.usable if e.study_labels]
    nodules = [r for e in cat.usable for r in e.nodule_labels]
    lr = Counter(r.get("lung_rads", "") for r in exams)
    diam = [float(r["mean_diameter_mm"]) for r in nodules if r.get("mean_diameter_mm")]
    return {
        "studies": len(cat.usable),
        "nodules": len(nodules),
        "malignant_studies": sum(r.get("malignant") == "1" for r in exams),
        "lung_rads": {c: lr.get(c, 0) for c in LUNG_RADS_CLASSES},
        "mean_nodule_diameter_mm": float(np.mean(diam)) if diam else math.nan,
        "types": dict(Counter(r.get("type", "") for r in nodules)),
        "with_prior": sum(bool(e.prior_study_uid) for e in cat.usable),
    }


def plot_cohorts(sites: dict[str, Path], path: Path) -> None:
    """One axial slice through the largest nodule of each cohort, nodule contour in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(4 * len(sites), 4.2), squeeze=False)
    for ax, (cohort, site) in zip(axes[0], sites.items(), strict=True):
        ax.axis("off")
        cat = build_catalogue(site)
        best = None
        for e in cat.usable:
            for r in e.nodule_labels:
                d = float(r.get("mean_diameter_mm") or 0)
                if e.mask is not None and (best is None or d > best[0]):
                    best = (d, e, int(r["nodule_id"]))
        if best is None or best[1].series is None:
            ax.set_title(f"{cohort}: no nodule")
            continue
        _, e, nid = best
        assert e.series is not None and e.mask is not None  # checked when the best nodule was chosen
        vol = read_series(e.series.files)
        nod = read_label_nifti(e.mask, vol) == nid
        z = int(np.argmax(nod.sum(axis=(1, 2))))
        ax.imshow(np.clip(vol.hu[z], -1350, 150), cmap="gray", vmin=-1350, vmax=150)
        ax.contour(nod[z], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{cohort}: {best[0]:.1f} mm, {vol.spacing[0]:.2f} mm slices", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lung_rads(stats: dict[str, dict[str, Any]], path: Path) -> None:
    """Exam Lung-RADS distribution per cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(stats))
    x = np.arange(len(LUNG_RADS_CLASSES))
    for i, (cohort, s) in enumerate(stats.items()):
        counts = np.array([s["lung_rads"][c] for c in LUNG_RADS_CLASSES], dtype=float)
        ax.bar(x + i * width, counts / max(1.0, counts.sum()), width, label=cohort)
    ax.set_xticks(x + width * (len(stats) - 1) / 2, LUNG_RADS_CLASSES)
    ax.set_xlabel("Lung-RADS v2022 exam category")
    ax.set_ylabel("share of studies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_site(out: Path, seed: int) -> Path:
    """A held-out synthetic referral site (2 new patients) under ``out/held_out``."""
    held = out / "held_out"
    generate_site(
        SynthConfig(
            cohort="referral",
            n_studies=2,
            out_dir=held,
            seed=seed + 1000,
            matrix=128,
            z_extent_mm=200.0,
            site_name="held-out",
        )
    )
    return held


def explain_held_out(checkpoint: Path, held: Path, out_dir: Path, log: Progress, *, label: str) -> dict[str, Any]:
    """Explain the held-out study with the most nodules with ``checkpoint`` into ``out_dir``.

    The checkpoint's calibration, candidate filter, fine detector and nodule-risk head are used when it has them (the
    shipped model does; the demo's federated micro model does not).
    """
    from lungvl_model.inference.calibration import load_state
    from lungvl_model.inference.checkpoint_parts import explain_parts
    from lungvl_model.inference.explain import explain_study
    from lungvl_model.inference.render import write_explanation
    from lungvl_model.training.checkpoint import load_checkpoint

    cat = build_catalogue(held)
    entry = max(cat.usable, key=lambda e: len(e.nodule_labels))
    assert entry.series is not None
    model, _ = load_checkpoint(checkpoint)
    vol = read_series(entry.series.files)
    exp = explain_study(
        model,
        vol,
        calibration=load_state(checkpoint),
        **explain_parts(checkpoint),
    )
    paths = write_explanation(exp, vol, out_dir, source_files=entry.series.files)
    log(
        f"{label}: explained held-out study {entry.study_uid[-12:]}: {len(exp.findings)} finding(s), "
        f"model Lung-RADS {exp.model['lung_rads']}, rule engine {exp.rule_lung_rads}, defer={exp.defer}"
    )
    return {
        "checkpoint": str(checkpoint),
        "study_uid": entry.study_uid,
        "files": [str(p) for p in paths],
        "defer": exp.defer,
        "model": exp.model,
        "rule_lung_rads": exp.rule_lung_rads,
        "n_findings": len(exp.findings),
        "reference_report": entry.report.text if entry.report else "",
    }


def run_demo(config: DemoConfig, log: Progress = print, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run the demo job; returns the metrics written to ``metrics.json``."""
    from simulations.scenario import Scenario, SiteSpec
    from simulations.simulate import run_simulation

    t_start = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    sites: dict[str, Path] = {}
    metrics: dict[str, Any] = {"sites": {}}
    for i, cohort in enumerate(config.cohorts):
        site = out / "sites" / cohort
        t0 = time.perf_counter()
        log(f"[{i + 1}/{len(config.cohorts)}] synthesising {cohort} site ({config.studies_per_site} studies)")
        generate_site(
            SynthConfig(
                cohort=cohort,
                n_studies=config.studies_per_site,
                out_dir=site,
                seed=config.seed + i,
                matrix=config.matrix,
                z_extent_mm=config.z_extent_mm,
                site_name=f"{cohort}-site",
            ),
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        check = check_site(site)
        sites[cohort] = site
        metrics["sites"][cohort] = {
            "generation_seconds": round(seconds, 2),
            "check": check.summary,
            "tissue": tissue_stats(site),
            "labels": cohort_labels(site),
            "labeler": labeler_agreement(site),
        }
        log(f"    {check.summary['usable']}/{check.summary['studies']} usable, {seconds:.1f} s")
    plot_cohorts(sites, out / "cohort_slices.png")
    plot_lung_rads({c: m["labels"] for c, m in metrics["sites"].items()}, out / "lung_rads_by_cohort.png")
    base = Scenario.from_toml(config.scenario)
    scenario = dataclasses.replace(
        base, sites=tuple(SiteSpec(name=f"{c}-site", path=p.resolve()) for c, p in sites.items())
    )
    log(f"federated simulation: scenario {config.scenario} with the {len(sites)} sites above")
    fed = run_simulation(scenario, out / "federation", progress=log)
    metrics["federation"] = {k: fed[k] for k in ("run_id", "status", "rounds_done", "epsilon", "seconds", "checkpoint")}
    held = held_out_site(out, config.seed)
    metrics["explanation"] = explain_held_out(
        Path(fed["checkpoint"]), held, out / "explanation", log, label="federated micro model"
    )
    try:
        shipped = shipped_model_dir()
    except FileNotFoundError as err:
        log(f"shipped model not explained: {err}")
    else:
        metrics["explanation_shipped"] = explain_held_out(
            shipped, held, out / "explanation_shipped", log, label="shipped model"
        )
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    lines = [
        "# lungvl demo",
        "",
        "| cohort | studies | usable | nodules | malignant | slice mm | lung HU | "
        "nodule HU | labeler Lung-RADS acc | gen s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, m in metrics["sites"].items():
        t, lab = m["tissue"], m["labels"]
        lines.append(
            f"| {c} | {m['check']['studies']} | {m['check']['usable']} | {lab['nodules']} | "
            f"{lab['malignant_studies']} | "
            f"{t.get('slice_spacing_mm', math.nan):.2f} | {t.get('lung_median_hu', math.nan):.0f} | "
            f"{t.get('nodule_mean_hu', math.nan):.0f} | {m['labeler']['lung_rads_accuracy']:.2f} | "
            f"{m['generation_seconds']:.1f} |"
        )
    f = metrics["federation"]
    e = metrics["explanation"]
    lines += [
        "",
        f"Federation: run {f['run_id']} {f['status']}, {f['rounds_done']} rounds, client-level epsilon "
        f"{f['epsilon']}, {f['seconds']} s; outputs in {out / 'federation'} (registry.db, convergence.png, "
        "epsilon.png, metrics CSVs, checkpoints/).",
        f"Explanation of held-out study {e['study_uid']}: model Lung-RADS {e['model']['lung_rads']}, rule engine "
        f"{e['rule_lung_rads']}, malignancy {e['model']['malignancy_probability']:.3f}, defer to radiologist: "
        f"{e['defer']}; files: " + ", ".join(e["files"]),
    ]
    shipped_exp = metrics.get("explanation_shipped")
    if shipped_exp is not None:
        lines.append(
            f"The shipped model ({shipped_exp['checkpoint']}) on the same study: "
            f"{shipped_exp['n_findings']} finding(s), "
            f"model Lung-RADS {shipped_exp['model']['lung_rads']}, rule engine {shipped_exp['rule_lung_rads']}, "
            f"defer: {shipped_exp['defer']}; files in {out / 'explanation_shipped'}."
        )
    lines += [
        f"Demo wall time: {metrics['seconds']} s.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    log(
        f"wrote {out}/config.json, metrics.json, summary.md, cohort_slices.png, lung_rads_by_cohort.png, "
        "federation/, explanation/" + (", explanation_shipped/" if shipped_exp is not None else "")
    )
    return metrics

"""Write an :class:`~lungvl_model.inference.explain.Explanation`: report.json, report.md, PNG overlays."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.explain import Explanation


def _heat_on_slice(exp: Explanation, heat: np.ndarray, volume: CTVolume, axis: int, index: int) -> np.ndarray:
    """Sample a model-grid heatmap on one source slice (axis 0 axial, 1 coronal)."""
    assert exp.grid is not None
    shape = [n for i, n in enumerate(volume.shape) if i != axis]
    a, b = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = [a, b]
    coords.insert(axis, np.full_like(a, index))
    src = np.stack(coords, -1).astype(float)
    g = exp.grid.src_to_model(src)
    return ndimage.map_coordinates(heat, [g[..., 0], g[..., 1], g[..., 2]], order=1, mode="constant", cval=0.0)


def coronal_origin(volume: CTVolume) -> str:
    """Matplotlib ``origin`` that puts the patient's head at the top of a coronal slice.

    Rows of a coronal slice are the CT's slice index z; when z runs towards the head (the slice axis'
    LPS S component is positive, the usual ascending-z series) row 0 is the feet and must be drawn at the
    bottom (``"lower"``); a series stored head first keeps ``"upper"``.
    """
    return "lower" if float(volume.affine_zyx()[2, 0]) > 0 else "upper"


def write_overlays(exp: Explanation, volume: CTVolume, out_dir: Path) -> list[Path]:
    """Axial and coronal PNG through each nodule: CT (lung window), mask contour, sentence heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    key = [s for s in exp.sentences if s.heatmap is not None]
    for f in exp.findings:
        linked = [s for s in key if s.nodule == f.index] or [s for s in key if s.key] or key
        heat = np.mean([s.heatmap for s in linked], axis=0) if linked else None
        label = linked[0].text if linked else "(no sentence)"
        full = f.full_mask(volume.shape)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
        for ax, axis, name in ((axes[0], 0, "axial"), (axes[1], 1, "coronal")):
            idx = int(round(f.centroid_zyx[axis]))
            ct = np.take(volume.hu, idx, axis=axis)
            m = np.take(full, idx, axis=axis)
            aspect = volume.spacing[0] / volume.spacing[2] if axis == 1 else volume.spacing[1] / volume.spacing[2]
            origin = coronal_origin(volume) if axis == 1 else "upper"  # axial: anterior up, patient's left right
            ax.imshow(np.clip(ct, -1350, 150), cmap="gray", vmin=-1350, vmax=150, aspect=aspect, origin=origin)
            if heat is not None:
                h = _heat_on_slice(exp, heat, volume, axis, idx)
                ax.imshow(
                    np.ma.masked_less(h, 0.2), cmap="jet", alpha=0.35, vmin=0, vmax=1, aspect=aspect, origin=origin
                )
            if m.any():
                ax.contour(m, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"nodule {f.index} {name}", fontsize=9)
            ax.axis("off")
        fig.suptitle(
            f"nodule {f.index}: {f.mean_diameter_mm:.1f} mm {f.type.replace('_', '-')} {f.lobe}, Lung-RADS "
            f"{f.lung_rads or 'n/a'}\nheatmap: {label[:90]}",
            fontsize=8,
        )
        fig.tight_layout()
        p = out_dir / f"nodule_{f.index}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def report_markdown(exp: Explanation) -> str:
    """Human-readable report.md."""
    m = exp.model
    lines = [f"# lungvl explanation: study {exp.study_uid}", ""]
    if exp.defer:
        lines += ["**DEFER TO RADIOLOGIST**: " + "; ".join(exp.defer_reasons), ""]
    lines += [f"- flag: {f}" for f in exp.flags]
    if exp.exam_sentences:
        lines += ["", "## Exam (from the DICOM header and site metadata, not generated)", ""]
        lines += [f"- {t}" for t in exp.exam_sentences]
    lines += ["", "## Generated explanation", ""]
    for s in exp.sentences:
        mark = " (low confidence)" if s.low_confidence else ""
        where = f" [nodule {s.nodule}]" if s.nodule else ""
        lines.append(f"- {s.text} — confidence {s.confidence:.2f}{mark}{where}")
    if exp.fact_check is not None:
        fc = exp.fact_check
        lines += [
            "",
            f"Fact check: {fc.n_contradictions} contradiction(s) with the findings, {fc.n_unsupported} unsupported "
            f"fact(s); {len(exp.removed_sentences)} sentence(s) removed.",
        ]
        lines += [f"- removed: {s.text}" for s in exp.removed_sentences]
    lines += [
        "",
        "## Measured findings (native resolution)",
        "",
        "| # | lobe | type | long x short mm | mean mm | volume mm3 | context | growth mm | Brock | Lung-RADS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in exp.findings:
        growth = "" if f.growth_mm is None else f"{f.growth_mm:+.1f}"
        brock = "" if f.brock_probability is None else f"{f.brock_probability:.3f}"
        lines.append(
            f"| {f.index} | {f.lobe} | {f.type} | {f.longest_diameter_mm:.1f} x {f.short_axis_mm:.1f} | "
            f"{f.mean_diameter_mm:.1f} | {f.volume_mm3:.0f} | {f.context} | {growth} | {brock} | {f.lung_rads} |"
        )
    if not exp.findings:
        lines.append("| - | no nodule found by the triage pass | | | | | | | | |")
    lines += [
        "",
        "## Risk",
        "",
        f"- malignancy probability: {m['malignancy_probability']:.3f} ({m.get('malignancy_source', 'study head')})",
        f"- model Lung-RADS: {m['lung_rads']}; rule engine on measured findings: {exp.rule_lung_rads}",
        f"- model 12-month growth: {m['growth_mm_12_months']:+.2f} mm",
        f"- emphysema index (LAA-950): {exp.emphysema_index:.3f}",
    ]
    if exp.answer:
        lines += [
            "",
            "## Question",
            "",
            f"> {exp.answer['question']}",
            "",
            exp.answer.get("measured", ""),
            "",
            exp.answer.get("answer", ""),
        ]
    lines += ["", "Research software: not for clinical use."]
    return "\n".join(lines) + "\n"


def write_explanation(
    exp: Explanation, volume: CTVolume, out_dir: str | Path, *, source_files: Sequence[str | Path] | None = None
) -> list[Path]:
    """Write report.json, report.md and the overlays, plus seg.dcm/sr.dcm when the source files are given.

    Args:
        exp: the explanation.
        volume: the CT it was computed on.
        out_dir: output folder (created).
        source_files: the CT series' DICOM files: a DICOM SEG of the kept findings (none when no finding
            is kept) and a Comprehensive 3D SR (TID 1500) are written beside report.json
            (:mod:`lungvl_model.export`), and report.json's ``dicom`` names them.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = exp.to_dict()
    dicom: list[Path] = []
    if source_files is not None:
        from lungvl_model.export.write import write_dicom

        export = write_dicom(exp, volume, source_files, out, report)
        report["dicom"] = export.to_dict(relative_to=out)
        dicom = [p for p in (export.seg, export.sr) if p is not None]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    md = report_markdown(exp)
    if source_files is not None:
        d = report["dicom"]
        seg = f"{d['seg']} (DICOM SEG, {len(exp.findings)} segment(s)), " if d["seg"] else "no SEG (no finding), "
        md += f"\nDICOM: {seg}{d['sr']} (Comprehensive 3D SR, TID 1500 measurement report).\n"
    (out / "report.md").write_text(md)
    return [out / "report.json", out / "report.md", *dicom, *write_overlays(exp, volume, out)]

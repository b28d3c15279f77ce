"""What a finished run leaves beside its registry: metric CSVs, ``convergence.png``, ``epsilon.png``, ``summary.md``.

A simulation (:mod:`simulations.simulate`) and a deployment (:func:`server.deploy.start_server`) write
the same files from the same registry rows, so a coordinator reads a deployed run the way a researcher
reads a simulated one::

    metrics.csv, metrics_global.csv, metrics_site_<name>.csv   (:meth:`Registry.export_csv`)
    convergence.png      global validation and training metrics per round
    epsilon.png          client-level ε per round (and the sites' own patient-level ε)
    summary.md           the run at a glance: settings, sites, one row per round, replies left out

Plots use matplotlib's Agg backend (no display needed); matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import ServerConfig
from server.curriculum import CurriculumPhase
from server.registry import Registry

__all__ = [
    "SitesTable", "legend_or_note", "plot_convergence", "plot_epsilon", "pyplot", "save_figure", "summary_markdown",
    "write_run_outputs",
]  # fmt: skip

#: Global metrics shown as columns of summary.md's round table (when the run recorded them).
SUMMARY_COLUMNS = (
    "train_loss", "val_loss", "val_dice", "val_dice_found", "val_nodule_sensitivity", "val_lung_rads_acc"
)  # fmt: skip


@dataclass(frozen=True)
class SitesTable:
    """The sites section of ``summary.md``: a header and one row of cells per site.

    Attributes:
        header: column names, e.g. ``("site", "cohort", "studies")``.
        rows: one tuple of cell texts per site (as many cells as ``header``).
    """

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"SitesTable: row {row!r} has {len(row)} cells, the header {self.header!r} has "
                                 f"{len(self.header)}")  # fmt: skip

    def markdown(self) -> list[str]:
        """The table as Markdown lines."""
        return [
            "| " + " | ".join(self.header) + " |",
            "|---" * len(self.header) + "|",
            *("| " + " | ".join(cells) + " |" for cells in self.rows),
        ]


def pyplot() -> Any:
    """Matplotlib's pyplot on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_or_note(ax: Any, note: str, fontsize: int = 8) -> None:
    """The axes' legend, or ``note`` in its middle when nothing was plotted on it."""
    if ax.has_data():
        ax.legend(fontsize=fontsize)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def save_figure(fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay ``fig`` out (inside ``rect``), write it to ``path`` as a 110-dpi PNG and free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_convergence(global_rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Global (example-weighted) validation and training metrics per round.

    Args:
        global_rows: metric rows of scope ``"global"`` (``{round, name, value, ...}``).
        path: the PNG to write.
        title: the figure's title (the run's name).
    """
    plt = pyplot()
    names = sorted({m["name"] for m in global_rows if m["name"].startswith(("val_", "train_loss"))})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in names:
        pts = sorted((m["round"], m["value"]) for m in global_rows if m["name"] == name)
        ax = axes[0] if "loss" in name else axes[1]
        ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("score")
    for ax in axes:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        legend_or_note(ax, "no metrics recorded")
    fig.suptitle(f"{title}: global metrics per round")
    save_figure(fig, path)


def plot_epsilon(ledger: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Client-level ε per round (server accountant) and each site's own patient-level ε.

    Args:
        ledger: the run's privacy-ledger rows (:meth:`Registry.privacy`).
        path: the PNG to write.
        title: the figure's title (the run's name).
    """
    fig, ax = pyplot().subplots(figsize=(6, 3.8))
    client = [(p["round"], p["epsilon"]) for p in ledger if p["level"] == "client"]
    if client:
        ax.plot(*zip(*client, strict=True), marker="o", lw=2, label=f"client-level (δ={ledger[0]['delta']:g})")
    for site in sorted({p["site_name"] for p in ledger if p["level"] == "sample"}):
        pts = [(p["round"], p["epsilon"]) for p in ledger if p["level"] == "sample" and p["site_name"] == site]
        ax.plot(*zip(*pts, strict=True), marker=".", ls="--", label=f"{site} (patient-level)")
    legend_or_note(ax, "no differential privacy in this run")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ε spent")
    ax.set_title(f"{title}: privacy spent")
    save_figure(fig, path)


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _training(c: ServerConfig) -> str:
    """What the sites train: the stage and its settings, or each curriculum phase in order."""

    def phase(p: CurriculumPhase) -> str:
        patch = f", {p.seg_patch}³ patches" if p.seg_patch else ""
        lr = f"lr {p.lr:g}" + (" (cosine)" if p.lr_schedule == "cosine" else "")
        return f"{p.stage} × {p.rounds} rounds: {p.local_steps} local steps, batch {p.batch_size}, {lr}{patch}"

    if not c.curriculum:
        return "stage " + phase(c.phases[0])
    return "curriculum " + " → ".join(phase(p) for p in c.curriculum)


def summary_markdown(
    reg: Registry,
    run_id: int,
    config: ServerConfig,
    *,
    title: str,
    sites: SitesTable,
    preset: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The run at a glance: settings, sites, one row per round, site replies left out.

    Args:
        reg: the run registry.
        run_id: the run.
        config: the server settings the run used.
        title: the heading (the run's or scenario's name).
        sites: the sites section.
        preset: the model preset, when known.
        notes: paragraphs added after the settings.

    Returns:
        The Markdown text.
    """
    s = reg.summary(run_id)
    c = config
    rounds = reg.rounds(run_id)
    glob: dict[int, dict[str, float]] = {}
    for m in reg.metrics(run_id, scope="global"):
        glob.setdefault(m["round"], {})[m["name"]] = m["value"]
    eps = {p["round"]: p["epsilon"] for p in reg.privacy(run_id) if p["level"] == "client"}
    cols = [n for n in SUMMARY_COLUMNS if any(n in g for g in glob.values())]
    dp = f"σ = {c.client_noise_multiplier}, C = {c.clip_norm}, δ = {c.delta}" if c.client_dp else "off"
    if c.reproducible_noise:
        dp += " (**noise reproducible: not private**)"
    model = f"; model preset {preset}" if preset else ""
    lines = [
        f"# {title}",
        "",
        f"run {run_id}: **{s['run']['status']}**, {s['rounds_done']}/{c.rounds} rounds completed, "
        f"{s['failures']} failed/rejected/timed-out site replies.",
        "",
        f"strategy {c.strategy} (η = {c.server_lr}, β = {c.momentum}), {c.site_sampling} site sampling, fraction "
        f"{c.fraction_train}, min_sites "
        f"{c.min_sites}; client-level DP {dp}; DP-SGD at sites {'on' if c.dp_sgd else 'off'}; {_training(c)}{model}; "
        f"seed {c.seed}.",
        "",
    ]
    for note in notes:
        lines += [note, ""]
    lines += [
        *sites.markdown(),
        "",
        "| round | status | sampled | ok | failed | update norm | " + " | ".join(cols) + " | ε |",
        "|---" * (7 + len(cols)) + "|",
    ]
    for r in rounds:
        g = glob.get(r["round"], {})
        lines.append(
            f"| {r['round']} | {r['status']} | {r['sites_sampled']} | {_fmt(r['sites_replied'])} | "
            f"{_fmt(r['sites_failed'])} | {_fmt(r['update_norm'])} | "
            + " | ".join(_fmt(g.get(n)) for n in cols)
            + f" | {_fmt(eps.get(r['round']))} |"
        )
    bad = [p for p in reg.participation(run_id) if p["status"] != "ok"]
    if bad:
        lines += ["", "Site replies left out:", ""]
        lines += [f"- round {p['round']}: {p['site_name'] or p['node_id']} {p['status']}: {p['reason']}" for p in bad]
    return "\n".join(lines) + "\n"


def write_run_outputs(
    reg: Registry,
    run_id: int,
    out_dir: str | Path,
    config: ServerConfig,
    *,
    title: str,
    sites: SitesTable,
    preset: str | None = None,
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write the metric CSVs, ``convergence.png``, ``epsilon.png`` and ``summary.md`` of a run.

    Args:
        reg: the run registry (only read).
        run_id: the run.
        out_dir: the run directory (created when missing).
        config: the server settings the run used.
        title: the run's name (plot titles, summary heading).
        sites: the sites section of ``summary.md``.
        preset: the model preset, when known.
        notes: paragraphs for ``summary.md``.

    Returns:
        The files written: the CSVs, then the two plots, then ``summary.md``.

    Raises:
        RegistryError: unknown ``run_id``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(reg, run_id, config, title=title, sites=sites, preset=preset, notes=notes)
    files = reg.export_csv(run_id, out)
    plot_convergence(reg.metrics(run_id, scope="global"), out / "convergence.png", title)
    plot_epsilon(reg.privacy(run_id), out / "epsilon.png", title)
    (out / "summary.md").write_text(text, encoding="utf-8")
    return [*files, out / "convergence.png", out / "epsilon.png", out / "summary.md"]

"""``lungvl data``: build site datasets (synthetic cohorts, LIDC-IDRI import)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from lungvl.console import err, out, print_error, progress_callback
from lungvl.errors import naming
from lungvl.params import SYNTH_COHORTS, choice

app = typer.Typer(help="Create site datasets: synthetic cohorts and LIDC-IDRI imports.", no_args_is_help=True)


@app.command("synth")
def synth(
    cohort: str = typer.Option(..., "--cohort", click_type=choice(SYNTH_COHORTS), help="cohort profile"),
    studies: int = typer.Option(20, "--studies", min=1, help="number of current studies (priors come on top)"),
    out_dir: Path = typer.Option(
        ..., "--out", help="site directory: new, empty, or a synthetic site it wrote (anything else is refused)"
    ),
    seed: int = typer.Option(0, "--seed"),
    matrix: int = typer.Option(192, "--matrix", min=32, help="in-plane matrix (pixels)"),
    fov_mm: float = typer.Option(320.0, "--fov-mm", help="in-plane field of view (mm)"),
    z_extent_mm: float = typer.Option(220.0, "--z-extent-mm", help="cranio-caudal coverage (mm)"),
    name: str | None = typer.Option(None, "--name", help="site name (default: the folder name)"),
) -> None:
    """Write a synthetic site: DICOM CT series, reports, masks, labels.csv and site.toml."""
    from lungvl_model.data.synth import SynthConfig, generate_site
    from lungvl_model.data.synth.generator import check_out_dir

    try:
        cfg = SynthConfig(
            cohort=cohort,
            n_studies=studies,
            out_dir=out_dir,
            seed=seed,
            matrix=matrix,
            fov_mm=fov_mm,
            z_extent_mm=z_extent_mm,
            site_name=name,
        )
    except (ValueError, KeyError) as e:
        print_error(e)
        raise typer.Exit(2) from e
    try:
        check_out_dir(out_dir)  # before the progress bar; generate_site checks again
        with naming(out_dir), progress_callback(f"synth {cohort}") as cb:
            summary = generate_site(cfg, progress=cb)
    except (FileExistsError, NotADirectoryError) as e:  # --out holds what the generator did not write
        print_error(e)
        raise typer.Exit(2) from e
    written = summary.to_dict() if hasattr(summary, "to_dict") else summary
    out.print(f"wrote {out_dir}: {written}", highlight=False, markup=False)


@app.command("import-lidc")
def import_lidc_cmd(
    src: Path = typer.Argument(..., help="LIDC-IDRI case folder(s): DICOM series + LIDC XML"),
    out_dir: Path = typer.Option(..., "--out", help="site directory to create"),
) -> None:
    """Turn LIDC-IDRI cases into a site dataset (consensus masks, labels.csv, derived reports).

    Exit codes: 0 every case imported; 1 a case failed (the table gives its reason; the others are imported).
    """
    from lungvl_model.data.lidc import import_lidc
    from lungvl_model.data.measure import equivalent_sphere_diameter

    with progress_callback("import LIDC") as cb:
        summary = import_lidc(src, out_dir, progress=cb)
    t = Table(title=escape(f"LIDC import -> {out_dir} ({summary.dicom_mode}, {summary.seconds:.1f} s)"))
    for col in (
        "case",
        "status",
        "nodule",
        "readers",
        "longest mm",
        "mean mm",
        "sphere-eq mm",
        "volume mm3",
        "type",
        "malignancy",
        "Lung-RADS",
    ):
        t.add_column(col)
    for case in summary.cases:
        if case.status != "ok" or not case.nodules:
            blank = ["" for _ in range(6)]
            t.add_row(escape(case.case), case.status, "-", str(case.n_readers), *blank, escape(case.reason[:60]))
            continue
        for n in case.nodules:
            m = n.measurement
            t.add_row(
                escape(case.case),
                case.status,
                str(n.nodule_id),
                str(n.n_readers),
                f"{m.longest_diameter_mm:.1f}",
                f"{m.mean_diameter_mm:.1f}",
                f"{equivalent_sphere_diameter(m.volume_mm3):.1f}",
                f"{m.volume_mm3:.0f}",
                escape(n.ratings.type),
                f"{n.ratings.malignancy_score:.2f}",
                n.lung_rads,
            )
    out.print(t)
    failed = [c for c in summary.cases if c.status != "ok"]
    if failed or not summary.cases:
        err.print(f"{len(failed)} case(s) failed, {len(summary.cases) - len(failed)} imported")
        raise typer.Exit(1)

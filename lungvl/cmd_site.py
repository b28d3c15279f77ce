"""``lungvl site``: what hospital IT runs at a site."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from lungvl.console import err, out, progress_callback
from lungvl_model.data.site_check import SiteCheckReport, check_site

app = typer.Typer(help="Site (hospital) commands.", no_args_is_help=True)


def render(report: SiteCheckReport) -> None:
    """Print a site check as rich tables."""
    t = Table(title=f"site {report.site_name} ({report.site_dir})", show_lines=False)
    for col in ("study", "status", "slices", "report", "labels", "mask", "reason / notes"):
        t.add_column(col, overflow="fold")
    for s in report.studies:
        t.add_row(
            s["study_uid"][-24:],
            "[green]usable" if s["status"] == "usable" else "[red]skipped",
            str(s["slices"] or ""),
            "yes" if s["report"] else "-",
            s["labels"],
            "yes" if s["mask"] else "-",
            s["reason"] or "; ".join(s["notes"]),
        )
    out.print(t)
    if report.phi:
        p = Table(title="identifying DICOM attributes present (PHI)")
        for col in ("study", "attribute", "value"):
            p.add_column(col)
        for f in report.phi:
            p.add_row(f["study_uid"][-24:], f["keyword"], f["value"])
        out.print(p)
    else:
        out.print("PHI: no identifying attributes found in the headers checked.")
    for pr in report.problems:
        out.print(f"[yellow]problem[/yellow] {pr}", highlight=False)
    for f in report.skipped_files[:20]:
        out.print(f"[yellow]skipped file[/yellow] {f['path']}: {f['reason']}", highlight=False)
    if len(report.skipped_files) > 20:
        out.print(f"... and {len(report.skipped_files) - 20} more skipped files (see --json)")
    s = report.summary
    out.print(
        f"[bold]{s['usable']} usable[/bold] / {s['studies']} studies; {s['skipped']} skipped; "
        f"{s['with_report']} with report, {s['with_labels']} with labels, {s['with_mask']} with masks; "
        f"{s['phi_findings']} PHI finding(s); {s['skipped_files']} file(s) skipped."
    )


@app.command("check")
def check(
    site_dir: Path = typer.Argument(..., help="site directory (DESIGN.md section 2 layout)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the full report as JSON here"),
) -> None:
    """Is this site's data usable, and is anything identifying in it? Exit 0 when a study is usable."""
    with progress_callback("checking studies") as cb:
        try:
            report = check_site(site_dir, progress=cb)
        except ValueError as e:
            err.print(f"[red]{e}")
            raise typer.Exit(2) from e
    render(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    raise typer.Exit(0 if report.summary["usable"] > 0 else 1)

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
    """Is this site's data usable, and is anything identifying in it? Exit 0 when a study is usable.

    Also prints the site's privacy policy from site.toml ``[privacy]`` (exit 2 when it is invalid).
    """
    with progress_callback("checking studies") as cb:
        try:
            report = check_site(site_dir, progress=cb)
        except ValueError as e:
            err.print(f"[red]{e}")
            raise typer.Exit(2) from e
    render(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    if (site_dir / "site.toml").is_file():
        from client.config import ClientConfig

        try:
            cfg = ClientConfig.from_toml(site_dir)
        except (KeyError, ValueError) as e:
            err.print(f"[red]site.toml: {e.args[0] if e.args else e}", highlight=False)
            raise typer.Exit(2) from e
        out.print(
            f"privacy: ε budget {cfg.epsilon_budget:g} at δ {cfg.delta:g}; holdout_fraction "
            f"{cfg.holdout_fraction:g}; policy: {cfg.policy.describe()}",
            highlight=False,
        )
    raise typer.Exit(0 if report.summary["usable"] > 0 else 1)


@app.command("keys")
def keys(
    out_dir: Path = typer.Option(..., "--out", help="folder for site_key (private) and site_key.pub"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing key pair"),
) -> None:
    """Create the site's node-authentication key pair (ECDSA P-384, OpenSSH format)."""
    from client.deploy import generate_site_keys

    try:
        private, public = generate_site_keys(out_dir, overwrite=overwrite)
    except FileExistsError as e:
        err.print(f"[red]{e}", highlight=False)
        raise typer.Exit(1) from e
    out.print(f"private key: {private} (keep it at the site, mode 0600)", highlight=False)
    out.print(f"public key:  {public} (send it to the coordinator: lungvl server admit {public.name})", highlight=False)


@app.command("join")
def join(
    config: Path = typer.Option(..., "--config", "-c", help="the site's site.toml (with a [federation] table)"),
    skip_data_check: bool = typer.Option(False, "--skip-data-check", help="do not read every study first"),
) -> None:
    """Connect this site to the consortium (SuperNode with TLS + node key) and train when asked."""
    from client.deploy import SiteDeployConfig, SiteNotReady, preflight, run_site

    try:
        cfg = SiteDeployConfig.from_toml(config)
        info = preflight(cfg, check_data=not skip_data_check)
    except (FileNotFoundError, KeyError, ValueError, SiteNotReady) as e:
        err.print(f"[red]site join refused: {e.args[0] if e.args else e}", highlight=False)
        raise typer.Exit(2) from e
    out.print(
        f"site {cfg.client.name}: {info['usable']} usable studies, ε spent {info['epsilon_spent']:.3f} of "
        f"{info['epsilon_budget']}; policy: {cfg.client.policy.describe()}; joining {cfg.superlink}",
        highlight=False,
    )
    raise typer.Exit(run_site(cfg, log=lambda line: out.print(line, highlight=False)))


@app.command("audit")
def audit(
    config: Path = typer.Option(..., "--config", "-c", help="the site's site.toml"),
    limit: int | None = typer.Option(None, "--limit", help="only the most recent N messages"),
) -> None:
    """Every message this site sent: time, round, bytes, sha256, metrics and ε."""
    from client.ledger import LEDGER_FILENAME, AuditLedger

    try:
        state_dir = _state_dir(config)
    except (FileNotFoundError, KeyError, ValueError) as e:
        err.print(f"[red]{e.args[0] if e.args else e}", highlight=False)
        raise typer.Exit(2) from e
    path = state_dir / LEDGER_FILENAME
    if not path.exists():
        err.print(f"[yellow]no outbound ledger at {path}: this site has sent nothing", highlight=False)
        raise typer.Exit(0)
    ledger = AuditLedger(path)
    try:
        rows = ledger.entries(limit)
        total = ledger.total_bytes()
    finally:
        ledger.close()
    t = Table(title=f"outbound messages ({path})")
    for col in ("time (UTC)", "run", "round", "kind", "bytes", "sha256", "metrics", "ε"):
        t.add_column(col, overflow="fold")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        t.add_row(
            r["time"].strftime("%Y-%m-%d %H:%M:%S"),
            r["run_id"] or "-",
            str(r["round"]),
            r["kind"],
            f"{r['size_bytes']:,}",
            r["sha256"][:16],
            metrics or "-",
            "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}",
        )
    out.print(t)
    out.print(f"{len(rows)} message(s), {total:,} bytes in all", highlight=False)


def _state_dir(config: Path) -> Path:
    """The site's state directory: [federation] state_dir when given, else the ClientConfig default."""
    from client.config import ClientConfig

    p = config / "site.toml" if config.is_dir() else config
    if not p.is_file():
        raise FileNotFoundError(f"site config {p} does not exist")
    try:
        from client.deploy import SiteDeployConfig

        return SiteDeployConfig.from_toml(p).state_dir
    except KeyError as e:
        if "needs a [federation] table" not in str(e):
            raise
    state = ClientConfig.from_toml(p).state_dir
    assert state is not None
    return state

"""``lungvl site``: what hospital IT runs at a site."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lungvl.console import err, out, print_error, print_json, progress_callback
from lungvl.params import is_stdin
from lungvl_model.data.site_check import SiteCheckReport, check_site

app = typer.Typer(help="Site (hospital) commands.", no_args_is_help=True)


def render(report: SiteCheckReport, console: Console = out) -> None:
    """Print a site check as rich tables (every name and value escaped: ``[privacy]`` stays literal).

    Args:
        report: the check's result.
        console: where to print (stderr when the JSON report goes to stdout).
    """
    t = Table(title=escape(f"site {report.site_name} ({report.site_dir})"), show_lines=False)
    for col in ("study", "status", "slices", "report", "labels", "mask", "reason / notes"):
        t.add_column(col, overflow="fold")
    for s in report.studies:
        t.add_row(
            escape(s["study_uid"][-24:]),
            "[green]usable" if s["status"] == "usable" else "[red]skipped",
            str(s["slices"] or ""),
            "yes" if s["report"] else "-",
            escape(s["labels"]),
            "yes" if s["mask"] else "-",
            escape(s["reason"] or "; ".join(s["notes"])),
        )
    console.print(t)
    sm = report.summary
    uid_note = "UIDs are not counted: they are the keys of the site data contract"
    if report.phi:
        by_attr: dict[str, list[dict[str, str]]] = {}
        for f in report.phi:
            by_attr.setdefault(f["keyword"], []).append(f)
        p = Table(title="identifying DICOM attributes present (PHI: PS3.15 basic profile, Table E.1-1)")
        for col in ("attribute", "tag", "action", "studies"):
            p.add_column(col, no_wrap=True)
        p.add_column("example value (files: --json)", overflow="fold")
        for kw, found in by_attr.items():
            studies = len({g["study_uid"] for g in found})
            p.add_row(*(escape(v) for v in (kw, found[0]["tag"], found[0]["action"], str(studies), found[0]["value"])))
        console.print(p)
        console.print(
            escape(
                f"PHI: {sm['phi_attributes']} attribute(s) in {sm['phi_studies']} stud(ies), {sm['phi_findings']} "
                f"finding(s) in {sm['phi_files_scanned']} DICOM header(s) read (each finding with its file: --json; "
                f"action X remove, Z empty, D dummy: a D/Z value may already be a pseudonym); {uid_note}."
            ),
            highlight=False,
        )
    else:
        console.print(
            escape(
                f"PHI: none of the PS3.15 basic-profile attributes, no private tag, no burned-in annotation in "
                f"the {sm['phi_files_scanned']} DICOM header(s) read; {uid_note}."
            ),
            highlight=False,
        )
    for why in report.phi_failures[:20]:
        console.print(f"[yellow]PHI check incomplete[/yellow] {escape(why)}", highlight=False)
    if len(report.phi_failures) > 20:
        console.print(f"... and {len(report.phi_failures) - 20} more header(s) the PHI check could not read through")
    for pr in report.problems:
        console.print(f"[yellow]problem[/yellow] {escape(pr)}", highlight=False)
    for f in report.skipped_files[:20]:
        console.print(f"[yellow]skipped file[/yellow] {escape(f['path'])}: {escape(f['reason'])}", highlight=False)
    if len(report.skipped_files) > 20:
        console.print(f"... and {len(report.skipped_files) - 20} more skipped files (see --json)")
    console.print(
        f"[bold]{sm['usable']} usable[/bold] / {sm['studies']} studies; {sm['skipped']} skipped; "
        f"{sm['with_report']} with report, {sm['with_labels']} with labels, {sm['with_mask']} with masks; "
        f"{sm['problems']:,} labels/reports problem(s); {sm['phi_findings']} PHI finding(s); "
        f"{sm['skipped_files']} file(s) skipped.",
        highlight=False,
    )


@app.command("check")
def check(
    site_dir: Path = typer.Argument(..., help="site directory (DESIGN.md section 2 layout)"),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="also write the full report as JSON to this file (missing folders are created); "
        "- writes it to standard output and the tables to standard error",
    ),
    fail_on_phi: bool = typer.Option(
        False, "--fail-on-phi", help="exit 1 when an identifying DICOM attribute is found (or cannot be ruled out)"
    ),
) -> None:
    """Is this site's data usable as training reads it, and is anything identifying in it?

    site.toml is validated first, as 'site join' validates it: every table by ClientConfig, and the
    federation table, when there is one, by SiteDeployConfig (parsing only: nothing is connected to, no
    key file is read). Then every study is read (series, geometry), reports.jsonl and labels.csv are
    validated with the rules training applies (labels.csv: lungvl_model.data.labels_schema), and every
    DICOM header is searched for the attributes of the PS3.15 basic confidentiality profile, private tags
    and BurnedInAnnotation = YES (PHI). UIDs are not reported: they are the keys of the data contract.

    Exit codes: 0 when at least one study is usable and nothing a training run would trip on was
    found; 1 when no study is usable, or reports.jsonl / labels.csv has a problem (a training run would
    skip those lines or rows) or site.toml is missing, or PHI was found and --fail-on-phi is given; 2 when
    site.toml is invalid (the message names the file, the key and the value) or the site directory or
    its dicom/ folder is missing.
    """
    import tomllib

    from client.config import ClientConfig

    toml_path = site_dir / "site.toml"
    cfg: ClientConfig | None = None
    if toml_path.is_file():
        try:
            cfg = ClientConfig.from_toml(toml_path)
            if "federation" in tomllib.loads(toml_path.read_text(encoding="utf-8")):
                from client.deploy import SiteDeployConfig

                SiteDeployConfig.from_toml(toml_path)
        except (OSError, KeyError, ValueError) as e:
            print_error(f"site.toml invalid: {e.args[0] if e.args and isinstance(e.args[0], str) else e}")
            raise typer.Exit(2) from e
    with progress_callback("checking studies") as cb:
        try:
            report = check_site(site_dir, progress=cb)
        except ValueError as e:
            print_error(e)
            raise typer.Exit(2) from e
    console = err if is_stdin(json_out) else out
    render(report, console)
    if is_stdin(json_out):
        print_json(report.to_dict())
    elif json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    if cfg is not None:
        console.print(
            escape(
                f"privacy: ε budget {cfg.epsilon_budget:g} at δ {cfg.delta:g}; holdout_fraction "
                f"{cfg.holdout_fraction:g}; policy: {cfg.policy.describe()}"
            ),
            highlight=False,
        )
    sm = report.summary
    failed = []
    if sm["usable"] == 0:
        failed.append("no usable study")
    if sm["problems"]:
        failed.append(
            f"{sm['problems']:,} site.toml / reports.jsonl / labels.csv problem(s): training skips those lines"
        )
    if fail_on_phi and (report.phi or report.phi_failures):
        failed.append(f"{sm['phi_findings']} PHI finding(s) (--fail-on-phi)")
    if failed:
        print_error(f"site check failed: {'; '.join(failed)}")
    raise typer.Exit(1 if failed else 0)


@app.command("keys")
def keys(
    out_dir: Path = typer.Option(..., "--out", help="folder for site_key (private) and site_key.pub"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing key pair"),
) -> None:
    """Create the site's node-authentication key pair (ECDSA P-384, OpenSSH format)."""
    from client.deploy import generate_site_keys

    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; give a folder for site_key and site_key.pub")
    private, public = generate_site_keys(out_dir, overwrite=overwrite)  # an existing key: exit 2 (lungvl.errors)
    out.print(f"private key: {private} (keep it at the site, mode 0600)", highlight=False)
    out.print(f"public key:  {public} (send it to the coordinator: lungvl server admit {public.name})", highlight=False)


@app.command("join")
def join(
    config: Path = typer.Option(..., "--config", "-c", help="the site's site.toml (with a [federation] table)"),
    skip_data_check: bool = typer.Option(False, "--skip-data-check", help="do not read every study first"),
    skip_connect_check: bool = typer.Option(
        False,
        "--skip-connect-check",
        help="do not try the SuperLink (DNS, TCP, TLS) first: for a site started before its server",
    ),
) -> None:
    """Connect this site to the consortium (SuperNode with TLS + node key) and train when asked.

    Before anything starts, it checks the CA file (PEM certificates of a CA, valid now), the node key
    (and that ``site_key.pub`` beside it is its pair), the model package, the data, the ε budget, and
    then that the SuperLink resolves, answers within 5 s and completes a TLS handshake verified by the
    CA file (``--skip-connect-check`` skips only this last check, for a site started before its
    SuperLink). While it runs, the SuperNode's and the worker's errors are printed here as well as in
    ``<state_dir>/logs/``.

    Exit codes: 0 stopped (Ctrl-C / SIGTERM); 2 refused: a config, file or data problem, named on the
    terminal with its [federation] key; 7 the SuperLink cannot be resolved, reached or fails TLS;
    otherwise the SuperNode process's exit code when it stops by itself (1 for a Flower error: the
    Flower exit code, its meaning and the last log lines are printed).
    """
    from client.deploy import SiteDeployConfig, SiteNotReady, preflight, run_site
    from lungvl.errors import BAD_INPUT, UNREACHABLE
    from lungvl_model.errors import PeerUnreachable

    try:
        cfg = SiteDeployConfig.from_toml(config)
        info = preflight(cfg, check_data=not skip_data_check, check_connect=not skip_connect_check)
    except PeerUnreachable as e:
        print_error(f"site join refused: {e}")
        raise typer.Exit(UNREACHABLE) from e
    except (FileNotFoundError, KeyError, ValueError, SiteNotReady) as e:  # TOMLDecodeError is a ValueError
        print_error(f"site join refused: {e.args[0] if e.args else e}")
        raise typer.Exit(BAD_INPUT) from e
    for warning in info["warnings"]:
        err.print(f"[yellow]warning: {escape(warning)}", highlight=False)
    studies = "data not checked" if info["usable"] is None else f"{info['usable']} usable studies"
    out.print(
        f"site {cfg.client.name}: {studies}, ε spent {info['epsilon_spent']:.3f} of "
        f"{info['epsilon_budget']}; policy: {cfg.client.policy.describe()}; joining {cfg.superlink}",
        highlight=False,
        markup=False,
    )
    raise typer.Exit(run_site(cfg, log=lambda line: out.print(line, highlight=False, markup=False)))


@app.command("audit")
def audit(
    config: Path = typer.Option(..., "--config", "-c", help="the site's site.toml (or its site directory)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the most recent N messages"),
    as_json: bool = typer.Option(
        False, "--json", help="print the messages as one JSON document on standard output instead of a table"
    ),
) -> None:
    """Every message this site sent: time, round, bytes, sha256, metrics and ε.

    With --json: {"ledger": path, "count": n, "total_bytes": b, "messages": [{"time", "run_id", "round",
    "kind", "size_bytes", "sha256", "metrics", "dp", "epsilon", "delta"}, ...]}, oldest first, times in
    ISO 8601 UTC; a site that has sent nothing gives "count": 0.

    Exit codes: 0 listed (or nothing sent yet); 2 site.toml missing or invalid; 6 the ledger is unreadable.
    """
    from client.ledger import LEDGER_FILENAME, AuditLedger

    try:
        state_dir = _state_dir(config)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print_error(e.args[0] if e.args else e)
        raise typer.Exit(2) from e
    path = state_dir / LEDGER_FILENAME
    rows: list[dict[str, Any]] = []
    total = 0
    if path.exists():
        ledger = AuditLedger(path, read_only=True)
        try:
            rows = ledger.entries(limit)
            total = ledger.total_bytes()
        finally:
            ledger.close()
    else:
        err.print(f"no outbound ledger at {path}: this site has sent nothing", style="yellow", markup=False)
    if as_json:
        print_json({"ledger": path, "count": len(rows), "total_bytes": total, "messages": rows})
        return
    if not path.exists():
        return
    t = Table(title=escape(f"outbound messages ({path})"))
    for col in ("time (UTC)", "run", "round", "kind", "bytes", "sha256", "metrics", "ε"):
        t.add_column(col, overflow="fold")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        t.add_row(
            r["time"].strftime("%Y-%m-%d %H:%M:%S"),
            escape(r["run_id"] or "-"),
            str(r["round"]),
            escape(r["kind"]),
            f"{r['size_bytes']:,}",
            r["sha256"][:16],
            escape(metrics or "-"),
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

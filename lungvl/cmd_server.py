"""``lungvl server``: what the consortium coordinator runs."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from lungvl import errors
from lungvl.console import out, print_error

app = typer.Typer(help="Consortium server commands.", no_args_is_help=True)

#: Seconds between redraws of ``server status --watch`` given without a value.
WATCH_DEFAULT_S = 2.0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _WatchValueOptional(TyperCommand):
    """``--watch`` alone (every :data:`WATCH_DEFAULT_S` s) or ``--watch SECONDS``: typer has no optional values."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--watch" and (i + 1 == len(args) or not _is_number(args[i + 1])):
                fixed.append(str(WATCH_DEFAULT_S))
        return super().parse_args(ctx, fixed)


def _load(config: Path):  # type: ignore[no-untyped-def]
    from server.deploy import ServerDeployConfig

    try:
        return ServerDeployConfig.from_toml(config)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print_error(e.args[0] if e.args else e)
        raise typer.Exit(2) from e


@app.command("start")
def start(
    config: Path = typer.Option(..., "--config", "-c", help="server.toml (ServerConfig tables + [deployment])"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in [deployment] run_dir"),
    db: str | None = typer.Option(
        None, "--db", help="registry URL or SQLite path, overriding [deployment] registry (postgresql+psycopg://...)"
    ),
) -> None:
    """Start the SuperLink (TLS, SuperNode auth), admit the configured sites and run the federation.

    At the end the run directory holds the metric CSVs, convergence.png, epsilon.png and summary.md a
    simulation writes. Exit status 3 when another process holds the run directory, 2 when a resume is
    refused (e.g. a checkpoint file that differs from its recorded sha256), 1 when the run failed.
    """
    from server.app import ResumeRefused
    from server.deploy import start_server
    from server.run_lock import RunDirBusy

    cfg = _load(config)
    if db:
        cfg = dataclasses.replace(cfg, registry=db if "://" in db else str(Path(db).expanduser().resolve()))
    try:
        result = start_server(cfg, resume=resume, log=lambda line: out.print(line, highlight=False))
    except RunDirBusy as e:
        print_error(e)
        raise typer.Exit(3) from e
    except ResumeRefused as e:
        print_error(e)
        raise typer.Exit(2) from e
    except (RuntimeError, TimeoutError) as e:  # the run itself failed (bad files and values: exit 2, lungvl.errors)
        print_error(e)
        raise typer.Exit(1) from e
    raise typer.Exit(0 if result["status"] in ("finished", "stopped_budget") else 1)


@app.command("admit")
def admit(
    public_key: Path = typer.Argument(..., help="the site's site_key.pub (from `lungvl site keys`)"),
    config: Path = typer.Option(..., "--config", "-c", help="server.toml"),
    name: str = typer.Option("", "--name", help="a label for the site (default: the key file's name)"),
) -> None:
    """Register a site's public key with the running SuperLink; only admitted sites may connect."""
    from server.deploy import admit_site

    cfg = _load(config)
    try:
        entry = admit_site(cfg, public_key, name=name)
    except RuntimeError as e:  # the SuperLink refused or is not running (a bad key file: exit 2)
        print_error(e)
        raise typer.Exit(1) from e
    out.print(
        f"admitted {entry['name']}: key {entry['fingerprint']}, node {entry['node_id']}", highlight=False, markup=False
    )


def _registry_of(db: str | None, config: Path | None) -> tuple[str, Any]:
    """``(registry URL, deployment config or None)`` from exactly one of ``--db`` and ``--config``."""
    if db and config is not None:
        raise typer.BadParameter("give --db or --config, not both", param_hint="--db/--config")
    if config is not None:
        cfg = _load(config)
        return cfg.registry_url, cfg
    if not db:
        raise typer.BadParameter("give --db URL|PATH or --config server.toml", param_hint="--db/--config")
    if "://" not in db and not Path(db).is_file():
        print_error(f"no registry at {db} (give --db PATH or URL, or --config server.toml)")
        raise typer.Exit(errors.BAD_INPUT)
    return db, None


def _admitted_table(admitted: list[dict[str, str]]) -> Table:
    t = Table(title=f"Admitted sites ({len(admitted)})")
    for col in ("name", "key fingerprint", "node id", "admitted at"):
        t.add_column(col)
    for a in admitted:
        t.add_row(escape(a["name"]), a["fingerprint"], a["node_id"], a["admitted_at"])
    return t


def _snapshot(db: str, run_id: int | None, admitted: list[dict[str, str]] | None) -> tuple[dict[str, Any], Any]:
    """One read of the registry: ``(status_json document, rich renderable)``; ``"run": None`` when it holds none."""
    from server.registry import Registry
    from server.status import STATUS_SCHEMA_VERSION, render_status, status_json

    with Registry(db, read_only=True) as reg:
        found = status_json(reg, run_id)
        tables: list[Any] = render_status(reg, run_id if found is None else found["run"]["id"])
        doc = found or {"schema_version": STATUS_SCHEMA_VERSION, "registry": reg.url, "run": None}
    if admitted is not None:
        tables.append(_admitted_table(admitted))
        doc = {**doc, "admitted_sites": admitted}
    return doc, Group(*tables)


def _ended(doc: dict[str, Any]) -> bool:
    return doc["run"] is not None and bool(doc["run"]["ended"])


def _run_of(doc: dict[str, Any], run_id: int | None) -> int | None:
    return run_id if doc["run"] is None else int(doc["run"]["id"])


@app.command("status", cls=_WatchValueOptional)
def status(
    db: str | None = typer.Option(None, "--db", help="registry: SQLite file path or SQLAlchemy URL"),
    run_id: int | None = typer.Option(None, "--run", help="run id (default: the latest run)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="server.toml: its registry and admitted sites"),
    as_json: bool = typer.Option(
        False, "--json", help="print the run as JSON (README 'server status --json'; the dashboard's /api/runs/ID)"
    ),
    watch: float | None = typer.Option(
        None,
        "--watch",
        metavar="[SECONDS]",
        help=f"redraw every SECONDS (default {WATCH_DEFAULT_S:g}) until the run ends or Ctrl-C; "
        "with --json one JSON line per change",
    ),
) -> None:
    """Rounds, sites, failures, epsilon spent and latest metrics of a run from the registry.

    Exit status: 0 run running, finished or stopped at its ε budget (or no run recorded); 1 the run is
    recorded failed; 2 bad --db/--config/--watch; 6 not a lungvl registry (or unreadable); 130 Ctrl-C.
    """
    url, cfg = _registry_of(db, config)
    admitted: list[dict[str, str]] | None = None
    if cfg is not None:
        from server.deploy import admitted_sites

        admitted = admitted_sites(cfg.run_dir)
    if watch is not None and not watch > 0:
        raise typer.BadParameter(f"SECONDS must be > 0, got {watch}", param_hint="--watch")
    if watch is None:
        doc, view = _snapshot(url, run_id, admitted)
        if as_json:
            typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        else:
            out.print(view)
    else:
        doc = _watch(url, run_id, admitted, seconds=watch, as_json=as_json)
    if doc["run"] is not None and doc["run"]["status"] == "failed":
        raise typer.Exit(errors.FAILED)


def _watch(
    db: str, run_id: int | None, admitted: list[dict[str, str]] | None, *, seconds: float, as_json: bool
) -> dict[str, Any]:
    """Redraw until the run ends (returns its last document); Ctrl-C ends it with exit status 130.

    With ``as_json`` one compact JSON document per line, printed only when it changed.
    """
    doc, view = _snapshot(db, run_id, admitted)
    if as_json:
        last = json.dumps(doc, ensure_ascii=False)
        typer.echo(last)
        while not _ended(doc):
            time.sleep(seconds)
            doc, _ = _snapshot(db, _run_of(doc, run_id), admitted)
            line = json.dumps(doc, ensure_ascii=False)
            if line != last:
                typer.echo(line)
                last = line
        return doc
    with Live(view, console=out, refresh_per_second=4, auto_refresh=False) as live:
        while not _ended(doc):
            time.sleep(seconds)
            doc, view = _snapshot(db, _run_of(doc, run_id), admitted)
            live.update(view, refresh=True)
    return doc


@app.command("dashboard")
def dashboard(
    db: str | None = typer.Option(None, "--db", help="registry: SQLite file path or SQLAlchemy URL"),
    config: Path | None = typer.Option(None, "--config", "-c", help="server.toml: its registry and TLS certificate"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (anything but loopback needs TLS)"),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="TCP port"),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="PEM certificate (default with --config and a non-loopback --host: server_cert)"
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="its PEM private key (default: server_key)"),
) -> None:
    """Serve a read-only live page of the registry's runs (rounds, sites, failures, ε, metric plots).

    Bound to 127.0.0.1 by default; another --host is refused without TLS (--tls-cert/--tls-key, or the
    coordinator's certificate from --config). JSON at /api/runs and /api/runs/ID (as `server status
    --json`). Exit status: 2 bad --db/--config/--host without TLS, 6 not a lungvl registry, 8 the
    `dashboard` extra is not installed, 130 Ctrl-C.
    """
    try:
        from server.dashboard import check_bind, check_registry, is_loopback, serve
    except ModuleNotFoundError as e:  # the `dashboard` extra is not installed
        print_error(f"missing Python package {e.name!r}: pip install 'lungvl[dashboard]' (FastAPI + uvicorn)")
        raise typer.Exit(errors.MISSING_DEPENDENCY) from e

    url, cfg = _registry_of(db, config)
    if cfg is not None and tls_cert is None and tls_key is None and not is_loopback(host):
        tls_cert, tls_key = cfg.server_cert, cfg.server_key
    check_bind(host, tls_cert, tls_key)
    shown = check_registry(url)
    scheme = "http" if tls_cert is None else "https"
    where = f"[{host}]" if ":" in host else host
    out.print(
        f"dashboard of {shown} on {scheme}://{where}:{port}/ (Ctrl-C to stop)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    serve(url, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)

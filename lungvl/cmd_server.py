"""``lungvl server``: what the consortium coordinator runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lungvl.console import out, print_error

app = typer.Typer(help="Consortium server commands.", no_args_is_help=True)


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
) -> None:
    """Start the SuperLink (TLS, SuperNode auth), admit the configured sites and run the federation.

    Exit status 3 when another process holds the run directory, 2 when a resume is refused (e.g. a
    checkpoint file that differs from its recorded sha256), 1 when the run failed.
    """
    from server.app import ResumeRefused
    from server.deploy import start_server
    from server.run_lock import RunDirBusy

    cfg = _load(config)
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
    out.print(f"admitted {entry['name']}: key {entry['fingerprint']}, node {entry['node_id']}", highlight=False)


@app.command("status")
def status(
    db: str = typer.Option("registry.db", "--db", help="registry: SQLite file path or SQLAlchemy URL"),
    run_id: int | None = typer.Option(None, "--run", help="run id (default: the latest run)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="server.toml: its registry and admitted sites"),
) -> None:
    """Rounds, sites, failures, epsilon spent and latest metrics of a run from the registry."""
    from server.registry import Registry
    from server.status import render_status

    admitted: list[dict[str, str]] = []
    if config is not None:
        from server.deploy import admitted_sites

        cfg = _load(config)
        db = cfg.registry_url
        admitted = admitted_sites(cfg.run_dir)
    if "://" not in db and not Path(db).exists():
        print_error(f"no registry at {db} (give --db PATH or URL, or --config server.toml)")
        raise typer.Exit(2)
    with Registry(db, read_only=True) as reg:
        out.print(*render_status(reg, run_id))
    if config is not None:
        t = Table(title=f"Admitted sites ({len(admitted)})")
        for col in ("name", "key fingerprint", "node id", "admitted at"):
            t.add_column(col)
        for a in admitted:
            t.add_row(a["name"], a["fingerprint"], a["node_id"], a["admitted_at"])
        out.print(t)

"""``lungvl consortium``: what the consortium coordinator runs once, to set the consortium up."""

from __future__ import annotations

from pathlib import Path

import typer

from lungvl.console import out

app = typer.Typer(help="Consortium set-up: startup kits for the coordinator and every site.", no_args_is_help=True)


@app.command("init")
def init(
    names: list[str] = typer.Argument(None, help="site names (also accepted after --sites)", show_default=False),
    sites: list[str] = typer.Option(
        None, "--sites", help="site names: --sites a b c (1-64 letters, digits, - or _; unique)", show_default=False
    ),
    superlink: str | None = typer.Option(
        None, "--superlink", help="HOST:PORT the sites dial (IPv6: [ADDR]:PORT); HOST goes on the server certificate"
    ),
    out_dir: Path = typer.Option(..., "--out", help="the kit folder to create (new or empty; never overwritten)"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="consortium.toml to build from (e.g. an earlier kit's); options override it"
    ),
    bind: str | None = typer.Option(None, "--bind", help="the SuperLink's bind address (default 0.0.0.0)"),
    init_model: Path | None = typer.Option(
        None, "--init-model", help="the initial model package (folder with model.pt), copied into every kit"
    ),
    hostname: list[str] = typer.Option(
        None, "--hostname", help="another DNS name or IP for the server certificate (repeatable)", show_default=False
    ),
    runtime_port: list[str] = typer.Option(
        None,
        "--runtime-port",
        help="NAME=PORT: a site's local SuperNode port (default 9094; sites sharing a host need distinct ones)",
        show_default=False,
    ),
    name: str | None = typer.Option(None, "--name", help="the consortium's run name (default: consortium)"),
) -> None:
    """Create the consortium CA, the coordinator's kit and one kit per site, in one folder.

    Writes OUT/server (server.toml admitting every site's public key, the server certificate and key,
    the CA certificate, README with the start command), OUT/sites/NAME (site.toml pointing at the
    SuperLink and the CA, the CA certificate, the node key pair, README with the join command), OUT/ca
    (the CA's private key: keep it offline) and OUT/consortium.toml (the resolved config). Private keys
    are mode 0600.

    Rebuilding with --config OUT/consortium.toml gives the same layout and the same TOML files, with new
    keys and certificates. Exit status 2 for a bad name, address or value, or an OUT that is not empty.
    """  # no square brackets here: --help renders this docstring as rich markup
    from lungvl.consortium import parse_assignments, resolve_config
    from lungvl.consortium_kits import build_kits

    cfg = resolve_config(
        config,
        superlink=superlink,
        site_names=[*(sites or []), *(names or [])],
        runtime_ports=parse_assignments(runtime_port or [], "--runtime-port"),
        bind=bind,
        init_model=init_model,
        hostnames=hostname or [],
        name=name,
    )  # a bad value: ValueError/KeyError, exit 2 with one line (lungvl.errors)
    paths = build_kits(cfg, out_dir)
    root = paths["out"]

    def say(line: str) -> None:
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    say(f"consortium {cfg.name}: {len(cfg.sites)} site(s), SuperLink {cfg.superlink}; kits in {root}")
    say(f"  coordinator: lungvl server start --config {paths['server'] / 'server.toml'}")
    for site in cfg.sites:
        say(f"  site {site.name}: {paths['site:' + site.name]} (copy into its site directory; README.md)")
    say(f"  CA private key: {paths['ca'] / 'ca.key'} (keep offline)")
    say(f"  config: {paths['config']} (rebuild with --config: same TOML, new keys)")

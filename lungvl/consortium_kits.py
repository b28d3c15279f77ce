"""Write the startup kits of a :class:`~lungvl.consortium.ConsortiumConfig` (layout: :mod:`lungvl.consortium`).

The kit folder is built in a temporary folder beside ``out`` and renamed into place once complete, so a
failed build leaves nothing behind; every TOML file written is read back by the reader that will use it
(:class:`~client.deploy.SiteDeployConfig`, :class:`~server.deploy.ServerDeployConfig`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from client.deploy import SiteDeployConfig
from federation import pki
from lungvl.consortium import CONFIG_FILE, ConsortiumConfig, SiteSpec
from lungvl.consortium_docs import ca_readme, kit_readme, server_readme, site_readme
from lungvl_model.data.site_layout import toml_dumps
from server.deploy import ServerDeployConfig

__all__ = ["build_kits", "check_out_dir", "server_toml", "site_toml"]


def check_out_dir(out: Path) -> None:
    """Refuse an ``out`` that exists and is not an empty folder (``FileExistsError`` naming it)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "not empty"
        raise FileExistsError(f"--out {out} is {what}: consortium init never overwrites a kit; give a new folder")


def _copy_model(src: Path | None, dest: Path) -> None:
    if src is not None:
        shutil.copytree(src, dest)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def site_toml(cfg: ConsortiumConfig, site: SiteSpec) -> dict[str, Any]:
    """The site's ``site.toml`` (paths relative to the site directory the kit is copied into)."""
    return {
        "site": {"name": site.name, "cohort": site.cohort},
        "privacy": {"epsilon_budget": 8.0, "delta": 1e-5},
        "compute": {"device": "auto"},
        "federation": {
            "superlink": cfg.superlink,
            "root_certificates": pki.CA_CERT,
            "private_key": f"keys/{pki.NODE_PRIVATE_KEY}",
            "runtime_port": site.runtime_port,
            "model_dir": "initial_model",
        },
    }


def server_toml(cfg: ConsortiumConfig) -> dict[str, Any]:
    """The coordinator's ``server.toml``: the ServerConfig tables and ``[deployment]`` admitting every site."""
    return {
        **cfg.server.to_tables(),
        "deployment": {
            "run_dir": "run",
            "host": cfg.bind,
            "port": cfg.port,
            "ca_cert": pki.CA_CERT,
            "server_cert": pki.SERVER_CERT,
            "server_key": pki.SERVER_KEY,
            "init_model": "initial_model",
            "admit": [f"admitted/{s.name}/{pki.NODE_PUBLIC_KEY}" for s in cfg.sites],
            "registry": "",
            "run_name": cfg.name,
        },
    }


def _header(what: str) -> str:
    return f"# {what}: written by `lungvl consortium init` (rebuild: --config consortium.toml; keys are new).\n"


def build_kits(cfg: ConsortiumConfig, out: str | Path) -> dict[str, Path]:
    """Write the consortium's kits into ``out`` (a new or empty folder).

    Args:
        cfg: the consortium.
        out: the kit folder; built in a temporary folder beside it and renamed into place when complete.

    Returns:
        ``{"out", "ca", "server", "config", "site:<name>"...}`` -> path.

    Raises:
        FileExistsError: ``out`` is a file or a non-empty folder.
    """
    out = Path(out).expanduser().absolute()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _build(cfg, tmp)
        check_out_dir(out)  # still new or empty: another process did not write there meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {"out": out, "ca": out / "ca", "server": out / "server", "config": out / CONFIG_FILE}
    paths.update({f"site:{s.name}": out / "sites" / s.name for s in cfg.sites})
    return paths


def _build(cfg: ConsortiumConfig, root: Path) -> None:
    os.chmod(root, 0o755)  # mkdtemp made it 0700; the kit folder is an ordinary folder
    ca_dir, server_dir = root / "ca", root / "server"
    ca_dir.mkdir(mode=0o700)
    server_dir.mkdir()
    ca_cert, ca_key = pki.new_ca(org=cfg.org)
    pki.write_private_key(ca_dir / pki.CA_KEY, ca_key)
    pki.write_cert(ca_dir / pki.CA_CERT, ca_cert)
    cert, key = pki.new_server_cert(ca_cert, ca_key, [cfg.host, *cfg.hostnames], org=cfg.org, days=cfg.server_cert_days)
    pki.write_cert(server_dir / pki.SERVER_CERT, cert)
    pki.write_private_key(server_dir / pki.SERVER_KEY, key)
    pki.write_cert(server_dir / pki.CA_CERT, ca_cert)
    fingerprints: dict[str, str] = {}
    for site in cfg.sites:
        kit = root / "sites" / site.name
        _, public = pki.write_node_key_pair(kit / "keys")
        pki.write_cert(kit / pki.CA_CERT, ca_cert)
        admitted = server_dir / "admitted" / site.name
        admitted.mkdir(parents=True)
        shutil.copyfile(public, admitted / pki.NODE_PUBLIC_KEY)
        fingerprints[site.name] = pki.public_key_fingerprint(public)
        _write(kit / "site.toml", _header(f"site {site.name}") + toml_dumps(site_toml(cfg, site)))
        _copy_model(cfg.init_model, kit / "initial_model")
        _write(kit / "README.md", site_readme(cfg, site, fingerprints[site.name], ca_cert))
        SiteDeployConfig.from_toml(kit / "site.toml")  # what `site join` reads parses (no file is opened)
    _write(server_dir / "server.toml", _header("coordinator") + toml_dumps(server_toml(cfg)))
    _copy_model(cfg.init_model, server_dir / "initial_model")
    _write(server_dir / "README.md", server_readme(cfg, fingerprints, ca_cert))
    ServerDeployConfig.from_toml(server_dir / "server.toml")  # what `server start` reads parses
    _write(ca_dir / "README.md", ca_readme(cfg, ca_cert))
    _write(root / CONFIG_FILE, _header("consortium") + toml_dumps(cfg.to_toml_dict()))
    _write(root / "README.md", kit_readme(cfg))

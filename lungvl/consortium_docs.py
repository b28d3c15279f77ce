"""The README of each startup kit ``lungvl consortium init`` writes (:mod:`lungvl.consortium`).

Each says what the folder holds, the one command to run, and what to keep secret. No timestamps or key
fingerprints go into the TOML files (a rebuild from the same config gives the same TOML); the READMEs
carry the fingerprints of this build's keys, so they differ between builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from federation import pki
from lungvl_model.version import software_version

if TYPE_CHECKING:
    from lungvl.consortium import ConsortiumConfig, SiteSpec

__all__ = ["ca_readme", "kit_readme", "server_readme", "site_readme"]

REBUILD_NOTE = (
    "Rebuilding from `consortium.toml` (`lungvl consortium init --config consortium.toml --out NEW_FOLDER`) "
    "gives the same layout and the same TOML files, with **new** keys and certificates: every kit of the old "
    "build (the CA, the server certificate, every site's key) must then be replaced together."
)


def _server_names(cfg: ConsortiumConfig) -> list[str]:
    """The server certificate's names, as :func:`federation.pki.subject_alt_names` puts them (no repeats)."""
    names = [cfg.host.strip("[]"), *cfg.hostnames, *pki.LOOPBACK_NAMES]
    return list(dict.fromkeys(names))


def _renew_args(cfg: ConsortiumConfig) -> str:
    """``--hostname``/``--ip`` options of infra/make_certs.py for the same names."""
    hosts = list(dict.fromkeys([cfg.host, *cfg.hostnames]))
    return " ".join(f"--ip {h.strip('[]')}" if pki.is_ip(h) else f"--hostname {h}" for h in hosts)


def ca_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate (DER), colon-separated hex, as ``openssl x509 -fingerprint -sha256`` shows it."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def _model_line(cfg: ConsortiumConfig) -> str:
    if cfg.init_model is None:
        return (
            "- `initial_model/`: **not included** (no `--init-model` was given): put the consortium's initial "
            "model package (a folder with `model.pt`) here before starting."
        )
    return f"- `initial_model/`: the consortium's initial model package (copied from `{cfg.init_model}`)."


def site_readme(cfg: ConsortiumConfig, site: SiteSpec, fingerprint: str, ca: x509.Certificate) -> str:
    """README of ``sites/<name>/``."""
    return f"""# lungvl startup kit: site `{site.name}`

Consortium `{cfg.name}`; the coordinator's SuperLink is `{cfg.superlink}` (outbound HTTPS only; no inbound
port at the site). Built by `lungvl consortium init` (lungvl {software_version()}).

## What this folder holds

- `site.toml`: this site's settings. `[site]` name `{site.name}`, cohort `{site.cohort}`; `[privacy]` the
  site's own patient-level ε budget and policy (defaults: set yours; every key is listed in lungvl's
  `infra/site.toml`); `[federation]` the SuperLink address, the CA, the node key, the local SuperNode
  port `{site.runtime_port}` and the model package. Relative paths are relative to the folder holding site.toml.
- `ca.crt`: the consortium CA certificate; it verifies the SuperLink (SHA-256 `{ca_fingerprint(ca)}`:
  compare it with the coordinator by phone).
- `keys/site_key`: this site's private node key (mode 0600). It never leaves the site.
- `keys/site_key.pub`: its public half, already admitted in the coordinator's server.toml
  (fingerprint `{fingerprint}`, as `lungvl server status --config server.toml` lists it).
{_model_line(cfg)}

## Install and run

Copy everything in this folder into the site directory (the folder with `dicom/` and `reports.jsonl`,
DESIGN.md section 2): site.toml belongs there, and its paths are resolved from there. Check the data
with `lungvl site check SITE_DIR`, then run the one command:

    lungvl site join --config SITE_DIR/site.toml

It checks the CA, the key, the model package, the data and the budget, then the SuperLink, and keeps the
site connected (run it under systemd or a container with a restart policy; `infra/` has both).

This key pair was made on the coordinator's machine. To keep a key only the site has ever seen, run
`lungvl site keys --out SITE_DIR/keys --overwrite` and send the new `site_key.pub` to the coordinator
(`lungvl server admit site_key.pub --config server.toml`). {REBUILD_NOTE}
"""


def server_readme(cfg: ConsortiumConfig, fingerprints: dict[str, str], ca: x509.Certificate) -> str:
    """README of ``server/``."""
    rows = "\n".join(f"| `{name}` | `admitted/{name}/site_key.pub` | `{fp}` |" for name, fp in fingerprints.items())
    return f"""# lungvl startup kit: the coordinator's SuperLink

Consortium `{cfg.name}`: the sites dial `{cfg.superlink}`; the SuperLink binds `{cfg.bind}:{cfg.port}`
(its one HTTPS port: open it to the sites' egress addresses only). Built by `lungvl consortium init`
(lungvl {software_version()}).

## What this folder holds

- `server.toml`: the run's settings (`[strategy]`, `[dp]`, `[training]`) and `[deployment]`: bind
  address and port, the certificates below, the initial model, the run directory (`run/`: registry,
  checkpoints, logs) and `admit`, the sites' public keys registered when the server starts.
- `server.crt` / `server.key`: the SuperLink's certificate, signed by the consortium CA, naming
  {", ".join(f"`{n}`" for n in _server_names(cfg))}; `server.key` is mode 0600 and stays here.
- `ca.crt`: the consortium CA certificate (SHA-256 `{ca_fingerprint(ca)}`); the CA's private key is
  in `../ca/`, which does not belong on this machine.
- `admitted/`: the sites' public keys:

| site | key file | fingerprint |
|---|---|---|
{rows}

{_model_line(cfg)}

## Run

    lungvl server start --config server.toml

Afterwards `lungvl server status --config server.toml`; after a crash
`lungvl server start --config server.toml --resume`; a site added later: `lungvl server admit
SITE_KEY.pub --config server.toml` while the server runs. {REBUILD_NOTE}
"""


def ca_readme(cfg: ConsortiumConfig, ca: x509.Certificate) -> str:
    """README of ``ca/``."""
    return f"""# The consortium CA of `{cfg.name}`: keep offline

`ca.key` is the consortium CA's private key (mode 0600); `ca.crt` its certificate (SHA-256
`{ca_fingerprint(ca)}`, valid until {ca.not_valid_after_utc:%Y-%m-%d}). Whoever holds `ca.key` can
impersonate the SuperLink to every site. Move this folder off the build machine to offline storage
(an encrypted USB key in a safe); it is needed only to sign a new server certificate:

    python infra/make_certs.py --out CA_FOLDER_COPY {_renew_args(cfg)}

(with `ca.crt` and `ca.key` in that folder the CA is reused, so the sites' `ca.crt` stays valid).
"""


def kit_readme(cfg: ConsortiumConfig) -> str:
    """README at the top of the kit folder."""
    sites = "\n".join(f"- `sites/{s.name}/`: the kit of site `{s.name}`" for s in cfg.sites)
    return f"""# lungvl consortium `{cfg.name}`: startup kits

Built by `lungvl consortium init` (lungvl {software_version()}) from `consortium.toml` (the resolved config).

- `server/`: the coordinator's kit: `lungvl server start --config server/server.toml`
{sites}
  (send each its folder over a channel that keeps `keys/site_key` secret, then delete it here)
- `ca/`: the CA's private key: keep offline, not on the SuperLink's machine

{REBUILD_NOTE}
"""

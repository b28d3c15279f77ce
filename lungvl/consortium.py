"""Consortium startup kits: one command makes the CA, the SuperLink's kit and one kit per site.

``lungvl consortium init`` calls :func:`lungvl.consortium_kits.build_kits` with a :class:`ConsortiumConfig` read from a
``consortium.toml`` (:meth:`ConsortiumConfig.from_toml`) and/or built from command-line options::

    [consortium]
    name = "consortium"                 # the run's name in the registry
    superlink = "superlink.example.org:9093"   # HOST:PORT every site dials (on the server certificate)
    bind = "0.0.0.0"                    # the SuperLink's bind address ([deployment] host of server.toml)
    hostnames = []                      # more DNS names / IPs for the server certificate
    org = "lungvl"                      # organisation in the certificates
    server_cert_days = 825
    init_model = "/srv/models/initial_model"   # the initial model package, copied into every kit ("" = none)

    [sites.hospital-a]                  # one table per site, in this order
    cohort = "screening"
    runtime_port = 9094                 # the site's local SuperNode Runtime API port (loopback)

    [strategy] / [dp] / [training]      # server/config.py::ServerConfig, written into server.toml

The kit folder it writes (``kits/``)::

    consortium.toml                     the resolved config (rebuild: --config kits/consortium.toml)
    ca/ca.key, ca/ca.crt, README.md     the CA's private key: keep offline
    server/server.toml, ca.crt, server.crt, server.key, admitted/<site>/site_key.pub, initial_model/, README.md
    sites/<site>/site.toml, ca.crt, keys/site_key, keys/site_key.pub, initial_model/, README.md

A rebuild from the same config gives the same layout and byte-identical TOML files; every key and
certificate is new. Private keys are created with mode 0600. Nothing is written into a non-empty folder,
and the kit appears only once complete (it is built beside ``out`` and renamed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from federation import pki
from lungvl_model.config_file import read_toml, reject_unknown_keys
from server.config import ServerConfig

__all__ = [
    "CONSORTIUM_KEYS",
    "SITE_KEYS",
    "ConsortiumConfig",
    "SiteSpec",
    "check_site_name",
    "resolve_config",
]

CONSORTIUM_KEYS: Final = ("name", "superlink", "bind", "hostnames", "org", "server_cert_days", "init_model")
SITE_KEYS: Final = ("cohort", "runtime_port")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_RUNTIME_PORT: Final = 9094
CONFIG_FILE: Final = "consortium.toml"


def check_site_name(name: str) -> str:
    """``name`` if it is a usable site name (a folder name and a TOML key), else ``ValueError`` naming it."""
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise ValueError(
            f"site name {name!r} is not usable: 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def _check_port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{what} must be a port number from 1 to 65535, got {value!r}")
    return value


@dataclass(frozen=True)
class SiteSpec:
    """One site of the consortium.

    Attributes:
        name: unique in the consortium; the folder ``sites/<name>`` and ``[site] name`` of its site.toml.
        cohort: ``[site] cohort`` (``screening``, ``referral``, ``low_resource``, ``lidc`` or free text).
        runtime_port: the site's local SuperNode Runtime API port (``[federation] runtime_port``).
    """

    name: str
    cohort: str = "screening"
    runtime_port: int = DEFAULT_RUNTIME_PORT

    def __post_init__(self) -> None:
        check_site_name(self.name)
        if not isinstance(self.cohort, str) or not self.cohort.strip():
            raise ValueError(f"site {self.name!r}: cohort must be a non-empty string, got {self.cohort!r}")
        _check_port(self.runtime_port, f"site {self.name!r}: runtime_port")


@dataclass(frozen=True)
class ConsortiumConfig:
    """What a consortium's kits are built from (the module docstring shows its TOML).

    Attributes:
        superlink: ``HOST:PORT`` the sites dial; HOST goes on the server certificate.
        sites: the sites, in kit order (names unique, case-insensitively).
        name: the run's name (``[deployment] run_name``).
        bind: the SuperLink's bind address.
        hostnames: more DNS names / IP addresses for the server certificate.
        org: organisation name in the certificates.
        server_cert_days: the server certificate's validity.
        init_model: the consortium's initial model package (a folder with ``model.pt``), copied into the
            server's and every site's kit; ``None``: the kits expect it at ``initial_model/``.
        server: the run's settings (server.toml's ServerConfig tables).
    """

    superlink: str
    sites: tuple[SiteSpec, ...]
    name: str = "consortium"
    bind: str = "0.0.0.0"
    hostnames: tuple[str, ...] = ()
    org: str = "lungvl"
    server_cert_days: int = pki.SERVER_DAYS
    init_model: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        host, port = pki.parse_address(self.superlink)
        object.__setattr__(self, "superlink", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "hostnames", tuple(self.hostnames))
        if not self.sites:
            raise ValueError("a consortium needs at least one site (--sites NAME ...)")
        seen: dict[str, str] = {}
        for site in self.sites:
            if site.name.lower() in seen:
                raise ValueError(f"site name {site.name!r} is given twice (as {seen[site.name.lower()]!r} too)")
            seen[site.name.lower()] = site.name
        if not isinstance(self.name, str) or not _SITE_NAME.match(self.name):
            raise ValueError(f"consortium name {self.name!r} must be 1-64 letters, digits, '-' or '_'")
        if not pki.is_ip(self.bind) and self.bind != "localhost":
            raise ValueError(f"bind {self.bind!r} must be an IP address (0.0.0.0: every interface) or localhost")
        pki.subject_alt_names([host, *self.hostnames])  # each extra name checked here, named in the error
        if not isinstance(self.org, str) or not self.org.strip():
            raise ValueError(f"org must be a non-empty string, got {self.org!r}")
        if isinstance(self.server_cert_days, bool) or not isinstance(self.server_cert_days, int):
            raise ValueError(f"server_cert_days must be a whole number, got {self.server_cert_days!r}")
        if self.server_cert_days < 1:
            raise ValueError(f"server_cert_days must be >= 1, got {self.server_cert_days!r}")
        if self.init_model is not None:
            model = Path(self.init_model).expanduser().absolute()
            if not (model / "model.pt").is_file():
                raise FileNotFoundError(f"init_model {model}: no model.pt there (an initial model package)")
            object.__setattr__(self, "init_model", model)

    @property
    def host(self) -> str:
        """The SuperLink's host name or IP (no brackets)."""
        return pki.parse_address(self.superlink)[0]

    @property
    def port(self) -> int:
        """The SuperLink's port."""
        return pki.parse_address(self.superlink)[1]

    def to_toml_dict(self) -> dict[str, Any]:
        """The resolved config as a TOML document (:meth:`from_mapping` reads it back)."""
        tables: dict[str, Any] = {
            "consortium": {
                "name": self.name,
                "superlink": self.superlink,
                "bind": self.bind,
                "hostnames": list(self.hostnames),
                "org": self.org,
                "server_cert_days": self.server_cert_days,
                "init_model": "" if self.init_model is None else str(self.init_model),
            },
            "sites": {s.name: {"cohort": s.cohort, "runtime_port": s.runtime_port} for s in self.sites},
        }
        tables.update(self.server.to_tables())
        return tables

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], *, base: Path | None = None, where: str = "") -> ConsortiumConfig:
        """Build from a parsed ``consortium.toml`` (relative ``init_model``: to ``base``).

        Raises:
            KeyError: an unknown table or key (with a "did you mean"), naming ``where``.
            ValueError: a bad value, naming ``where``, the key and the value.
        """
        prefix = f"{where}: " if where else ""
        try:
            return cls._from_mapping(doc, base)
        except (KeyError, ValueError) as err:
            raise type(err)(prefix + str(err.args[0] if err.args else err)) from None

    @classmethod
    def _from_mapping(cls, doc: Mapping[str, Any], base: Path | None) -> ConsortiumConfig:
        top = doc.get("consortium", {})
        if not isinstance(top, Mapping):
            raise ValueError(f"[consortium] must be a table, got {top!r}")
        reject_unknown_keys(top, CONSORTIUM_KEYS, "[consortium]")
        sites_doc = doc.get("sites", {})
        if not isinstance(sites_doc, Mapping) or not all(isinstance(v, Mapping) for v in sites_doc.values()):
            raise ValueError("[sites] must hold one table per site, e.g. [sites.hospital-a]")
        sites = []
        for name, values in sites_doc.items():
            reject_unknown_keys(values, SITE_KEYS, f"[sites.{name}]")
            sites.append(SiteSpec(name=name, **values))
        server = ServerConfig.from_mapping(doc, ignore=("consortium", "sites"))
        kw: dict[str, Any] = {k: top[k] for k in CONSORTIUM_KEYS if k in top}
        if "hostnames" in kw:
            if not isinstance(kw["hostnames"], list) or not all(isinstance(h, str) for h in kw["hostnames"]):
                raise ValueError(f"[consortium] hostnames must be a list of strings, got {kw['hostnames']!r}")
            kw["hostnames"] = tuple(kw["hostnames"])
        model = kw.pop("init_model", "")
        if model:
            p = Path(str(model)).expanduser()
            kw["init_model"] = p if p.is_absolute() or base is None else base / p
        if not kw.get("superlink"):
            raise KeyError("[consortium] lacks 'superlink' (HOST:PORT; or give --superlink)")
        return cls(sites=tuple(sites), server=server, **kw)

    @classmethod
    def from_toml(cls, path: str | Path) -> ConsortiumConfig:
        """Read ``consortium.toml`` (see the module docstring)."""
        p = Path(path).expanduser()
        return cls.from_mapping(read_toml(p, what="consortium config"), base=p.parent.absolute(), where=str(p))


def resolve_config(
    config: Path | None = None,
    *,
    superlink: str | None = None,
    site_names: Sequence[str] = (),
    runtime_ports: Mapping[str, int] | None = None,
    bind: str | None = None,
    init_model: Path | None = None,
    hostnames: Sequence[str] = (),
    name: str | None = None,
) -> ConsortiumConfig:
    """The consortium from ``config`` (a consortium.toml, optional) with command-line values on top.

    Args:
        config: a consortium.toml.
        superlink: ``HOST:PORT`` (replaces ``[consortium] superlink``).
        site_names: the sites (replaces the list; a site the file describes keeps its settings).
        runtime_ports: site name -> its SuperNode Runtime API port.
        bind: the SuperLink's bind address.
        init_model: the initial model package (relative: to the working directory).
        hostnames: more names for the server certificate (replace the file's).
        name: the consortium's run name.

    Raises:
        KeyError / ValueError: a bad value, a port for an unknown site, an unknown key; naming the value
            and, for a file's, the file.
        FileNotFoundError: no such config file or initial model package.
    """
    doc: dict[str, Any] = {}
    base: Path | None = None
    if config is not None:
        p = Path(config).expanduser()
        doc, base = read_toml(p, what="consortium config"), p.parent.absolute()
    top = doc.setdefault("consortium", {})
    sites = doc.setdefault("sites", {})
    if not isinstance(top, dict) or not isinstance(sites, dict):
        raise ValueError(f"{config}: [consortium] and [sites] must be tables")
    for key, value in (("superlink", superlink), ("bind", bind), ("name", name)):
        if value is not None:
            top[key] = value
    if init_model is not None:
        top["init_model"] = str(Path(init_model).expanduser().absolute())
    if hostnames:
        top["hostnames"] = list(hostnames)
    if site_names:
        for n in site_names:
            check_site_name(n)
            if list(site_names).count(n) > 1:
                raise ValueError(f"site name {n!r} is given twice")
        doc["sites"] = sites = {n: sites.get(n, {}) for n in site_names}
    for site, port in (runtime_ports or {}).items():
        if site not in sites:
            raise ValueError(f"--runtime-port {site}={port}: no site {site!r} (sites: {', '.join(sites) or 'none'})")
        sites[site] = {**sites[site], "runtime_port": port}
    if not sites:
        raise ValueError("a consortium needs at least one site: give --sites NAME ... (or [sites.NAME] tables)")
    return ConsortiumConfig.from_mapping(doc, base=base, where="" if config is None else str(config))


def parse_assignments(values: Sequence[str], what: str) -> dict[str, int]:
    """``["a=9095", ...]`` -> ``{"a": 9095}`` for ``--runtime-port``; ``ValueError`` naming a bad one."""
    out: dict[str, int] = {}
    for item in values:
        name, sep, port = item.partition("=")
        if not sep or not name or not port.strip().isdigit():
            raise ValueError(f"{what} {item!r} must be NAME=PORT, e.g. hospital-a=9094")
        out[name] = _check_port(int(port), f"{what} {item!r}")
    return out

"""The consortium server in deployment: ``flower-superlink`` (TLS + SuperNode auth) and the lungvl run on it.

``lungvl server start`` / ``lungvl server admit`` call these. ``server.toml`` holds the
:class:`~server.config.ServerConfig` tables and a ``[deployment]`` table (relative paths: to the file)::

    [deployment]
    run_dir = "runs/consortium"        # checkpoints, registry.db, superlink.db, logs, Flower home
    host = "0.0.0.0"                   # SuperLink bind address (sites dial it)
    port = 9093                        # the SuperLink's one HTTPS port (Fleet, Control and Runtime APIs)
    ca_cert = "certs/ca.crt"           # infra/make_certs.py writes these three
    server_cert = "certs/server.crt"
    server_key = "certs/server.key"
    init_model = "models/initial_model"
    admit = ["keys/hospital-a.pub"]    # site public keys registered at start (also: lungvl server admit)
    registry = ""                      # SQLAlchemy URL or path (default <run_dir>/registry.db)
    run_name = ""                      # default: the run directory's name

Flower 1.42 facts this relies on (checked against the installed flwr): ``flower-superlink`` serves the
Fleet, Control and Runtime APIs as protobuf over HTTPS on one port (``--host``/``--port``; the gRPC
Fleet API is gone); ``--enable-supernode-auth`` turns off self-registration, so only SuperNodes whose
public keys were registered through the Control API (``flwr supernode register``) may activate;
``--disable-runtime-dependency-installation`` keeps the SuperExec from running ``uv sync``; ``flwr run
<app> <connection>`` reads the connection from ``$FLWR_HOME/config.toml``. The run's Flower App is a
generated ``<run_dir>/app/pyproject.toml`` naming the installed ``server.app:app``/``client.app:app``
(no code travels in the FAB, and the repository's pyproject is never migrated by ``flwr run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.processes import stop_process
from lungvl_model.config_file import read_toml, reject_unknown_keys
from lungvl_model.data.site_layout import toml_dumps
from lungvl_model.errors import CorruptStateError
from server.app import RUN_FILE, check_resume
from server.config import ServerConfig
from server.registry import Registry
from server.run_lock import RunDirLock
from server.run_outputs import SitesTable, write_run_outputs

__all__ = [
    "ADMITTED_FILE",
    "CONNECTION",
    "DEPLOYMENT_KEYS",
    "ServerDeployConfig",
    "admit_site",
    "admitted_sites",
    "launch_run",
    "write_deployment_outputs",
    "start_server",
    "start_superlink",
    "stop_process",
    "superlink_command",
]

Log = Callable[[str], None]
#: Name of the SuperLink connection written to ``<run_dir>/flwr/config.toml``.
CONNECTION: Final = "lungvl"
ADMITTED_FILE: Final = "admitted_sites.json"
DEPLOYMENT_KEYS: Final = (
    "run_dir",
    "host",
    "port",
    "ca_cert",
    "server_cert",
    "server_key",
    "init_model",
    "admit",
    "registry",
    "run_name",
)


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass(frozen=True)
class ServerDeployConfig:
    """The consortium server's deployment settings plus its :class:`ServerConfig` (see the module docstring)."""

    server: ServerConfig
    run_dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    init_model: Path
    host: str = "127.0.0.1"
    port: int = 9093
    admit: tuple[Path, ...] = ()
    registry: str = ""
    run_name: str = ""
    source: Path | None = field(default=None, compare=False)

    @property
    def registry_url(self) -> str:
        """The registry (default ``<run_dir>/registry.db``)."""
        return self.registry or str(self.run_dir / "registry.db")

    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` of the coordinator's Flower processes and CLI calls."""
        return self.run_dir / "flwr"

    @property
    def control_address(self) -> str:
        """Where the coordinator's own tools reach the SuperLink (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerDeployConfig:
        """Read ``server.toml`` (ServerConfig tables + ``[deployment]``).

        Raises:
            FileNotFoundError: no such file.
            KeyError: an unknown key (with a "did you mean") or a missing required one.
            ValueError: a bad value, naming the key and the value.
        """
        p = Path(path).expanduser()
        doc = read_toml(p, what="server config")
        try:
            server = ServerConfig.from_mapping(doc, ignore=("deployment",))
        except (KeyError, ValueError) as err:
            raise type(err)(f"{p}: {err.args[0] if err.args else err}") from None
        dep = doc.get("deployment", {})
        if not isinstance(dep, dict):
            raise ValueError(f"{p}: [deployment] must be a table, got {dep!r}")
        reject_unknown_keys(dep, DEPLOYMENT_KEYS, f"{p}: [deployment]")
        missing = [k for k in ("ca_cert", "server_cert", "server_key", "init_model") if not dep.get(k)]
        if missing:
            raise KeyError(f"{p}: [deployment] lacks {missing}")

        def resolve(value: Any) -> Path:
            q = Path(str(value)).expanduser()
            return (q if q.is_absolute() else p.parent / q).resolve()

        port = dep.get("port", 9093)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{p}: [deployment] port must be a port number, got {port!r}")
        admit = dep.get("admit", [])
        if not isinstance(admit, list):
            raise ValueError(f"{p}: [deployment] admit must be a list of public key files, got {admit!r}")
        registry = str(dep.get("registry", ""))
        if registry and "://" not in registry:
            registry = str(resolve(registry))
        return cls(
            server=server,
            run_dir=resolve(dep.get("run_dir", "runs/consortium")),
            ca_cert=resolve(dep["ca_cert"]),
            server_cert=resolve(dep["server_cert"]),
            server_key=resolve(dep["server_key"]),
            init_model=resolve(dep["init_model"]),
            host=str(dep.get("host", "127.0.0.1")),
            port=port,
            admit=tuple(resolve(a) for a in admit),
            registry=registry,
            run_name=str(dep.get("run_name", "")),
            source=p,
        )

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming the first missing certificate, key or model package."""
        for name in ("ca_cert", "server_cert", "server_key"):
            if not getattr(self, name).is_file():
                raise FileNotFoundError(f"[deployment] {name}: {getattr(self, name)} does not exist")
        if not (self.init_model / "model.pt").is_file():
            raise FileNotFoundError(f"[deployment] init_model: no model.pt in {self.init_model}")


def server_env(cfg: ServerDeployConfig) -> dict[str, str]:
    """Environment of the coordinator's Flower processes: telemetry off, scratch under the run directory."""
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_HOME=str(cfg.flwr_home),
        MPLCONFIGDIR=str(cfg.run_dir / "mpl"),
        HF_HOME=str(cfg.run_dir / "hf"),
        UV_CACHE_DIR=str(cfg.run_dir / "uv"),
        PYTHONUNBUFFERED="1",  # log lines reach the log files even when a process is killed
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec etc.
    return env


def superlink_command(cfg: ServerDeployConfig) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode auth, no runtime installs and its state DB in the run dir."""
    return [
        _bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(cfg.ca_cert),
        "--ssl-certfile",
        str(cfg.server_cert),
        "--ssl-keyfile",
        str(cfg.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(cfg.run_dir / "superlink.db"),
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
    ]


def _write_flwr_config(cfg: ServerDeployConfig) -> None:
    cfg.flwr_home.mkdir(parents=True, exist_ok=True)
    doc = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": cfg.control_address, "root-certificates": str(cfg.ca_cert)},
        }
    }
    (cfg.flwr_home / "config.toml").write_text(toml_dumps(doc), encoding="utf-8")


def _flwr(cfg: ServerDeployConfig, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` against this server's SuperLink; returns the JSON reply."""
    _write_flwr_config(cfg)
    res = subprocess.run(
        [_bin("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=server_env(cfg),
        cwd=cfg.run_dir,
        timeout=timeout,
    )
    try:
        start = res.stdout.index("{")
        reply: dict[str, Any] = json.loads(res.stdout[start:])
    except ValueError:
        reply = {"success": False, "error-message": (res.stdout + res.stderr).strip()[-2000:]}
    return reply


def wait_for_port(host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises:
        RuntimeError: ``proc`` exited first.
        TimeoutError: nothing listens after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before {host}:{port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def start_superlink(cfg: ServerDeployConfig, *, log: Log = print) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` (log: ``<run_dir>/logs/superlink.log``) and wait for its port."""
    cfg.check_files()
    logs = cfg.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(cfg)
    with (logs / "superlink.log").open("ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=server_env(cfg), cwd=cfg.run_dir, start_new_session=True
        )
    log(f"superlink started (pid {proc.pid}) on {cfg.host}:{cfg.port}")
    try:
        host, _, _ = cfg.control_address.rpartition(":")
        wait_for_port(host.strip("[]"), cfg.port, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc


# ---------------------------------------------------------------------------------------------- admission
def _public_key_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"site public key {path} does not exist")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data[:200]:
        raise ValueError(
            f"site public key {path}: this is a PRIVATE key; it must never leave the site. "
            "Give the .pub file `lungvl site keys` wrote next to it"
        )
    if b"BEGIN CERTIFICATE" in data[:200]:
        raise ValueError(f"site public key {path}: this is an X.509 certificate, not a site's OpenSSH public key")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"site public key {path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"site public key {path}: expected ECDSA (SECP384R1), got {type(key).__name__}")
    return data.strip()


def admitted_sites(run_dir: str | Path) -> list[dict[str, Any]]:
    """Sites admitted to this server (``<run_dir>/admitted_sites.json``), oldest first."""
    path = Path(run_dir) / ADMITTED_FILE
    if not path.exists():
        return []
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptStateError(f"{path}: not the admitted-sites JSON lungvl writes ({err})") from None
    if not isinstance(known, dict) or not all(isinstance(v, dict) for v in known.values()):
        raise CorruptStateError(f"{path}: expected an object of admitted sites, got {type(known).__name__}")
    return list(known.values())


def admit_site(cfg: ServerDeployConfig, public_key: str | Path, *, name: str = "") -> dict[str, Any]:
    """Register a site's public key with the running SuperLink (idempotent) and record it.

    Returns:
        ``{"fingerprint", "key_file", "name", "node_id", "admitted_at"}``.

    Raises:
        FileNotFoundError / ValueError: a missing or malformed key file.
        RuntimeError: the SuperLink refused or could not be reached.
    """
    path = Path(public_key).expanduser().resolve()
    data = _public_key_bytes(path)
    fingerprint = hashlib.sha256(data).hexdigest()[:16]
    known = {a["fingerprint"]: a for a in admitted_sites(cfg.run_dir)}
    args = ["supernode", "register", str(path), CONNECTION] + (["--name", name] if name else [])
    reply = _flwr(cfg, *args)
    if not reply.get("success"):
        message = str(reply.get("error-message", reply))
        if "already" not in message.lower() or fingerprint not in known:
            raise RuntimeError(f"SuperLink refused key {path}: {message}")
        return known[fingerprint]
    entry = {
        "fingerprint": fingerprint,
        "key_file": str(path),
        "name": name or (path.parent.name if path.stem == "site_key" else path.stem),
        "node_id": str(reply.get("node-id", "")),
        "admitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    known[fingerprint] = entry
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / ADMITTED_FILE).write_text(json.dumps(known, indent=2))
    return entry


# ---------------------------------------------------------------------------------------------- the run
def write_deployment_outputs(cfg: ServerDeployConfig, run_id: int) -> list[Path]:
    """Write a deployed run's metric CSVs, ``convergence.png``, ``epsilon.png`` and ``summary.md`` into its run dir.

    The same files a simulation writes (:mod:`server.run_outputs`); the sites section lists every site
    admitted (by key) or seen in the registry, with its rounds and examples.

    Returns:
        The files written.
    """
    from server.status import status_rows

    with Registry(cfg.registry_url, read_only=True) as reg:
        seen = {x["site"]: x for x in (status_rows(reg, run_id) or {}).get("sites", [])}
        admitted = {a["name"]: a for a in admitted_sites(cfg.run_dir)}
        rows = []
        for name in sorted(set(admitted) | set(seen)):
            site = seen.get(name, {})
            rows.append(
                (
                    name,
                    admitted[name]["fingerprint"] if name in admitted else "(not admitted by this server.toml)",
                    str(site.get("ok", 0)),
                    str(site.get("failed", 0)),
                    str(site.get("examples", 0)),
                )
            )
        table = SitesTable(("site", "key fingerprint", "rounds ok", "replies left out", "examples"), tuple(rows))
        note = f"Deployed run: SuperLink on {cfg.host}:{cfg.port}, run directory {cfg.run_dir}."
        return write_run_outputs(
            reg, run_id, cfg.run_dir, cfg.server, title=cfg.run_name or cfg.run_dir.name, sites=table, notes=[note]
        )


def write_app(cfg: ServerDeployConfig, *, resume: bool) -> Path:
    """Write the run's Flower App (``<run_dir>/app/pyproject.toml``) and resolved server settings."""
    app = cfg.run_dir / "app"
    app.mkdir(parents=True, exist_ok=True)
    server_toml = cfg.run_dir / "server_settings.toml"
    server_toml.write_text(toml_dumps(cfg.server.to_tables()), encoding="utf-8")
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "lungvl-consortium",
            "version": "0.1.0",
            "description": "lungvl consortium run; code comes from the lungvl package installed at each node",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "lungvl",
                    "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                    "config": {
                        "server-config": str(server_toml),
                        "init-model": str(cfg.init_model),
                        "run-dir": str(cfg.run_dir),
                        "registry": cfg.registry_url,
                        "run-name": cfg.run_name or cfg.run_dir.name,
                        "resume": resume,
                    },
                }
            }
        },
    }
    (app / "pyproject.toml").write_text(toml_dumps(doc), encoding="utf-8")
    return app


def launch_run(cfg: ServerDeployConfig, *, resume: bool = False) -> int:
    """Start the lungvl ServerApp run on the running SuperLink (``flwr run``); returns Flower's run id.

    Raises:
        RuntimeError: the SuperLink did not accept the run.
    """
    app = write_app(cfg, resume=resume)
    reply = _flwr(cfg, "run", str(app), CONNECTION)
    if not reply.get("success") or not reply.get("run-id"):
        raise RuntimeError(f"flwr run failed: {reply.get('error-message', reply)}")
    return int(reply["run-id"])


def flower_run_status(cfg: ServerDeployConfig, flwr_run_id: int) -> str:
    """Flower's status of a run (``pending``, ``running``, ``finished:completed``...); ``""`` if unknown."""
    reply = _flwr(cfg, "ls", CONNECTION, "--run-id", str(flwr_run_id), timeout=60)
    runs = reply.get("runs") or []
    if not runs:
        return ""
    status = str(runs[0].get("status", ""))
    details = str(runs[0].get("status-details", ""))
    return f"{status}:{details}" if status == "finished" and details not in ("", "N/A") else status


def _registry_status(cfg: ServerDeployConfig) -> tuple[int | None, str, int]:
    run_file = cfg.run_dir / RUN_FILE
    if not run_file.exists():
        return None, "", 0
    run_id = int(json.loads(run_file.read_text())["run_id"])
    with Registry(cfg.registry_url) as reg:
        summary = reg.summary(run_id)
    return run_id, str(summary["run"]["status"]), int(summary["rounds_done"])


def start_server(
    cfg: ServerDeployConfig,
    *,
    resume: bool = False,
    log: Log = print,
    poll_s: float = 1.0,
    on_started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> dict[str, Any]:
    """Start the SuperLink, admit the configured sites, run (or resume) the federation, stop the SuperLink.

    Blocks until the run ends. The ServerApp's own log goes to ``<run_dir>/logs/serverapp.log``.

    Args:
        cfg: the deployment settings.
        resume: continue the run recorded in ``<run_dir>/run.json``.
        log: line printer.
        poll_s: seconds between progress checks.
        on_started: called with the SuperLink process once it listens (tests use it to learn the PID).

    Returns:
        ``{"run_id", "flwr_run_id", "status", "rounds_done", "seconds"}``.

    Raises:
        RunDirBusy: another process holds the run directory (:class:`~server.run_lock.RunDirLock`, taken
            here for the whole run: SuperLink, Flower home, logs, checkpoints and registry all live there).
        FileExistsError: the run directory already holds a run and ``resume`` is False.
        FileNotFoundError: ``resume`` without a run, or a missing certificate/model.
        ResumeRefused: ``resume`` refused by :func:`~server.app.check_resume` (e.g.
            :class:`~server.app.CheckpointMismatch`), before the SuperLink starts.
        RuntimeError: the SuperLink or the run failed.
    """
    t0 = time.perf_counter()
    cfg.check_files()
    if resume and not (cfg.run_dir / RUN_FILE).exists():
        raise FileNotFoundError(f"nothing to resume in {cfg.run_dir} (no {RUN_FILE})")
    with RunDirLock(cfg.run_dir, what="lungvl server start", log=log):  # the whole run, resume included
        if (cfg.run_dir / RUN_FILE).exists() and not resume:
            raise FileExistsError(f"{cfg.run_dir} already holds a run ({RUN_FILE}); use --resume or another run_dir")
        if resume:  # refuse before the SuperLink starts (the ServerApp checks again)
            with Registry(cfg.registry_url) as reg:
                check_resume(cfg.run_dir, reg, cfg.server)
        if cfg.source is not None:
            (cfg.run_dir / "deployment_source.toml").write_text(
                cfg.source.read_text(encoding="utf-8"), encoding="utf-8"
            )
        superlink = start_superlink(cfg, log=log)
        streamer: subprocess.Popen[bytes] | None = None
        try:
            if on_started is not None:
                on_started(superlink)
            for key in cfg.admit:
                entry = admit_site(cfg, key)
                log(f"admitted {entry['name']} (key {entry['fingerprint']}, node {entry['node_id']})")
            flwr_run_id = launch_run(cfg, resume=resume)
            log(f"run started on the SuperLink (Flower run {flwr_run_id}); resume={resume}")
            with (cfg.run_dir / "logs" / "serverapp.log").open("ab") as fh:
                streamer = subprocess.Popen(
                    [_bin("flwr"), "log", str(flwr_run_id), CONNECTION, "--stream"],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=server_env(cfg),
                    cwd=cfg.run_dir,
                    start_new_session=True,
                )
            last_rounds, last_check, seen_running = -1, time.monotonic(), False
            while True:
                time.sleep(poll_s)
                if superlink.poll() is not None:
                    raise RuntimeError(f"superlink exited with code {superlink.returncode}; see {cfg.run_dir}/logs")
                run_id, status, rounds = _registry_status(cfg)
                if rounds != last_rounds and run_id is not None:
                    log(f"run {run_id}: {rounds} round(s) completed, status {status}")
                    last_rounds = rounds
                seen_running = seen_running or status == "running"
                if seen_running and status in ("finished", "stopped_budget", "failed"):
                    break
                if time.monotonic() - last_check > 30:  # a ServerApp that died before touching the registry
                    last_check = time.monotonic()
                    flwr_status = flower_run_status(cfg, flwr_run_id)
                    if flwr_status.startswith("finished"):
                        raise RuntimeError(f"the ServerApp ended ({flwr_status}); see {cfg.run_dir}/logs/serverapp.log")
        finally:
            if streamer is not None:
                stop_process(streamer, timeout=3)
            stop_process(superlink)
        assert run_id is not None  # the loop ends only on a recorded run's final status
        files = write_deployment_outputs(cfg, run_id)
        log(f"wrote {len(files)} files to {cfg.run_dir}: metrics CSVs, convergence.png, epsilon.png, summary.md")
    result = {
        "run_id": run_id,
        "flwr_run_id": flwr_run_id,
        "status": status,
        "rounds_done": rounds,
        "seconds": round(time.perf_counter() - t0, 1),
        "files": [str(f) for f in files],
    }
    log(f"run {run_id} {status}: {rounds} completed round(s) in {result['seconds']} s")
    return result

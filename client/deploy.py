"""A hospital joins the consortium: node keys, pre-flight checks, the SuperNode and lungvl's ClientApp worker.

``lungvl site keys`` / ``lungvl site join`` call these. The site's settings for the federation live in
the ``[federation]`` table of its ``site.toml`` (relative paths: to the site directory)::

    [federation]
    superlink = "superlink.consortium.example:9093"   # the SuperLink's Fleet API (host:port)
    root_certificates = "certs/ca.crt"                 # the consortium CA (verifies the SuperLink)
    private_key = "keys/site_key"                      # the site's node-auth key (lungvl site keys)
    runtime_port = 9094                                # the SuperNode's local Runtime API (loopback only)
    state_dir = "/var/lib/lungvl/hospital-a"           # optional: ledger, accountant, Flower state
    model_dir = "/opt/lungvl/initial_model"            # optional: else [training] model_dir

Flower 1.42 facts this relies on (checked against the installed flwr): the SuperNode authenticates
with an ECDSA key in OpenSSH format (``--auth-supernode-private-key``; the SuperLink knows the
public key once the coordinator registers it, ``flwr supernode register``); the Fleet API is
protobuf over HTTPS on the SuperLink's one port; ``--isolation process`` leaves the ClientApp to an
outside process, which here is :mod:`client.deploy_worker` (one warm process for all rounds).

Before anything starts, :func:`preflight` checks the files and the network (:mod:`client.preflight_checks`):
Flower's SuperNode would otherwise wait silently on a bad CA file or an unreachable SuperLink. While the
site runs, :mod:`client.log_follow` brings the SuperNode's and the worker's failures to the terminal.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from client.config import ClientConfig
from client.ledger import LEDGER_FILENAME, AuditLedger
from client.log_follow import LogFollower, exit_report
from client.preflight_checks import (
    CONNECT_TIMEOUT_S,
    SiteNotReady,
    check_key_pair,
    check_root_certificates,
    check_superlink,
    key_permission_warning,
    load_private_key,
    load_public_key,
)
from federation.pki import NODE_PRIVATE_KEY, NODE_PUBLIC_KEY, write_node_key_pair
from federation.processes import stop_process
from lungvl_model.config_file import reject_unknown_keys
from lungvl_model.data.site_check import check_site
from privacy.budget import AccountantStateMismatch, SiteBudget

__all__ = [
    "CONNECT_TIMEOUT_S",
    "FEDERATION_KEYS",
    "SiteDeployConfig",
    "SiteNotReady",
    "generate_site_keys",
    "load_private_key",
    "load_public_key",
    "preflight",
    "run_site",
    "stop_process",
    "supernode_command",
    "worker_command",
]

PRIVATE_KEY_FILE: Final = NODE_PRIVATE_KEY
PUBLIC_KEY_FILE: Final = NODE_PUBLIC_KEY
#: Keys of the ``[federation]`` table of site.toml.
FEDERATION_KEYS: Final = (
    "superlink",
    "root_certificates",
    "private_key",
    "runtime_port",
    "state_dir",
    "model_dir",
    "site_dir",
)


def generate_site_keys(out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create the site's node-authentication key pair (ECDSA SECP384R1, OpenSSH format).

    Args:
        out_dir: folder for ``site_key`` (private, mode 0600) and ``site_key.pub`` (send it to the
            coordinator: ``lungvl server admit site_key.pub``).
        overwrite: replace an existing key pair.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        FileExistsError: a key already exists there and ``overwrite`` is False.
    """
    return write_node_key_pair(Path(out_dir).expanduser(), overwrite=overwrite)


@dataclass(frozen=True)
class SiteDeployConfig:
    """How a site connects to the consortium (``[federation]`` of site.toml), with its :class:`ClientConfig`.

    Attributes:
        client: the site's client settings (name, budget, device, state dir, model dir).
        superlink: the SuperLink's Fleet API address ``host:port``.
        root_certificates: the consortium CA certificate (PEM).
        private_key: the site's node-auth private key (OpenSSH).
        runtime_port: the SuperNode's local Runtime API port (bound to 127.0.0.1).
    """

    client: ClientConfig
    superlink: str
    root_certificates: Path
    private_key: Path
    runtime_port: int = 9094

    @property
    def state_dir(self) -> Path:
        """The site's state directory (audit ledger, accountant, Flower home, logs)."""
        assert self.client.state_dir is not None  # resolved by ClientConfig
        return self.client.state_dir

    @classmethod
    def from_toml(cls, path: str | Path) -> SiteDeployConfig:
        """Read ``site.toml``: the client tables and ``[federation]``.

        Raises:
            FileNotFoundError: no site.toml.
            KeyError: an unknown ``[federation]`` key (with a "did you mean") or a missing one.
            ValueError: a bad value (port, address), naming the key and the value.
        """
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "site.toml"
        if not p.is_file():
            raise FileNotFoundError(f"site config {p} does not exist")
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
        fed = doc.get("federation")
        if not isinstance(fed, dict):
            raise KeyError(f"{p}: needs a [federation] table with {list(FEDERATION_KEYS[:3])}")
        reject_unknown_keys(fed, FEDERATION_KEYS, f"{p}: [federation]")
        missing = [k for k in ("superlink", "root_certificates", "private_key") if not fed.get(k)]
        if missing:
            raise KeyError(f"{p}: [federation] lacks {missing}")
        base = p.parent

        def resolve(value: Any) -> Path:
            q = Path(str(value)).expanduser()
            return q if q.is_absolute() else base / q

        overrides: dict[str, Any] = {}
        for key in ("site_dir", "state_dir", "model_dir"):  # site_dir: the data, when the kit lives elsewhere
            if fed.get(key):
                overrides[key] = resolve(fed[key])
        client = ClientConfig.from_toml(p, **overrides)
        address = str(fed["superlink"])
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{p}: [federation] superlink must be host:port, got {address!r}")
        rport = fed.get("runtime_port", 9094)
        if isinstance(rport, bool) or not isinstance(rport, int) or not 0 < rport < 65536:
            raise ValueError(f"{p}: [federation] runtime_port must be a port number, got {rport!r}")
        return cls(client, address, resolve(fed["root_certificates"]), resolve(fed["private_key"]), rport)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {
            "client": self.client.to_dict(),
            "superlink": self.superlink,
            "root_certificates": str(self.root_certificates),
            "private_key": str(self.private_key),
            "runtime_port": self.runtime_port,
        }


def preflight(
    cfg: SiteDeployConfig,
    *,
    check_data: bool = True,
    check_connect: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> dict[str, Any]:
    """Refuse to join unless the site can train: files sound, a usable study, budget left, the SuperLink reachable.

    In this order, so that a file problem is reported before the network is tried: the CA file, the node
    key (and its ``.pub`` beside it), the model package, the data, the ε budget, then the SuperLink.

    Args:
        cfg: the site's deployment settings.
        check_data: run :func:`~lungvl_model.data.site_check.check_site` (reads every study).
        check_connect: resolve the SuperLink, connect and complete a TLS handshake with the CA file
            (:func:`~client.preflight_checks.check_superlink`); off for a site started before its server.
        connect_timeout: seconds to wait for the SuperLink's TCP connection, and for the handshake.

    Returns:
        ``{"usable", "studies", "phi_findings", "epsilon_spent", "epsilon_budget", "policy", "warnings"}``
        (``policy``: the site's policy, :meth:`~privacy.site_policy.SitePolicy.to_dict`; ``warnings``:
        lines to show that do not stop the site, e.g. a private key readable by others).

    Raises:
        SiteNotReady: a missing or wrong CA file (not PEM certificates, not a CA, expired), a missing or
            malformed key or one whose ``.pub`` is of another pair, a missing model package; no usable
            study; an accountant state that is missing or holds less ε than the audit ledger records
            as spent (:meth:`~privacy.budget.SiteBudget.reconcile`); or the site's patient-level ε
            budget already spent.
        PeerUnreachable: the SuperLink does not resolve, answer or complete the TLS handshake
            (:class:`lungvl_model.errors.PeerUnreachable`).
    """
    check_root_certificates(cfg.root_certificates)
    try:
        key = load_private_key(cfg.private_key)
    except (FileNotFoundError, ValueError) as err:
        raise SiteNotReady(f"[federation] private_key: {err}") from None
    warnings = [w for w in (check_key_pair(cfg.private_key, key), key_permission_warning(cfg.private_key)) if w]
    model_dir = cfg.client.model_dir
    if model_dir is None or not (model_dir / "model.pt").is_file():
        raise SiteNotReady(f"model_dir: no initial model package (model.pt) at {model_dir}")
    out: dict[str, Any] = {"usable": None, "studies": None, "phi_findings": None, "warnings": warnings}
    if check_data:
        report = check_site(cfg.client.site_dir)
        out.update(usable=report.summary["usable"], studies=report.summary["studies"])
        out["phi_findings"] = report.summary["phi_findings"]
        if report.summary["usable"] == 0:
            raise SiteNotReady(
                f"site {cfg.client.name}: no usable study in {cfg.client.site_dir} "
                f"({report.summary['studies']} found; run `lungvl site check` for the reasons)"
            )
    budget = SiteBudget(cfg.state_dir, epsilon_budget=cfg.client.epsilon_budget, delta=cfg.client.delta)
    ledger_path = cfg.state_dir / LEDGER_FILENAME
    if ledger_path.exists():
        ledger = AuditLedger(ledger_path)
        try:
            budget.reconcile(ledger.max_epsilon(), record=ledger_path)
        except AccountantStateMismatch as err:
            raise SiteNotReady(f"site {cfg.client.name}: {err}") from None
        finally:
            ledger.close()
    out.update(epsilon_spent=budget.spent, epsilon_budget=budget.epsilon_budget, policy=cfg.client.policy.to_dict())
    if budget.remaining <= 0:
        raise SiteNotReady(
            f"site {cfg.client.name}: privacy budget spent (ε {budget.spent:.3f} of {budget.epsilon_budget} at "
            f"δ={budget.delta:g}, state in {budget.path})"
        )
    if check_connect:
        check_superlink(cfg.superlink, cfg.root_certificates, timeout=connect_timeout)
    return out


def node_config(cfg: SiteDeployConfig) -> str:
    """The SuperNode's ``--node-config`` string (site, model and state directories for the ClientApp)."""
    items = {"site-dir": cfg.client.site_dir, "state-dir": cfg.state_dir}
    if cfg.client.model_dir is not None:
        items["model-dir"] = cfg.client.model_dir
    for key, value in items.items():
        if '"' in str(value):
            raise ValueError(f"{key} must not contain a double quote, got {str(value)!r}")
    return " ".join(f'{k}="{v}"' for k, v in items.items())


def supernode_command(cfg: SiteDeployConfig) -> list[str]:
    """``flower-supernode`` with TLS (consortium CA), node auth, process isolation and the node config.

    Run through :mod:`client.supernode_main` (Flower's SuperNode with a shorter object-pull backoff).
    """
    return [
        sys.executable,
        "-m",
        "client.supernode_main",
        "--superlink",
        cfg.superlink,
        "--root-certificates",
        str(cfg.root_certificates),
        "--auth-supernode-private-key",
        str(cfg.private_key),
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.runtime_port),
        "--node-config",
        node_config(cfg),
    ]


def worker_command(cfg: SiteDeployConfig, supernode_pid: int | None = None) -> list[str]:
    """The long-lived ClientApp worker (:mod:`client.deploy_worker`) for this SuperNode."""
    cmd = [sys.executable, "-m", "client.deploy_worker", "--runtime-api-address", f"127.0.0.1:{cfg.runtime_port}"]
    return cmd + (["--parent-pid", str(supernode_pid)] if supernode_pid is not None else [])


def site_env(cfg: SiteDeployConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the site's processes: telemetry off; Flower/matplotlib/HF scratch in the state dir."""
    env = dict(os.environ if base is None else base)
    state = cfg.state_dir
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_HOME=str(state / "flwr"),
        MPLCONFIGDIR=str(state / "mpl"),
        HF_HOME=str(state / "hf"),
        PYTHONUNBUFFERED="1",  # log lines reach the log files even when a process is killed
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def describe(cmd: list[str]) -> str:
    """A copy-pasteable shell line for ``cmd``."""
    return shlex.join(cmd)


#: Flower's exit code when the SuperNode cannot connect to the SuperLink or it refuses to activate the node
#: (e.g. a node that died uncleanly still counts as online for up to 2 heartbeats, 60 s). Flower writes it to
#: the log (``Exit Code: 305``); the process itself exits with 1.
SUPERNODE_CONNECT_EXIT = 305
RESTART_DELAY_S = 10.0


def run_site(
    cfg: SiteDeployConfig,
    *,
    log: Any = print,
    max_restarts: int = 30,
    stop: Any = None,
) -> int:
    """Run the site's SuperNode and ClientApp worker until stopped (blocking; what ``lungvl site join`` does).

    Logs go to ``<state_dir>/logs/{supernode,worker}.log``; their ERROR/CRITICAL lines and Flower's
    connection failures are also passed to ``log`` as they are written (:class:`~client.log_follow.LogFollower`),
    and a process that exits is reported with its exit code, Flower's exit code and meaning, and its last
    log lines. A SuperNode that could not connect or activate (Flower exit code 305) is restarted after
    :data:`RESTART_DELAY_S`, unless the cause was TLS (that does not mend itself); a worker that dies is
    restarted; any other SuperNode exit ends the site with that code.

    Args:
        cfg: the site's deployment settings (run :func:`preflight` first).
        log: line printer.
        max_restarts: give up after this many restarts.
        stop: a ``threading.Event``-like object; the site stops when it is set (default: only signals).

    Returns:
        The exit code (0 after a stop or a signal).
    """
    logs = cfg.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = site_env(cfg)
    for key in ("FLWR_HOME", "MPLCONFIGDIR", "HF_HOME"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    followers: dict[str, LogFollower] = {}

    def start(name: str, cmd: list[str]) -> None:
        path = logs / f"{name}.log"
        followers[name] = LogFollower(path, name=name, emit=log)  # from the current end: this process's lines
        with path.open("ab") as fh:
            procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log(f"{name} started (pid {procs[name].pid}): {describe(cmd)}")

    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    restarts, code = 0, 0
    try:
        start("supernode", supernode_command(cfg))
        start("worker", worker_command(cfg, procs["supernode"].pid))
        while not stopping and not (stop is not None and stop.is_set()):
            time.sleep(0.5)
            for follower in followers.values():
                follower.poll()
            rc = procs["supernode"].poll()
            if rc is not None:
                sn = followers["supernode"]
                sn.poll()  # what it wrote just before it exited
                retry = SUPERNODE_CONNECT_EXIT in (rc, sn.flower_exit_code) and not sn.tls_error
                if not retry or restarts >= max_restarts:
                    for line in exit_report("supernode", rc, sn):
                        log(line)
                    code = rc or 1
                    break
                restarts += 1
                log(
                    f"supernode could not connect/activate (Flower exit code {SUPERNODE_CONNECT_EXIT}); "
                    f"retrying in {RESTART_DELAY_S:.0f} s ({restarts}/{max_restarts})"
                )
                time.sleep(RESTART_DELAY_S)
                stop_process(procs.pop("worker"))
                start("supernode", supernode_command(cfg))
                start("worker", worker_command(cfg, procs["supernode"].pid))
            elif procs["worker"].poll() is not None and restarts < max_restarts:
                restarts += 1
                followers["worker"].poll()
                for line in exit_report("worker", procs["worker"].returncode, followers["worker"]):
                    log(line)
                log(f"restarting the worker ({restarts}/{max_restarts})")
                start("worker", worker_command(cfg, procs["supernode"].pid))
    finally:
        for name in ("worker", "supernode"):
            if name in procs:
                stop_process(procs[name])
        for s, handler in previous.items():
            signal.signal(s, handler)
        log(f"site {cfg.client.name} stopped")
    return code

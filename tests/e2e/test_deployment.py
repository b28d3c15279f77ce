"""Real deployment on loopback: SuperLink (TLS + SuperNode auth) and two site SuperNodes, a federated
curriculum of the four stages (text → ssl → seg on patches → vl), one round each.

What runs is what a consortium runs: ``lungvl consortium init`` makes the CA, the coordinator's kit and
one kit per site from the coordinator's consortium.toml (the test gives only free ports, the loopback
address and the initial model on the command line); each site copies its kit into its site directory,
as the kit's README says, and no file of a kit is edited. Then ``lungvl server start`` and ``lungvl site
join`` run as processes,
``flower-superlink``/``flower-supernode`` under them, lungvl's ClientApp worker at each site. The test
also checks that a SuperNode with an unadmitted key is refused; kills the server (SIGKILL, all of its
processes) after round 1 (the text stage) while round 2's messages wait at the SuperLink and resumes
it across the stage boundary to finish rounds 2 (ssl) and 3 (seg); kills one site (SIGKILL, its
SuperNode and worker) once it has received round 4 (vl), so that round 4 is answered by one site and
recorded as failed (``min_sites = 2``) while the run still finishes; then reads the registry and both
sites' audit ledgers and scans both databases for the sites' DICOM identifiers and report text.

Every process it starts is stopped by PID (with its descendants) in ``finally``. Flower, matplotlib and
HF scratch lives under the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from client.deploy import SiteDeployConfig, supernode_command
from client.ledger import LEDGER_FILENAME, AuditLedger
from federation.processes import stop_process
from lungvl_model.data.site_layout import toml_dumps
from server.deploy import ServerDeployConfig
from server.registry import Registry
from simulations.scenario import Scenario
from simulations.simulate import _initial_model, prepare_sites

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DICOM_KEYWORDS = ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Processes this test started; all stopped by PID (and their descendants) at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []  # type: ignore[var-annotated]
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as fh:
            p = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            stop_process(p, timeout=10)


def wait_for(predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = ()) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.args!r} exited with {p.returncode}")
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def rounds_completed(registry_db: Path) -> int:
    if not registry_db.exists():
        return 0
    con = sqlite3.connect(f"file:{registry_db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("select count(*) from rounds where status = 'completed'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def queued_messages(superlink_db: Path, round_: int, node_id: int | None = None, *, delivered: bool = False) -> int:
    """Messages of ``round_`` (to ``node_id``) at the SuperLink, pulled by their SuperNode or not yet.

    Reads the SuperLink's state database (Flower 1.42 schema; a message leaves it once answered).
    """
    if not superlink_db.exists():
        return 0
    con = sqlite3.connect(f"file:{superlink_db}?mode=ro", uri=True, timeout=10)
    try:
        query = "select count(*) from message_ins where group_id = ? and (coalesce(delivered_at, '') = '') = ?"
        args: tuple[Any, ...] = (str(round_), int(not delivered))
        if node_id is not None:  # the state stores node ids as signed 64-bit integers
            query += " and dst_node_id = ?"
            args += (node_id - 2**64 if node_id >= 2**63 else node_id,)
        return int(con.execute(query, args).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def supernode_id(state_dir: Path) -> int | None:
    """The node id a site's SuperNode logged when it connected."""
    log = state_dir / "logs" / "supernode.log"
    found = re.findall(r"SuperNode ID: (\d+)", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else None


def wait_briefly(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def phi_needles(site_dir: Path) -> list[bytes]:
    """Identifiers and report text that must never leave the site."""
    needles: set[str] = set()
    for f in list((site_dir / "dicom").rglob("*"))[:200]:
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            for kw in DICOM_KEYWORDS:
                value = str(getattr(ds, kw, "") or "")
                if len(value) >= 4:
                    needles.add(value)
    for line in (site_dir / "reports.jsonl").read_text().splitlines():
        rec = json.loads(line)
        needles.add(rec["study_uid"])
        needles.update(s.strip() for s in rec["text"].split("\n") if len(s.strip()) >= 40)
    return [n.encode() for n in sorted(needles)]


def scan_files(paths: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for path in paths:
        if path.exists():
            data = path.read_bytes()
            hits += [f"{path.name}: {n[:60]!r}" for n in needles if n in data]
    return hits


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("deploy")
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_HOME=str(tmp / "flwr_home"),
        MPLCONFIGDIR=str(tmp / "mpl"),
        HF_HOME=str(tmp / "hf"),
        UV_CACHE_DIR=str(tmp / "uv"),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    for key in ("FLWR_HOME", "MPLCONFIGDIR", "HF_HOME"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    # two tiny synthetic sites and the initial model package
    scenario = Scenario.from_toml(ROOT / "simulations" / "scenarios" / "tiny.toml")
    curriculum = Scenario.from_toml(ROOT / "simulations" / "scenarios" / "curriculum.toml")
    assert curriculum.model_config() == scenario.model_config()  # the same micro model
    sites = prepare_sites(scenario, tmp / "sim", log=lambda _: None)
    model_dir = _initial_model(scenario, sites, tmp / "sim", log=lambda _: None)
    port = free_port()
    lungvl = [sys.executable, "-m", "lungvl.cli"]
    # the coordinator's plan: the sites and the run's settings; `lungvl consortium init` makes every kit from it
    plan = {
        "consortium": {"name": "e2e"},
        "sites": {s.name: {"cohort": s.cohort} for s in scenario.sites},
        # the federated curriculum: the four stages, one round each, the server killed after round 1 (text)
        # with the tiny scenario's client-level DP (mechanics only: two sites cannot hide one in the noise)
        **curriculum.server.with_updates(
            round_timeout_s=300.0,
            clip_norm=scenario.server.clip_norm,
            client_noise_multiplier=scenario.server.client_noise_multiplier,
        ).to_tables(),
    }
    (tmp / "consortium.toml").write_text(toml_dumps(plan))
    kits = tmp / "kits"
    init_cmd = [*lungvl, "consortium", "init", "--config", str(tmp / "consortium.toml"), "--out", str(kits)]
    init_cmd += ["--superlink", f"127.0.0.1:{port}", "--bind", "127.0.0.1", "--init-model", str(model_dir)]
    for name in sites:  # two sites on one host: distinct local SuperNode ports
        init_cmd += ["--runtime-port", f"{name}={free_port()}"]
    res = subprocess.run(init_cmd, env=env, cwd=tmp, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    built = {p.relative_to(kits): p.read_bytes() for p in kits.rglob("*.toml")}
    # each hospital copies its kit into its site directory, as the kit's README says; nothing is edited
    site_tomls = {}
    for name, site_dir in sites.items():
        shutil.copytree(kits / "sites" / name, site_dir, dirs_exist_ok=True)
        site_tomls[name] = site_dir / "site.toml"
    # a hospital that made its own key, which the coordinator never admitted
    subprocess.run([*lungvl, "site", "keys", "--out", str(tmp / "keys" / "c")], check=True, env=env)
    server_toml = kits / "server" / "server.toml"
    state = {name: site_dir / ".lungvl_state" for name, site_dir in sites.items()}
    procs = Procs(env, tmp / "logs")
    out: dict[str, Any] = {"tmp": tmp, "sites": sites, "site_tomls": site_tomls, "port": port, "timings": {}}
    run_dir = kits / "server" / "run"
    registry_db = run_dir / "registry.db"
    t0 = time.monotonic()
    try:
        server = procs.start("server_1", [*lungvl, "server", "start", "--config", str(server_toml)])
        admitted = run_dir / "admitted_sites.json"
        wait_for(lambda: admitted.exists() and len(json.loads(admitted.read_text())) == 2, 120, "admission", [server])
        site_procs = [
            procs.start(f"site_{n}", [*lungvl, "site", "join", "--config", str(t)]) for n, t in site_tomls.items()
        ]
        # a third SuperNode whose key was never admitted: the SuperLink must refuse it
        intruder_cfg = SiteDeployConfig.from_toml(site_tomls[next(iter(site_tomls))])
        intruder_cfg = SiteDeployConfig(
            intruder_cfg.client, intruder_cfg.superlink, intruder_cfg.root_certificates,
            tmp / "keys" / "c" / "site_key", free_port(),
        )  # fmt: skip
        intruder = procs.start("intruder", supernode_command(intruder_cfg))
        out["intruder_rc"] = wait_for(lambda: intruder.poll(), 120, "the unadmitted SuperNode to be refused")
        wait_for(lambda: rounds_completed(registry_db) >= 1, 600, "round 1", [server, *site_procs])
        out["timings"]["to_round_1"] = time.monotonic() - t0
        # crash the server while round 2's messages wait at the SuperLink (the hard case: after the restart
        # the SuperNodes still receive them for a run that is over), or 60 s after round 1 if that is missed
        superlink_db = run_dir / "superlink.db"
        out["killed_with_queued_round_2"] = wait_briefly(lambda: queued_messages(superlink_db, 2) > 0, 60)
        # SIGKILL the CLI, the SuperLink and the ServerApp (every descendant, by PID)
        stop_process(server, timeout=5, kill=True)
        out["rounds_before_restart"] = rounds_completed(registry_db)
        t1 = time.monotonic()
        resumed = procs.start("server_2", [*lungvl, "server", "start", "--config", str(server_toml), "--resume"])
        wait_for(lambda: rounds_completed(registry_db) >= 3, 600, "round 3 after the restart", [resumed, *site_procs])
        out["timings"]["resume_to_round_3"] = time.monotonic() - t1
        # a site dies mid-round: killed as soon as its SuperNode has pulled round 4's message
        out["dead_site"] = list(site_tomls)[-1]
        dead_node = supernode_id(state[out["dead_site"]])
        out["killed_site_holding_round_4"] = wait_briefly(
            lambda: queued_messages(superlink_db, 4, dead_node, delivered=True) > 0, 120, interval=0.05
        )
        stop_process(site_procs.pop(), timeout=5, kill=True)
        t2 = time.monotonic()
        out["resume_rc"] = wait_for(lambda: resumed.poll() is not None and (resumed.returncode,), 600, "resume")[0]
        out["timings"]["round_4_with_a_dead_site"] = time.monotonic() - t2
        out["timings"]["total"] = time.monotonic() - t0
        for p in site_procs:
            assert p.poll() is None, f"site process {p.args} died: see {tmp / 'logs'}"
    finally:
        procs.stop_all()
    out["server_toml"] = server_toml
    out["registry_db"] = registry_db
    out["run_dir"] = run_dir
    out["state"] = state
    out["kits"], out["built"] = kits, built
    out["env"] = env
    yield out


def test_the_kits_ran_as_built(deployment: dict[str, Any]) -> None:
    kits, built = deployment["kits"], deployment["built"]
    assert {rel: (kits / rel).read_bytes() for rel in built} == built  # nothing edited
    assert sorted(p.name for p in built) == ["consortium.toml", "server.toml", "site.toml", "site.toml"]
    for name, toml in deployment["site_tomls"].items():
        assert toml.read_bytes() == built[Path("sites", name, "site.toml")]
    server = ServerDeployConfig.from_toml(deployment["server_toml"])
    assert [p.parent.name for p in server.admit] == list(deployment["sites"])


def test_unadmitted_supernode_is_refused(deployment: dict[str, Any]) -> None:
    assert deployment["intruder_rc"] not in (None, 0)
    log = (deployment["run_dir"] / "logs" / "superlink.log").read_text()
    assert "could not be activated" in log or "No SuperNode found" in log


def test_rounds_survive_a_server_restart_and_a_dead_site(deployment: dict[str, Any]) -> None:
    assert deployment["resume_rc"] == 0, (deployment["tmp"] / "logs" / "server_2.log").read_text()[-3000:]
    assert deployment["rounds_before_restart"] >= 1
    sites, dead = sorted(deployment["sites"]), deployment["dead_site"]
    alive = [s for s in sites if s != dead]
    with Registry(deployment["registry_db"]) as reg:
        run = reg.latest_run()
        assert run is not None
        run_id = int(run["id"])
        summary = reg.summary(run_id)
        assert summary["run"]["status"] == "finished"
        assert [(r["round"], r["status"]) for r in reg.rounds(run_id)] == [
            (1, "completed"),
            (2, "completed"),
            (3, "completed"),
            (4, "failed"),  # one usable update < min_sites = 2: the model does not move, the run goes on
        ]
        assert sorted(summary["sites_seen"]) == sites
        rows = {(p["round"], p["site_name"]): (p["status"], p["reason"]) for p in reg.participation(run_id)}
        ok = {(r, s) for r in (1, 2, 3) for s in sites} | {(4, s) for s in alive}
        assert set(rows) == ok | {(4, dead)} and {k for k, v in rows.items() if v[0] == "ok"} == ok, rows
        # the SuperLink answers for the dead node once its heartbeat lapses; recorded under the site's name
        assert rows[(4, dead)][0] == "failed" and "Node Unavailable" in rows[(4, dead)][1], rows
        # every release is charged, the failed round 4 too (it is checkpointed as well)
        assert [(p["round"], p["level"]) for p in reg.privacy(run_id) if p["level"] == "client"] == [
            (r, "client") for r in (1, 2, 3, 4)
        ]
        ckpts = reg.checkpoints(run_id)
        # each round trained its curriculum stage: the checkpoints say which, and the sites' losses match it
        stages = {int(c["round"]): json.loads((Path(c["path"]) / "meta.json").read_text())["stage"] for c in ckpts}
        assert stages == {1: "text", 2: "ssl", 3: "seg", 4: "vl"}, stages
        site_metrics = {(m["round"], m["name"]) for m in reg.metrics(run_id, "global")}
        assert (1, "train_report_loss") in site_metrics and (3, "train_seg_loss") in site_metrics, site_metrics
        assert (1, "train_seg_loss") not in site_metrics


def test_audit_ledgers_hold_every_update(deployment: dict[str, Any]) -> None:
    for name in deployment["sites"]:
        ledger = AuditLedger(deployment["state"][name] / LEDGER_FILENAME)
        try:
            rows = ledger.entries()
        finally:
            ledger.close()
        train = [r for r in rows if r["kind"] == "train_reply"]
        expected = {1, 2, 3} if name == deployment["dead_site"] else {1, 2, 3, 4}
        assert {r["round"] for r in train} == expected, rows
        assert all(r["size_bytes"] > 1000 and len(r["sha256"]) == 64 for r in train)
        res = subprocess.run(
            [sys.executable, "-m", "lungvl.cli", "site", "audit", "--config", str(deployment["site_tomls"][name])],
            capture_output=True,
            text=True,
            env={**deployment["env"], "COLUMNS": "200"},
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stderr
        assert "train_reply" in res.stdout


def test_no_phi_leaves_the_sites(deployment: dict[str, Any]) -> None:
    dbs = sorted(deployment["run_dir"].glob("registry.db*"))
    dbs += [p for d in deployment["state"].values() for p in sorted(d.glob(f"{LEDGER_FILENAME}*"))]
    assert dbs
    for site_dir in deployment["sites"].values():
        needles = phi_needles(site_dir)
        assert len(needles) > 5
        assert scan_files(dbs, needles) == []


def test_status_lists_admitted_sites(deployment: dict[str, Any]) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "lungvl.cli", "server", "status", "--config", str(deployment["server_toml"])],
        capture_output=True,
        text=True,
        env={**deployment["env"], "COLUMNS": "200"},
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert "Admitted sites (2)" in res.stdout and "finished" in res.stdout


def test_deployment_writes_the_outputs_a_simulation_writes(deployment: dict[str, Any]) -> None:
    run_dir = deployment["run_dir"]
    for name in ("summary.md", "convergence.png", "epsilon.png", "metrics_global.csv"):
        assert (run_dir / name).is_file(), f"{name} missing in {sorted(p.name for p in run_dir.iterdir())}"
    assert "finished" in (run_dir / "summary.md").read_text()


def test_report_timings(deployment: dict[str, Any]) -> None:
    (deployment["tmp"] / "timings.json").write_text(json.dumps(deployment["timings"], indent=2))
    print("deployment timings (s):", json.dumps({k: round(v, 1) for k, v in deployment["timings"].items()}))
    logs = sorted(p for d in deployment["state"].values() for p in d.glob("logs/worker.log"))
    stale = sum(f.read_text(errors="replace").count("skipped a stale task") for f in logs)
    print("server killed with round 2 queued at the SuperLink:", deployment["killed_with_queued_round_2"])
    print("site killed holding round 4's message:", deployment["killed_site_holding_round_4"])
    print("stale tasks the site workers skipped after the restart:", stale)


_ = signal  # SIGKILL is sent through server.deploy.stop_process(kill=True)

"""``flwr run <repo> <connection>`` on Flower's simulation engine, as a Flower user runs the app.

A SuperLink in simulation mode (``--disable-runtime-dependency-installation``: no ``uv sync``) on a free
loopback port, the connection in ``$FLWR_HOME/config.toml``, 3 simulated SuperNodes. The repository is
the Flower App: Flower builds a FAB of it, installs it under ``$FLWR_HOME/apps/`` and runs
``server.app:app``/``client.app:app`` from there; relative run-config paths (the run dir, the initial
model, built on first use from the micro model of ``simulations/scenarios/tiny.toml``) resolve against
that app directory and each partition serves a synthetic site generated on first use.

1. two rounds complete: Flower says ``finished:completed``, the registry ``finished`` with 2 rounds;
2. every round fails (the run config maps the partitions to directories that do not exist): the run
   aborts after ``max-consecutive-failed-rounds = 2``, Flower says ``finished:failed``, the registry
   ``failed`` and ``lungvl server status`` exits 1. ``flwr run --stream`` itself exits 0 either way in
   flwr 1.42 (it starts the run and streams its log), so the outcome is read from ``flwr ls``, the
   registry and ``lungvl server status``.

Everything Flower, Ray, matplotlib, HF and uv write goes under the test's temp dirs; the SuperLink is
stopped by PID with its descendants.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.processes import stop_process
from server.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FEDERATION = "num-supernodes=3 client-resources-num-cpus=1"


@dataclass
class LocalSim:
    """A SuperLink in simulation mode and the environment ``flwr`` runs in."""

    env: dict[str, str]
    home: Path
    tmp: Path

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout
        )

    def run(self, run_config: str) -> tuple[subprocess.CompletedProcess[str], float]:
        t0 = time.monotonic()
        res = self.flwr("run", str(ROOT), "local-sim", "--stream", "--federation-config", FEDERATION,
                        "--run-config", run_config)  # fmt: skip
        return res, time.monotonic() - t0

    def flower_status(self) -> str:
        res = self.flwr("ls", "local-sim", "--format", "json", timeout=120)
        runs = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
        assert len(runs) >= 1, res.stdout
        latest = max(runs, key=lambda r: r["pending-at"])
        return f"{latest['status']}: {latest.get('status-details', '')}"

    def registry(self, run_dir: str) -> Path:
        found = list(self.home.glob(f"apps/lungvl.lungvl.*/{run_dir}/registry.db"))
        assert len(found) == 1, f"expected one registry under {self.home}/apps/*/{run_dir}, found {found}"
        return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def local_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSim]:
    tmp = tmp_path_factory.mktemp("flwr_run")
    home = tmp / "flwr_home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="lvr", dir="/tmp"))  # Ray's socket paths must stay short
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        RAY_TMPDIR=str(ray_tmp),
        UV_CACHE_DIR=str(tmp / "uv"),
        MPLCONFIGDIR=str(tmp / "mpl"),
        HF_HOME=str(tmp / "hf"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
    )
    port = free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-sim"\n\n[superlink.local-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    (tmp / "server.toml").write_text(
        "[strategy]\nrounds = 2\nmin_sites = 2\nfraction_evaluate = 0.0\nround_timeout_s = 300.0\n"
        '[training]\nstage = "vl"\nlocal_steps = 1\nbatch_size = 1\n'
    )
    cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--disable-runtime-dependency-installation"]
    with (tmp / "superlink.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    try:
        from server.deploy import wait_for_port

        wait_for_port("127.0.0.1", port, timeout=120, proc=proc)
        yield LocalSim(env, home, tmp)
    finally:
        stop_process(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_flwr_run_completes_its_rounds(local_sim: LocalSim) -> None:
    server_toml = local_sim.tmp / "server.toml"
    res, seconds = local_sim.run(f'server-config="{server_toml}" run-dir="runs/ok"')
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "run 1 finished: 2 completed round(s)" in out, out[-4000:]
    assert local_sim.flower_status().startswith("finished:completed")
    db = local_sim.registry("runs/ok")
    assert (db.parent.parent / "init_model" / "model.pt").is_file()  # built on first use, in the app dir
    with Registry(db) as reg:
        summary = reg.summary(1)
        assert summary["run"]["status"] == "finished" and summary["rounds_done"] == 2
        names = {p["site_name"] for p in reg.participation(1) if p["status"] == "ok"}
    assert names == {"sim-0-screening", "sim-1-referral", "sim-2-low_resource"}
    assert len(list(db.parent.glob("synthetic_sites/sim-*/site.toml"))) == 3
    status = subprocess.run([str(BIN / "lungvl"), "server", "status", "--db", str(db)], env=local_sim.env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    print(f"flwr run, 3 supernodes, 2 rounds: {seconds:.0f} s")


def test_flwr_run_whose_rounds_all_fail_is_aborted_and_recorded_failed(local_sim: LocalSim) -> None:
    server_toml = local_sim.tmp / "server.toml"
    missing = ",".join(f"no/such/site-{i}" for i in range(3))
    res, seconds = local_sim.run(
        f'server-config="{server_toml}" run-dir="runs/bad" sites="{missing}" '
        "num-server-rounds=6 max-consecutive-failed-rounds=2"
    )
    out = res.stdout + res.stderr
    # flwr 1.42: `flwr run --stream` exits 0 whatever the run's outcome; the failure shows in its log and below.
    assert "RunAborted: 2 consecutive failed rounds (rounds 1-2)" in out, out[-4000:]
    assert local_sim.flower_status().startswith("finished:failed: Simulation failed with exception: 2 consecutive")
    db = local_sim.registry("runs/bad")
    with Registry(db) as reg:
        summary = reg.summary(1)
        assert summary["run"]["status"] == "failed" and summary["rounds_done"] == 0
        assert [r["status"] for r in reg.rounds(1)] == ["failed", "failed"]
        reasons = {p["reason"] for p in reg.participation(1)}
    assert reasons == {"[code 2] site setup failed (FileNotFoundError; see the node's log)"}, reasons
    status = subprocess.run([str(BIN / "lungvl"), "server", "status", "--db", str(db)], env=local_sim.env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert status.returncode == 1, status.stdout + status.stderr
    print(f"flwr run, every round failing, aborted after 2: {seconds:.0f} s")

"""Nothing lost on resume: every checkpoint file is verified first, and a refused or failed resume leaves
the registry as it was (the in-process ServerApp of ``test_release_once`` with a micro model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lungvl.cli import app as cli
from lungvl_model.data.site_layout import toml_dumps
from lungvl_model.training.checkpoint import sha256_file
from server.app import CheckpointMismatch, ResumeRefused
from server.config import ServerConfig
from server.registry import Registry
from simulations.scenario import Scenario
from simulations.simulate import run_simulation
from tests.server.test_release_once import NODES, PRIVATE, RecordingGrid, serve
from tests.server.test_strategy import LocalGrid, toy_client

ROOT = Path(__file__).resolve().parents[2]
CFG = ServerConfig.from_dict({**PRIVATE, "rounds": 3})


def crash(run_dir: Path, init_model: Path, **how: int) -> Path:
    """A private 3-round run that crashed (``crash_before_train=3``: rounds 1-2 closed, 3 pending)."""
    grid = RecordingGrid(toy_client(lambda n, r: "ok"), run_dir / "registry.db", **how)
    with pytest.raises(RuntimeError, match="crash"):
        serve(run_dir, CFG, init_model, grid)
    return run_dir


def registry_rows(db: Path) -> dict[str, Any]:
    with Registry(db) as reg:
        run = reg.latest_run()
        assert run is not None
        rid = run["id"]
        return {
            "run": run,
            "rounds": reg.rounds(rid),
            "checkpoints": reg.checkpoints(rid),
            "privacy": reg.privacy(rid),
            "participation": reg.participation(rid),
            "metrics": reg.metrics(rid),
        }


def files(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (sha256_file(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("victim", "damage"), [("model.pt", "flip"), ("server_state.pt", "flip"), ("model.pt", "rm")])
def test_a_changed_or_missing_checkpoint_file_refuses_the_resume(
    tmp_path: Path, init_model: Path, task_identity: None, victim: str, damage: str
) -> None:
    run_dir = crash(tmp_path, init_model, crash_before_train=3)
    ckpt = run_dir / "checkpoints" / "round_2"
    with Registry(run_dir / "registry.db") as reg:
        recorded = {"model.pt": reg.checkpoints(1)[-1]["sha256"]}
    recorded["server_state.pt"] = json.loads((ckpt / "server_state.json").read_text())["server_state_sha256"]
    before = registry_rows(run_dir / "registry.db")
    assert [r["status"] for r in before["rounds"]] == ["completed", "completed", "running"]
    if damage == "flip":
        flip_a_bit(ckpt / victim)
    else:
        (ckpt / victim).unlink()
    grid = RecordingGrid(toy_client(lambda n, r: "ok"), run_dir / "registry.db")
    with pytest.raises(CheckpointMismatch) as refused:
        serve(run_dir, CFG, init_model, grid, resume=True)
    err = refused.value
    actual = sha256_file(ckpt / victim) if damage == "flip" else None
    assert (err.path, err.expected, err.actual) == (ckpt / victim, recorded[victim], actual)
    message = str(err)
    assert str(ckpt / victim) in message and recorded[victim] in message and "\n" not in message
    assert (actual in message) if actual else ("missing" in message)
    assert grid.pushed == []
    assert registry_rows(run_dir / "registry.db") == before  # pending round 3 kept, run still failed


def test_changed_settings_refuse_the_resume_before_any_registry_write(
    tmp_path: Path, init_model: Path, task_identity: None
) -> None:
    run_dir = crash(tmp_path, init_model, crash_before_train=3)
    before = registry_rows(run_dir / "registry.db")
    grid = RecordingGrid(toy_client(lambda n, r: "ok"), run_dir / "registry.db")
    with pytest.raises(ResumeRefused, match="different settings: clip_norm 1.0 -> 2.0"):
        serve(run_dir, CFG.with_updates(clip_norm=2.0), init_model, grid, resume=True)
    assert registry_rows(run_dir / "registry.db") == before


class DeadGrid(LocalGrid):
    """The SuperLink went away before the resumed run's first round."""

    def get_node_ids(self) -> list[int]:
        raise ConnectionError("SuperLink unreachable")


@pytest.mark.parametrize("killed", [False, True])
def test_a_resume_that_fails_before_its_first_round_leaves_the_run_as_it_was(
    tmp_path: Path, init_model: Path, task_identity: None, killed: bool
) -> None:
    run_dir = crash(tmp_path, init_model, crash_after_evaluate=2)  # rounds 1-2 closed, none pending, run failed
    db = run_dir / "registry.db"
    if killed:  # a server killed outright never marked its run: still "running"
        with Registry(db) as reg:
            reg.reopen_run(1)
    before = registry_rows(db)
    with pytest.raises(ConnectionError):
        serve(run_dir, CFG, init_model, DeadGrid(toy_client(lambda n, r: "ok"), NODES), resume=True)
    after = registry_rows(db)
    if killed:  # known now not to run: failed, not "running"
        assert after["run"]["status"] == "failed" and after["run"]["finished_at"] is not None
        after["run"] = before["run"]
    assert after == before


def test_simulate_resume_refuses_a_changed_checkpoint_before_writing_anything(
    tmp_path: Path, init_model: Path, task_identity: None
) -> None:
    run_dir = crash(tmp_path / "run", init_model, crash_before_train=3)
    flip_a_bit(run_dir / "checkpoints" / "round_2" / "model.pt")
    tiny = Scenario.from_toml(ROOT / "simulations" / "scenarios" / "tiny.toml")
    scenario = dataclasses.replace(tiny, server=CFG)
    before = files(run_dir)
    with pytest.raises(CheckpointMismatch, match="round_2/model.pt"):
        run_simulation(scenario, run_dir, resume=True, progress=lambda _: None)
    toml = tmp_path / "scenario.toml"
    doc = scenario.to_dict()
    tables = ["\n[[sites]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in x.items()) for x in doc.pop("sites")]
    toml.write_text(toml_dumps(doc) + "".join(tables))
    assert Scenario.from_toml(toml).server == CFG
    res = CliRunner().invoke(cli, ["simulate", str(toml), "--out", str(run_dir), "--resume"])
    assert res.exit_code == 2, res.output
    assert "round_2/model.pt" in res.stderr and "expected sha256" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    after = files(run_dir)
    assert after.pop(".lungvl.lock")[0] == sha256_file(Path("/dev/null"))  # taken and released, note emptied
    assert after == before  # no config.json, server.toml, site or Ray directory written

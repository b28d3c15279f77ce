"""The federated curriculum end to end in Flower's simulation engine: the four stages on three synthetic
sites, each round training its stage (only that stage's parameters move), and the centralised baseline
following the same schedule."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from server.registry import Registry
from simulations.centralised import run_centralised
from simulations.scenario import Scenario
from simulations.simulate import run_simulation

ROOT = Path(__file__).resolve().parents[2]
CURRICULUM = ROOT / "simulations" / "scenarios" / "curriculum.toml"


def _moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_four_stage_curriculum_on_three_sites(tmp_path: Path) -> None:
    scenario = Scenario.from_toml(CURRICULUM)
    assert len(scenario.sites) == 3 and [p.stage for p in scenario.server.curriculum] == ["text", "ssl", "seg", "vl"]
    lines: list[str] = []
    out = tmp_path / "fed"
    result = run_simulation(scenario, out, progress=lines.append)
    assert result["status"] == "finished" and result["rounds_done"] == 4, lines[-20:]
    with Registry(out / "registry.db") as reg:
        run = result["run_id"]
        assert [r["status"] for r in reg.rounds(run)] == ["completed"] * 4
        parts = reg.participation(run)
        assert sorted({p["site_name"] for p in parts}) == ["referral-a", "screening-a", "screening-b"]
        assert all(p["status"] == "ok" for p in parts)
        ckpts = {int(c["round"]): Path(c["path"]) for c in reg.checkpoints(run)}
        names = {(m["round"], m["name"]) for m in reg.metrics(run, "global")}
    stages = {r: json.loads((p / "meta.json").read_text())["stage"] for r, p in ckpts.items()}
    assert stages == {1: "text", 2: "ssl", 3: "seg", 4: "vl"}
    # each round's sites reported the loss of its stage
    assert (1, "train_report_loss") in names and (3, "train_seg_loss") in names and (4, "train_risk_loss") in names
    assert not {(1, "train_seg_loss"), (2, "train_report_loss"), (3, "train_report_loss")} & names
    assert {(r, "val_loss") for r in (1, 2, 3, 4)} <= names  # every stage is evaluated on the hold-out
    # only the stage's parameters move: the warm-up trains the decoder alone, and with the server momentum
    # reset at each stage boundary the decoder stays put through ssl and seg
    w = {0: torch.load(out / "initial_model" / "model.pt", weights_only=True)}
    w |= {r: torch.load(p / "model.pt", weights_only=True) for r, p in ckpts.items()}
    assert _moved(w[0], w[1], "decoder.") and not _moved(w[0], w[1], "vision.")
    assert _moved(w[1], w[2], "vision.") and not _moved(w[1], w[2], "decoder.")
    assert _moved(w[2], w[3], "vision.") and not _moved(w[2], w[3], "decoder.")
    assert _moved(w[3], w[4], "decoder.")
    assert "momentum" in "\n".join(lines)  # the reset is logged
    summary = (out / "summary.md").read_text()
    assert "curriculum text × 1 rounds" in summary and "16³ patches" in summary

    # the centralised baseline trains the same schedule on the pooled studies
    central = run_centralised(scenario, tmp_path / "central", init_model=out / "initial_model", progress=lines.append)
    assert central["status"] == "finished" and central["rounds_done"] == 4
    staged = [line for line in lines if line.startswith("round ") and "centralised" in line]
    assert [line.split(": ")[1].split()[0] for line in staged] == ["text", "ssl", "seg", "vl"], staged

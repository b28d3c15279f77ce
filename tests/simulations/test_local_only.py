"""The local-only and centralised baselines, recorded in the registry like federated runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.registry import Registry
from simulations.centralised import run_centralised, steps_per_round
from simulations.local_only import run_local_only
from simulations.scenario import Scenario

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    """tiny.toml's micro model on two 2-study sites, one round of one local step."""
    doc = tomllib.loads((ROOT / "simulations" / "scenarios" / "tiny.toml").read_text())
    doc["run"] |= {"name": "base", "rounds": 1}
    doc["training"]["local_steps"] = 1
    doc["dp"] = {"delta": 1e-5}
    doc["sites"] = [
        {"name": "scr", "cohort": "screening", "studies": 2, "seed": 3},
        {"name": "ref", "cohort": "referral", "studies": 2, "seed": 4},
    ]
    return Scenario.from_dict(doc)


def test_local_only_run_is_recorded_like_a_run(scenario: Scenario, tmp_path: Path) -> None:
    lines: list[str] = []
    res = run_local_only(
        scenario, tmp_path / "local", run_config={"study": {"tag": 1}}, dg_penalty=1.0, progress=lines.append
    )
    assert res["status"] == "finished" and res["rounds_done"] == 1
    assert any(line.startswith("round 1: local-only") for line in lines)
    with Registry(tmp_path / "local" / "registry.db") as reg:
        run = reg.run(res["run_id"])
        assert run["status"] == "finished" and run["config"]["kind"] == "local_only"
        assert run["config"]["study"] == {"tag": 1} and run["config"]["dg_penalty"] == 1.0
        rows = reg.metrics(res["run_id"])
        scopes = {m["scope"] for m in rows}
        assert scopes == {"global", "site:scr", "site:ref"}
        site = {m["name"]: m["value"] for m in rows if m["scope"] == "site:ref"}
        assert {"train_loss", "val_loss", "val_dice", "xval_loss", "xval_dice", "update_norm"} <= set(site)
        glob = {m["name"] for m in rows if m["scope"] == "global"}
        assert {"val_loss", "xval_loss", "train_loss"} <= glob and "update_norm" not in glob
        assert [p["status"] for p in reg.participation(res["run_id"])] == ["ok", "ok"]
        assert reg.summary(res["run_id"])["rounds_done"] == 1
    assert (tmp_path / "local" / "convergence.png").exists() and (tmp_path / "local" / "metrics_global.csv").exists()


def test_centralised_run_uses_the_federated_step_budget(scenario: Scenario, tmp_path: Path) -> None:
    assert steps_per_round(scenario) == 2  # one local step at each of the two sampled sites
    res = run_centralised(scenario, tmp_path / "central", device="cpu", progress=lambda _: None)
    with Registry(tmp_path / "central" / "registry.db") as reg:
        run = reg.run(res["run_id"])
        assert run["config"]["kind"] == "centralised" and run["config"]["steps_per_round"] == [2]
        rows = reg.metrics(res["run_id"])
        assert {m["scope"] for m in rows} == {"global", "site:scr", "site:ref"}
        assert {"val_loss", "train_loss"} <= {m["name"] for m in rows if m["scope"] == "global"}
    with pytest.raises(ValueError, match="DP-SGD"):
        run_centralised(scenario.with_server(dp_sgd=True), tmp_path / "dp")


def test_initial_model_is_scored_untrained(scenario: Scenario, tmp_path: Path) -> None:
    from federation.arrays import model_to_arrays
    from simulations.local_only import make_round_config, run_initial, site_trainers

    lines: list[str] = []
    res = run_initial(scenario, tmp_path / "init", run_config={"study": {"tag": 2}}, progress=lines.append)
    assert res["status"] == "finished" and res["rounds_done"] == 1
    assert any(line.startswith("initial model scored by 2 site(s), stage vl") for line in lines)
    package = tmp_path / "init" / "initial_model"
    with Registry(tmp_path / "init" / "registry.db") as reg:
        run = reg.run(res["run_id"])
        assert run["config"]["kind"] == "initial" and run["config"]["study"] == {"tag": 2}
        rows = reg.metrics(res["run_id"])
        assert {m["round"] for m in rows} == {1} and {m["scope"] for m in rows} == {"global", "site:scr", "site:ref"}
        recorded = {m["name"]: m["value"] for m in rows if m["scope"] == "site:ref"}
    assert "train_loss" not in recorded and "update_norm" not in recorded  # nothing was trained
    # the same numbers as the site scoring the package itself, with the last round's settings
    trainers = site_trainers(
        {"ref": tmp_path / "init" / "sites" / "ref"}, package, tmp_path / "state", scenario.holdout_fraction
    )
    n, direct = trainers["ref"].evaluate(
        model_to_arrays(trainers["ref"].model), make_round_config(scenario.server, scenario.rounds)
    )
    trainers["ref"].close()
    assert recorded["val_loss"] == pytest.approx(direct["val_loss"], rel=1e-6)
    # one local round from the same package moves the score: the reference is the untrained model
    local = run_local_only(scenario, tmp_path / "local", init_model=package, progress=lambda _: None)
    assert local["global"]["val_loss"] != pytest.approx(res["global"]["val_loss"], rel=1e-6)

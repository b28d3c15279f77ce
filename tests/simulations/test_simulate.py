"""The tiny scenario end to end through Flower's simulation engine (Ray), and resume bit-equality."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

import client.app as client_app
from client.app import SiteEndpoint
from client.trainer import LocalResult, payload_bytes
from federation.arrays import flatten_arrays
from federation.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, RoundConfig
from federation.records import arrays_from_record, arrays_to_record
from privacy.accountant import PrivacyBudgetExceeded
from server.registry import Registry
from simulations.scenario import Scenario, SiteSpec
from simulations.simulate import MAX_RAY_TMP, ray_temp_dir, run_simulation

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"
W = [np.zeros((2, 2), np.float32), np.ones(3, np.float32)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    run = json.loads((run_dir / "run.json").read_text())
    with Registry(run_dir / "registry.db") as reg:
        last = reg.checkpoints(run["run_id"])[-1]
    return torch.load(Path(last["path"]) / "model.pt", weights_only=True)


def test_scenarios_parse() -> None:
    tiny = Scenario.from_toml(TINY)
    assert tiny.rounds == 2 and len(tiny.sites) == 2 and tiny.server.client_dp
    svr = Scenario.from_toml(ROOT / "simulations" / "scenarios" / "screening_vs_referral.toml")
    assert sorted(s.cohort for s in svr.sites) == ["low_resource", "referral", "screening", "screening"]
    assert svr.server.strategy == "fedavgm" and svr.server.client_dp and svr.server.target_epsilon > 0
    assert svr.holdout_fraction == 0.25 and tiny.holdout_fraction == 0.0
    assert Scenario.from_dict(json.loads(json.dumps(svr.to_dict()))).holdout_fraction == 0.25
    again = Scenario.from_dict(json.loads(json.dumps(tiny.to_dict())))
    assert again.server == tiny.server and again.sites == tiny.sites and again.model_config() == tiny.model_config()


TWO = [{"name": n, "cohort": "screening", "studies": 1} for n in ("a", "b")]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"run": {"name": "x", "rouns": 2}}, "did you mean 'rounds'"),
        ({"strategy": {"momentum": 0.9}}, "did you mean 'server_momentum'"),
        ({"sites": [*TWO, {"name": "c", "cohort": "screening", "studies": 1, "sed": 1}]}, "'seed'"),
        ({"model": {"vison": {}}}, "did you mean 'vision'"),
        ({"sites": [*TWO, {"name": "c", "cohort": "screen", "studies": 1}]}, "cohort"),
        ({"sites": TWO[:1]}, "min_sites"),
        ({"sites": [*TWO, TWO[0]]}, "duplicate site names"),
        ({"sites": []}, "at least one \\[\\[sites\\]\\]"),
        ({"run": {"name": "x", "holdout_fraction": 1.0}}, "holdout_fraction"),
    ],
)
def test_invalid_scenarios(doc: dict[str, object], match: str) -> None:
    with pytest.raises((KeyError, ValueError), match=match):
        Scenario.from_dict({"run": {"name": "x"}, "sites": TWO, **doc})


def test_ray_temp_dir_stays_short(tmp_path: Path) -> None:
    assert ray_temp_dir(Path("/r")) == Path("/r/.ray")
    long = ray_temp_dir(tmp_path / ("x" * 60))
    assert len(str(long)) <= MAX_RAY_TMP and long.name.startswith("lungvl_ray_")


def test_tiny_scenario_end_to_end_and_resume(tmp_path: Path) -> None:
    tiny = Scenario.from_toml(TINY)
    lines: list[str] = []
    full = run_simulation(tiny, tmp_path / "full", progress=lines.append, reproducible_noise=True)
    assert full["status"] == "finished" and full["rounds_done"] == 2
    assert sum(line.startswith("round ") and "completed" in line for line in lines) == 2
    out = tmp_path / "full"
    with Registry(out / "registry.db") as reg:
        run = full["run_id"]
        assert [r["status"] for r in reg.rounds(run)] == ["completed", "completed"]
        parts = reg.participation(run)
        assert sorted((p["round"], p["site_name"], p["status"]) for p in parts) == [
            (r, s, "ok") for r in (1, 2) for s in ("referral-a", "screening-a")
        ]
        eps = [p["epsilon"] for p in reg.privacy(run) if p["level"] == "client"]
        assert len(eps) == 2 and 0 < eps[0] < eps[1]
        ckpts = reg.checkpoints(run)
        assert [c["round"] for c in ckpts] == [1, 2]
        assert all((Path(c["path"]) / "server_state.pt").exists() for c in ckpts)
        glob = {m["name"] for m in reg.metrics(run, "global")}
        assert {"train_loss", "val_loss"} <= glob
    for name in ("convergence.png", "epsilon.png", "summary.md", "config.json", "metrics_global.csv"):
        assert (out / name).stat().st_size > 0, name
    assert "noise reproducible: not private" in (out / "summary.md").read_text()
    assert (out / "state" / "screening-a" / "outbound_ledger.db").exists()  # the site audited its replies

    # Interrupted after round 1, resumed to round 2: same final weights, bit for bit (seeded noise and
    # sampling: reproducible_noise; a private run's resume draws fresh noise, tests/server/test_release_once.py).
    # The same site data and initial model package are used (linked), as a crashed run would find them on disk.
    linked = tuple(SiteSpec(name=s.name, path=out / "sites" / s.name) for s in tiny.sites)
    same = Scenario(**{**tiny.__dict__, "sites": linked})
    part = tmp_path / "part"
    first = run_simulation(
        same.with_server(rounds=1),
        part,
        init_model=out / "initial_model",
        progress=lambda _: None,
        reproducible_noise=True,
    )
    assert first["rounds_done"] == 1
    with pytest.raises(FileExistsError):
        run_simulation(same, part, init_model=out / "initial_model")
    resumed = run_simulation(
        same, part, resume=True, init_model=out / "initial_model", progress=lambda _: None, reproducible_noise=True
    )
    assert resumed["rounds_done"] == 2 and resumed["run_id"] == first["run_id"]
    a, b = weights(out), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with Registry(part / "registry.db") as reg:
        eps_resumed = [p["epsilon"] for p in reg.privacy(resumed["run_id"]) if p["level"] == "client"]
    assert eps_resumed == eps


# ----------------------------------------------------------------------- the ClientApp glue the simulation runs


class StubTrainer:
    """Stands in for SiteTrainer: a fixed update, or the site's budget refusal."""

    def __init__(self, refuse: bool, state_dir: Path | None = None) -> None:
        self.refuse = refuse
        self.config = SimpleNamespace(state_dir=state_dir)
        self.outbound: list[tuple[int, str, bytes, dict[str, float]]] = []

    def fit(self, arrays: list[np.ndarray], rc: RoundConfig) -> LocalResult:
        if self.refuse == "crash":
            raise ValueError("study 1.2.3 has 0 slices")  # a message that must not leave the site
        if self.refuse:
            raise PrivacyBudgetExceeded(spent=7.9, requested=8.4, target=8.0, delta=1e-5, who="site")
        return LocalResult([np.full(a.shape, 0.5, np.float64) for a in arrays], 3, {"train_loss": 1.25})

    def record_outbound(self, rnd: int, kind: str, payload: bytes, metrics: dict[str, float], **_: object) -> int:
        self.outbound.append((rnd, kind, payload, dict(metrics)))
        return len(self.outbound)


@pytest.mark.parametrize("refuse", [False, True])
def test_client_app_train_reply_and_budget_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None, refuse: bool
) -> None:
    endpoint = SiteEndpoint(tmp_path / "site")
    stub = StubTrainer(refuse)
    monkeypatch.setitem(client_app._TRAINERS, endpoint, stub)
    rc = RoundConfig(server_round=3)
    content = RecordDict({ARRAYS: arrays_to_record(W), CONFIG: ConfigRecord(dict(rc.to_record()))})
    reply = client_app.handle_train(Message(content, 7, MessageType.TRAIN), endpoint)
    ((rnd, kind, payload, metrics),) = stub.outbound
    assert rnd == 3
    if refuse:
        assert reply.has_error() and "site refused" in str(reply.error.reason)
        assert "privacy budget exceeded" in str(reply.error.reason) and kind == "error_reply"
        return
    arrays = arrays_from_record(reply.content.array_records[ARRAYS])
    assert [a.dtype for a in arrays] == [np.float32, np.float32] and float(arrays[1][0]) == 0.5
    assert dict(reply.content.metric_records[METRICS]) == {"train_loss": 1.25, NUM_EXAMPLES: 3} == metrics
    # the exact bytes sent: the packed values and shape table
    assert kind == "train_reply" and payload == payload_bytes(flatten_arrays(arrays))


def test_client_app_failure_keeps_details_at_the_site(tmp_path: Path, monkeypatch, task_identity: None) -> None:
    endpoint = SiteEndpoint(tmp_path / "site")
    stub = StubTrainer("crash", state_dir=tmp_path)
    monkeypatch.setitem(client_app._TRAINERS, endpoint, stub)
    content = RecordDict(
        {ARRAYS: arrays_to_record(W), CONFIG: ConfigRecord(dict(RoundConfig(server_round=2).to_record()))}
    )
    reply = client_app.handle_train(Message(content, 7, MessageType.TRAIN), endpoint)
    reason = str(reply.error.reason)
    assert reply.has_error() and "ValueError" in reason and client_app.SITE_ERROR_LOG in reason
    assert "1.2.3" not in reason and stub.outbound[0][1] == "error_reply"
    log = (tmp_path / client_app.SITE_ERROR_LOG).read_text()
    assert "round 2: local training failed" in log and "study 1.2.3 has 0 slices" in log


def test_scenario_sets_the_sites_min_eval_studies(tmp_path: Path) -> None:
    doc = {"run": {"name": "x", "min_eval_studies": 2}, "sites": TWO}
    sc = Scenario.from_dict(doc)
    assert sc.min_eval_studies == 2 and Scenario.from_dict(sc.to_dict()).min_eval_studies == 2
    with pytest.raises(ValueError, match="min_eval_studies"):
        Scenario.from_dict({"run": {"name": "x", "min_eval_studies": 0}, "sites": TWO})
    with pytest.raises(ValueError, match=r"scenario \[run\] holdout_fraction must be a number in \[0, 1\)"):
        Scenario.from_dict({"run": {"name": "x", "holdout_fraction": 1.0}, "sites": TWO})
    site = tmp_path / "s"
    site.mkdir()
    (site / "site.toml").write_text('[site]\nname = "s"\n[privacy]\nmin_eval_studies = 7\n')
    assert SiteEndpoint(site).client_config().min_eval_studies == 7
    assert SiteEndpoint(site, min_eval_studies=2).client_config().min_eval_studies == 2


def test_summary_says_where_the_initial_tokenizer_came_from(tmp_path: Path) -> None:
    """A federation started from a given package (``--init``) must not claim the public-corpus tokenizer."""
    from lungvl_model.training.stages import public_model_meta
    from simulations.simulate import tokenizer_note

    public = tmp_path / "public"
    public.mkdir()
    (public / "meta.json").write_text(json.dumps({"stage": "init", **public_model_meta()}))
    assert "public synthetic report corpus" in tokenizer_note(public)
    shipped = tokenizer_note(ROOT / "models" / "lungvl-tiny-v1")
    assert "not the public corpus's" in shipped and "sites/train_screening" in shipped
    assert "not recorded" in tokenizer_note(tmp_path / "missing")

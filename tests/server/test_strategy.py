"""DP-FedAvgM rounds: the Flower-free engine (faults, min_sites, DP, budget, resume) and the Flower glue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid

from federation.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, RoundConfig
from federation.records import arrays_from_record, arrays_to_record
from privacy.accountant import PrivacyBudgetExceeded
from server.aggregation import clip_update
from server.config import ServerConfig, round_seed
from server.registry import Registry
from server.round_engine import RoundEngine
from server.round_types import SiteReply
from server.strategy import (
    DPFedAvgM,
)

W0 = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
FEDAVG = {"strategy": "fedavg", "server_momentum": 0.0, "min_sites": 2}


def delta(v: float) -> list[np.ndarray]:
    return [np.full((2, 3), v, np.float32), np.full(4, v, np.float32)]


def make(tmp_path: Path, **cfg: object) -> tuple[RoundEngine, Registry, int]:
    reg = Registry(tmp_path / "reg.db")
    config = ServerConfig.from_dict({**FEDAVG, **cfg})
    run = reg.start_run("t", config.to_dict(), seed=config.seed)
    return RoundEngine(config, W0, registry=reg, run_id=run, log=lambda _: None), reg, run


def play_round(eng: RoundEngine, rnd: int, replies: dict[int, SiteReply | None]) -> object:
    """Sample all nodes in ``replies``; None = the site never answers (timeout)."""
    sampled = eng.sample(replies, rnd)
    eng.begin_round(rnd, sampled, total_sites=len(replies))
    for node in sampled:
        if replies[node] is not None:
            eng.fold(replies[node])
    out = eng.close_round()
    eng.commit_round(out)
    return out


def test_failed_and_nan_replies_are_recorded_and_left_out(tmp_path: Path) -> None:
    eng, reg, run = make(tmp_path)
    eng.site_names = {1: "a", 2: "b", 3: "c", 4: "d"}
    bad = delta(1.0)
    bad[1][2] = np.nan
    out = play_round(
        eng,
        1,
        {
            1: SiteReply(1, arrays=delta(1.0), num_examples=10, metrics={"train_loss": 2.0}),
            2: SiteReply(2, arrays=delta(4.0), num_examples=30, metrics={"train_loss": 1.0}),
            3: SiteReply(3, error="[code 2] site refused: privacy budget exceeded"),
            4: SiteReply(4, arrays=bad, num_examples=10),
        },
    )
    assert out.status == "completed" and out.ok == 2 and out.failed == 2
    expected = (10 * 1.0 + 30 * 4.0) / 40  # example-weighted mean of the two usable updates
    np.testing.assert_allclose(eng.weights[0], expected, rtol=1e-6)
    np.testing.assert_allclose(eng.weights[1], 1 + expected, rtol=1e-6)
    rows = {p["site_name"]: p for p in reg.participation(run, 1)}
    assert {k: v["status"] for k, v in rows.items()} == {"a": "ok", "b": "ok", "c": "failed", "d": "rejected"}
    assert "privacy budget" in rows["c"]["reason"] and "non-finite" in rows["d"]["reason"]
    assert reg.rounds(run)[0]["status"] == "completed" and reg.rounds(run)[0]["sites_failed"] == 2
    glob = {m["name"]: m["value"] for m in reg.metrics(run, "global")}
    assert glob["train_loss"] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)


def test_wrong_shape_and_oversized_updates_are_rejected(tmp_path: Path) -> None:
    eng, reg, run = make(tmp_path, max_update_norm=5.0, min_sites=1)
    wrong = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    out = play_round(
        eng,
        1,
        {
            1: SiteReply(1, arrays=wrong, num_examples=5),
            2: SiteReply(2, arrays=delta(10.0), num_examples=5),  # norm sqrt(10)*10 > 5
            3: SiteReply(3, arrays=delta(0.5), num_examples=5),
        },
    )
    assert out.status == "completed" and out.ok == 1
    reasons = sorted(p["reason"] for p in reg.participation(run, 1) if p["status"] == "rejected")
    assert "shape (3, 2)" in reasons[1] and "max_update_norm" in reasons[0]


def test_too_few_replies_fail_the_round_and_nothing_moves(tmp_path: Path) -> None:
    eng, reg, run = make(tmp_path, strategy="fedavgm", server_momentum=0.9, min_sites=2)
    play_round(
        eng, 1, {1: SiteReply(1, arrays=delta(1.0), num_examples=1), 2: SiteReply(2, arrays=delta(1.0), num_examples=1)}
    )
    w1 = [w.copy() for w in eng.weights]
    m1 = [m.copy() for m in eng.momentum or []]
    out = play_round(
        eng, 2, {1: SiteReply(1, arrays=delta(3.0), num_examples=1), 2: None, 3: SiteReply(3, error="boom")}
    )
    assert out.status == "failed" and out.ok == 1 and out.update_norm is None
    for a, b in zip(eng.weights, w1, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(eng.momentum or [], m1, strict=True):
        np.testing.assert_array_equal(a, b)
    statuses = sorted(p["status"] for p in reg.participation(run, 2))
    assert statuses == ["failed", "ok", "timeout"]
    assert [r["status"] for r in reg.rounds(run)] == ["completed", "failed"]
    assert reg.last_completed_round(run) == 1


def test_server_momentum_accumulates(tmp_path: Path) -> None:
    eng, _, _ = make(tmp_path, strategy="fedavgm", server_momentum=0.5, server_lr=2.0)
    replies = {1: SiteReply(1, arrays=delta(1.0), num_examples=1), 2: SiteReply(2, arrays=delta(1.0), num_examples=1)}
    play_round(eng, 1, replies)
    play_round(eng, 2, replies)
    # v1 = 1, w1 = 2; v2 = 0.5 + 1 = 1.5, w2 = 2 + 3 = 5
    np.testing.assert_allclose(eng.weights[0], 5.0)
    np.testing.assert_allclose(eng.momentum[0], 1.5)  # type: ignore[index]


def test_client_level_dp_clips_adds_seeded_noise_and_epsilon_grows(tmp_path: Path) -> None:
    eng, reg, run = make(
        tmp_path, clip_norm=1.0, client_noise_multiplier=0.7, seed=3, min_sites=2, reproducible_noise=True
    )
    d1, d2 = delta(2.0), delta(0.01)
    out = play_round(eng, 1, {1: SiteReply(1, arrays=d1, num_examples=100), 2: SiteReply(2, arrays=d2, num_examples=1)})
    c1, _ = clip_update(d1, 1.0)
    rng = np.random.default_rng([3, 1, 1])  # the round's noise stream
    expected = [
        (np.asarray(a, np.float64) + b + rng.normal(0.0, 0.7, size=a.shape)) / 2  # uniform, ÷ expected sites
        for a, b in zip(c1, d2, strict=True)
    ]
    for w, e, w0 in zip(eng.weights, expected, W0, strict=True):
        np.testing.assert_allclose(w, w0 + e.astype(np.float32), rtol=1e-6, atol=1e-6)
    clipped = {p["node_id"]: p["clipped"] for p in reg.participation(run, 1)}
    assert clipped == {"1": True, "2": False}
    assert out.epsilon is not None and out.epsilon > 0
    play_round(eng, 2, {1: SiteReply(1, arrays=d1, num_examples=1), 2: SiteReply(2, arrays=d2, num_examples=1)})
    eps = [p["epsilon"] for p in reg.privacy(run) if p["level"] == "client"]
    assert len(eps) == 2 and eps[1] > eps[0] > 0


def test_budget_stops_before_the_round_that_would_pass_it(tmp_path: Path) -> None:
    eng, reg, run = make(tmp_path, clip_norm=1.0, client_noise_multiplier=2.0, target_epsilon=4.5)
    replies = {1: SiteReply(1, arrays=delta(0.1), num_examples=1), 2: SiteReply(2, arrays=delta(0.1), num_examples=1)}
    done = 0
    with pytest.raises(PrivacyBudgetExceeded, match="server: privacy budget exceeded"):
        for rnd in range(1, 100):
            play_round(eng, rnd, replies)
            done = rnd
    assert done == 3  # ε after rounds 1..4 at σ=2, q=1: 2.2, 3.2, 4.0, 4.7
    assert eng.accountant is not None and eng.accountant.epsilon <= 4.5
    assert [r["round"] for r in reg.rounds(run)] == list(range(1, done + 1))  # nothing recorded for the refused round


def test_sample_level_epsilon_reported_by_a_site_goes_to_the_ledger(tmp_path: Path) -> None:
    eng, reg, run = make(tmp_path, min_sites=1)
    eng.site_names = {1: "screening-a"}
    dp = {"epsilon": 1.5, "delta": 1e-5, "dp_sgd_noise_multiplier": 1.1, "sample_rate": 0.2, "dp_steps": 5.0}
    play_round(eng, 1, {1: SiteReply(1, arrays=delta(0.1), num_examples=8, metrics=dp)})
    (row,) = reg.privacy(run)
    assert (
        row["level"] == "sample" and row["site_name"] == "screening-a" and row["epsilon"] == 1.5 and row["steps"] == 5
    )


def test_sampling_is_seeded_by_round_and_site_names_not_node_ids(tmp_path: Path) -> None:
    seeded = {"fraction_train": 0.5, "site_sampling": "fixed", "reproducible_noise": True}
    eng, _, _ = make(tmp_path, **seeded)
    eng.site_names = {10: "a", 20: "b", 30: "c", 40: "d"}
    other, _, _ = make(tmp_path / "o", **seeded)
    other.site_names = {7: "c", 8: "a", 9: "d", 6: "b"}
    for rnd in (1, 2, 3):
        names = sorted(eng.site_names[n] for n in eng.sample(eng.site_names, rnd))
        assert len(names) == 2
        assert names == sorted(other.site_names[n] for n in other.sample(other.site_names, rnd))
    assert round_seed(0, 1) == round_seed(0, 1) != round_seed(0, 2)


def test_state_dict_resume_is_bit_identical(tmp_path: Path) -> None:
    def replies(rnd: int) -> dict[int, SiteReply]:
        rng = np.random.default_rng(rnd)
        return {
            n: SiteReply(n, arrays=[rng.normal(size=w.shape).astype(np.float32) for w in W0], num_examples=n)
            for n in (1, 2, 3)
        }

    cfg = {
        "strategy": "fedavgm",
        "server_momentum": 0.9,
        "clip_norm": 1.0,
        "client_noise_multiplier": 0.8,
        "fraction_train": 0.7,
        "reproducible_noise": True,
    }
    full, _, _ = make(tmp_path / "full", **cfg)
    for rnd in (1, 2, 3):
        play_round(full, rnd, replies(rnd))
    first, _, _ = make(tmp_path / "first", **cfg)
    play_round(first, 1, replies(1))
    state = first.state_dict()
    second, _, _ = make(tmp_path / "second", **cfg)
    second.load_state_dict(state, first.weights)
    for rnd in (2, 3):
        play_round(second, rnd, replies(rnd))
    for a, b in zip(full.weights, second.weights, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert full.accountant is not None and second.accountant is not None
    assert full.accountant.epsilon == second.accountant.epsilon


def test_round_protocol_misuse_is_refused(tmp_path: Path) -> None:
    eng, _, _ = make(tmp_path)
    with pytest.raises(ValueError, match="outside a round"):
        eng.fold(SiteReply(1))
    with pytest.raises(ValueError, match="does not follow"):
        eng.begin_round(2, [1, 2], total_sites=2)


# ---------------------------------------------------------------------------------------------- config


def test_server_config_round_trips_through_toml(tmp_path: Path) -> None:
    p = tmp_path / "server.toml"
    p.write_text("[strategy]\nrounds = 3\nserver_momentum = 0.5\n[dp]\nclient_noise_multiplier = 1\nclip_norm = 2\n")
    cfg = ServerConfig.from_toml(p)
    assert cfg.rounds == 3 and cfg.client_noise_multiplier == 1.0 and cfg.client_dp
    assert ServerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"server_momentun": 0.9}, KeyError, "did you mean 'server_momentum'"),
        ({"strategy": "fedprox"}, ValueError, "strategy"),
        ({"client_noise_multiplier": 1.0}, ValueError, "needs clip_norm"),
        ({"target_epsilon": 5.0}, ValueError, "needs client_noise_multiplier"),
        ({"server_momentum": 1.0}, ValueError, "server_momentum"),
        ({"fraction_train": 0.0}, ValueError, "fraction_train"),
        ({"delta": 1.0}, ValueError, "delta"),
        ({"rounds": 0}, ValueError, "rounds"),
        ({"rounds": "3"}, ValueError, "must be a number"),
    ],
)
def test_invalid_args(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ServerConfig.from_dict(kwargs)


def test_unknown_toml_table_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "server.toml"
    p.write_text("[strategi]\nrounds = 3\n")
    with pytest.raises(KeyError, match="did you mean \\[strategy\\]"):
        ServerConfig.from_toml(p)


# ---------------------------------------------------------------------------------------------- Flower glue


class LocalGrid(Grid):
    """An in-process Grid: each pushed message is answered at once by a ClientApp (or dropped).

    ``silent`` nodes never answer a train message; ``offline`` nodes' train messages are answered by
    the SuperLink's own "node unavailable" error (Flower's function, sent from the SuperLink's node id).
    """

    def __init__(
        self, client_app: ClientApp, nodes: dict[int, str], silent: Iterable[int] = (), offline: Iterable[int] = ()
    ) -> None:
        self.client_app, self.nodes, self.silent, self.offline = client_app, nodes, set(silent), set(offline)
        self.replies: dict[str, Message] = {}

    def set_run(self, run: object) -> None:  # noqa: D102
        pass

    @property
    def run(self) -> object:  # noqa: D102
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]  # noqa: D102
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:  # noqa: D102
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.silent and msg.metadata.message_type == "train":
                continue  # answers the name query, never a train message
            if node in self.offline and msg.metadata.message_type == "train":
                msg.metadata.__dict__["_created_at"] = time.time()
                self.replies[mid] = create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
                continue
            ctx = Context(
                run_id=1, node_id=node, node_config={"name": self.nodes[node]}, state=RecordDict(), run_config={}
            )
            self.replies[mid] = self.client_app(msg, ctx)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:  # noqa: D102
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]  # noqa: D102
        return self.pull_messages(self.push_messages(messages))


def toy_client(behaviour: Callable[[str, int], str]) -> ClientApp:
    """A ClientApp whose update is +1 per coordinate; ``behaviour(name, round)`` picks ok/error/nan."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        rc = RoundConfig.from_record(dict(msg.content.config_records[CONFIG]))
        what = behaviour(str(ctx.node_config["name"]), rc.server_round)
        if what == "error":
            return Message(Error(code=2, reason="site refused: privacy budget exceeded"), reply_to=msg)
        arrays = arrays_from_record(msg.content.array_records[ARRAYS])
        d = [np.full_like(a, np.nan if what == "nan" else 1.0) for a in arrays]
        metrics = MetricRecord({NUM_EXAMPLES: 4, "train_loss": 1.0 / rc.server_round})
        return Message(RecordDict({ARRAYS: arrays_to_record(d), METRICS: metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 2, "val_loss": 0.5})}), reply_to=msg)

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({CONFIG: ConfigRecord({"site_name": str(ctx.node_config["name"])})}), reply_to=msg)

    return app


def test_flower_strategy_keeps_going_past_error_nan_and_silent_sites(tmp_path: Path, task_identity: None) -> None:
    def behaviour(name: str, rnd: int) -> str:
        return {"b": "error", "c": "nan"}.get(name, "ok") if rnd == 1 else "ok"

    nodes = {101: "a", 102: "b", 103: "c", 104: "d", 105: "e"}
    grid = LocalGrid(toy_client(behaviour), nodes, silent={105})
    reg = Registry(tmp_path / "reg.db")
    cfg = ServerConfig(rounds=2, strategy="fedavg", server_momentum=0.0, min_sites=2, round_timeout_s=0.5)
    run = reg.start_run("glue", cfg.to_dict(), seed=0)
    seen: list[int] = []
    strategy = DPFedAvgM(
        cfg, registry=reg, run_id=run, log=lambda _: None, on_round_end=lambda e, o: seen.append(o.round)
    )
    result = strategy.start(grid, arrays_to_record(W0))
    assert seen == [1, 2] and not strategy.stopped_by_budget
    final = arrays_from_record(result.arrays)
    np.testing.assert_allclose(final[0], 2.0)  # +1 per completed round
    status = {(p["round"], p["site_name"]): p["status"] for p in reg.participation(run)}
    assert status[(1, "b")] == "failed" and status[(1, "c")] == "rejected" and status[(1, "e")] == "timeout"
    assert status[(1, "a")] == status[(2, "b")] == status[(2, "c")] == "ok"
    assert [r["status"] for r in reg.rounds(run)] == ["completed", "completed"]
    glob = {(m["round"], m["name"]): m["value"] for m in reg.metrics(run, "global")}
    assert glob[(2, "val_loss")] == 0.5 and glob[(1, "train_loss")] == 1.0
    assert 2 in result.evaluate_metrics_clientapp


def test_a_site_gone_offline_is_recorded_under_its_own_name(tmp_path: Path, task_identity: None) -> None:
    """The SuperLink's "node unavailable" reply comes from the SuperLink's node id, not the site's."""
    nodes = {101: "a", 102: "b", 103: "c"}
    grid = LocalGrid(toy_client(lambda n, r: "ok"), nodes, offline={103})
    reg = Registry(tmp_path / "reg.db")
    cfg = ServerConfig(rounds=1, strategy="fedavg", server_momentum=0.0, min_sites=2, round_timeout_s=30.0)
    run = reg.start_run("offline", cfg.to_dict(), seed=0)
    strategy = DPFedAvgM(cfg, registry=reg, run_id=run, log=lambda _: None)
    t0 = time.time()
    strategy.start(grid, arrays_to_record(W0))
    assert time.time() - t0 < 10  # the error reply closes the round; no wait for the 30 s timeout
    status = {(p["round"], p["site_name"]): (p["status"], p["reason"]) for p in reg.participation(run)}
    assert set(status) == {(1, "a"), (1, "b"), (1, "c")}, status
    assert status[(1, "c")][0] == "failed" and "Node Unavailable" in status[(1, "c")][1]
    assert [r["status"] for r in reg.rounds(run)] == ["completed"]


def test_flower_strategy_stops_cleanly_at_the_budget(task_identity: None) -> None:
    grid = LocalGrid(toy_client(lambda n, r: "ok"), {1: "a", 2: "b"})
    cfg = ServerConfig(
        rounds=50,
        strategy="fedavgm",
        clip_norm=1.0,
        client_noise_multiplier=2.0,
        target_epsilon=3.5,
        fraction_evaluate=0.0,
    )
    strategy = DPFedAvgM(cfg, log=lambda _: None)
    strategy.start(grid, arrays_to_record(W0))
    assert strategy.stopped_by_budget
    assert strategy.engine is not None and strategy.engine.round == 2  # ε 2.2, 3.2, then 4.0 > 3.5
    assert strategy.engine.accountant is not None and strategy.engine.accountant.epsilon <= 3.5


def test_array_record_order_is_by_index() -> None:
    rec = ArrayRecord()
    from flwr.app import Array

    for i in (1, 0):
        rec[str(i)] = Array(np.full(2, i, np.float32))
    assert [a[0] for a in arrays_from_record(rec)] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("[strategy]\nclip_norm = 1.0\n", r"\[strategy\] does not take 'clip_norm'; it belongs in \[dp\]"),
        ("[training]\ndp_sgd = true\n", r"\[training\] does not take 'dp_sgd'; it belongs in \[dp\]"),
        ("[dp]\nnoise_multiplier = 1.0\n", "did you mean 'client_noise_multiplier'"),
        ("[training]\nlocal_steps = 0\n", "'local_steps' must be >= 1"),
        ("[strategy]\nrounds = 2.5\n", "rounds must be an integer"),
        ("[dp]\nclip_norm = 1.0\nclient_noise_multiplier = 1.0\n[strategy]\nfraction_train = 0.5\n"
         "site_sampling = 'fixed'\n", "analyses Poisson sampling only"),
    ],
)  # fmt: skip
def test_strict_tables_take_only_their_own_keys(tmp_path: Path, toml: str, match: str) -> None:
    p = tmp_path / "server.toml"
    p.write_text(toml)
    with pytest.raises((KeyError, ValueError), match=match):
        ServerConfig.from_toml(p)

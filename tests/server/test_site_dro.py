"""Group DRO over sites (server/site_dro.py): the weights, hand-computed rounds with and without client-level
DP clipping, the reset at a curriculum stage boundary, state round trip, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from federation.arrays import model_to_arrays
from lungvl_model.training.checkpoint import load_checkpoint
from server.aggregation import AggregationError, StreamingAggregator
from server.config import ServerConfig
from server.resume import load_round_checkpoint, save_round_checkpoint
from server.round_engine import RoundEngine
from server.round_types import SiteReply
from server.site_dro import dro_scales, dro_weights, update_log_weights
from tests.conftest import micro_checkpoint
from tests.server.test_strategy import W0, delta, play_round

LN3 = math.log(3.0)


def reply(node: int, name: str, value: float, loss: float, n: int = 4) -> SiteReply:
    return SiteReply(node, site_name=name, arrays=delta(value), num_examples=n, metrics={"train_loss": loss})


# site a's update is 1 (4 examples), site b's is 3 (12 examples); a's loss is 1, b's 0
ROUND = {1: reply(1, "a", 1.0, 1.0, n=4), 2: reply(2, "b", 3.0, 0.0, n=12)}


def test_weights_are_the_softmax_and_scales_peak_at_one() -> None:
    assert dro_weights({"a": 0.0, "b": LN3}, ["a", "b"]) == pytest.approx({"a": 0.25, "b": 0.75})
    assert dro_scales({"a": 0.0, "b": LN3}, ["a", "b"]) == pytest.approx({"a": 1 / 3, "b": 1.0})
    assert dro_weights({}, ["x", "y", "z"]) == pytest.approx({"x": 1 / 3, "y": 1 / 3, "z": 1 / 3})
    assert dro_weights({"a": 1e6, "b": 0.0}, ["a", "b"])["a"] == 1.0  # no overflow
    assert update_log_weights({"a": 1.0}, {"a": 2.0, "b": float("nan"), "c": 0.5}, 0.5) == {"a": 2.0, "c": 0.25}
    with pytest.raises(ValueError, match="site 'a' has a non-finite DRO log-weight"):
        dro_weights({"a": float("inf")}, ["a"])
    with pytest.raises(ValueError, match=">= 0, got -1"):
        update_log_weights({}, {}, -1.0)


def test_aggregator_scale_checks_and_weights() -> None:
    agg = StreamingAggregator([(2, 3), (4,)], weighted=False)
    agg.add(delta(1.0), scale=1.0)
    agg.add(delta(3.0), scale=1 / 3)
    np.testing.assert_allclose(agg.finalize()[0], (1 + 1) / (4 / 3))
    with pytest.raises(AggregationError, match=r"scale must be in \(0, 1\], got 1.5"):
        StreamingAggregator([(2, 3), (4,)]).add(delta(1.0), scale=1.5)
    clipped = StreamingAggregator([(2, 3), (4,)], clip_norm=1.0)
    info = clipped.add(delta(3.0), scale=0.5)  # ‖Δ‖ = 3·√10 > 1: clipped to norm 1, then halved
    assert info["clipped"]
    out = clipped.finalize(expected_sites=1.0)
    assert math.sqrt(sum(float(np.square(a).sum()) for a in out)) == pytest.approx(0.5)


def engine(**cfg: object) -> RoundEngine:
    base = {"strategy": "fedavg", "server_momentum": 0.0, "min_sites": 2, "site_dro_step": LN3}
    return RoundEngine(ServerConfig.from_dict({**base, **cfg}), W0, log=lambda _: None)


def test_hand_computed_rounds_without_dp() -> None:
    """Round 1: uniform weights → plain mean (1 + 3) / 2 = 2 (not the example-weighted 2.5). Losses a = 1,
    b = 0 move the log-weights to (ln 3, 0): λ = (0.75, 0.25), scales (1, 1/3). Round 2: (1·1 + 1/3·3) /
    (1 + 1/3) = 1.5, so w = 2 + 1.5 = 3.5."""
    eng = engine()
    play_round(eng, 1, ROUND)
    np.testing.assert_allclose(eng.weights[0], 2.0)
    assert eng.site_log_weights == pytest.approx({"a": LN3, "b": 0.0})
    play_round(eng, 2, ROUND)
    np.testing.assert_allclose(eng.weights[0], 3.5)
    # b's loss of 0 never lifts it: a keeps gaining (log-weights 2·ln 3 and 0)
    assert eng.site_log_weights == pytest.approx({"a": 2 * LN3, "b": 0.0})


def test_hand_computed_rounds_with_clipping() -> None:
    """Clipping at C = 100 (no update is clipped) without noise (site DRO is refused with client-level DP): the
    sum is divided by q·N = 2 whatever the weights. Round 1: (1 + 3) / 2 = 2; round 2: (1·1 + 1/3·3) / 2 = 1."""
    eng = engine(clip_norm=100.0)
    play_round(eng, 1, ROUND)
    np.testing.assert_allclose(eng.weights[0], 2.0)
    play_round(eng, 2, ROUND)
    np.testing.assert_allclose(eng.weights[0], 3.0)


def test_log_weights_start_again_with_each_curriculum_stage() -> None:
    eng = RoundEngine(
        ServerConfig.from_mapping(
            {"strategy": {"strategy": "fedavg", "server_momentum": 0.0, "min_sites": 2, "site_dro_step": LN3},
             "curriculum": [{"stage": "ssl", "rounds": 1}, {"stage": "seg", "rounds": 1}]}
        ),
        W0,
        log=lambda _: None,
    )  # fmt: skip
    play_round(eng, 1, ROUND)
    play_round(eng, 2, ROUND)  # a new stage: uniform again, plain mean 2 (not 1.5)
    np.testing.assert_allclose(eng.weights[0], 4.0)
    assert eng.dro_phase == 1
    # two phases with equal settings are still two phases (counted by position, not by value)
    same = ServerConfig.from_mapping(
        {"strategy": {"strategy": "fedavg", "server_momentum": 0.0, "min_sites": 2, "site_dro_step": LN3},
         "curriculum": [{"stage": "seg", "rounds": 1}, {"stage": "seg", "rounds": 1}]}
    )  # fmt: skip
    eng = RoundEngine(same, W0, log=lambda _: None)
    play_round(eng, 1, ROUND)
    play_round(eng, 2, ROUND)
    np.testing.assert_allclose(eng.weights[0], 4.0)
    assert eng.dro_phase == 1


def test_log_weights_survive_a_checkpoint(tmp_path: Path) -> None:
    eng = engine()
    play_round(eng, 1, ROUND)
    again = engine()
    again.load_state_dict(eng.state_dict(), eng.weights)
    assert again.site_log_weights == eng.site_log_weights and again.dro_phase == 0
    play_round(again, 2, ROUND)
    np.testing.assert_allclose(again.weights[0], 3.5)  # as the uninterrupted run
    # through the files a ServerApp writes (server_state.pt)
    model, _ = load_checkpoint(micro_checkpoint(tmp_path / "init"))
    real = RoundEngine(ServerConfig.from_dict({"site_dro_step": 0.5, "min_sites": 1}), model_to_arrays(model))
    real.site_log_weights, real.round = {"a": 0.7, "b": 0.1}, 1
    save_round_checkpoint(tmp_path / "round_1", model, real, {})
    _, loaded = load_round_checkpoint(tmp_path / "round_1")
    assert loaded["site_log_weights"] == {"a": 0.7, "b": 0.1} and loaded["dro_phase"] == 0


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"site_dro_step": -0.1}, "site_dro_step must be >= 0"),
        ({"site_dro_step": 0.5, "dp_sgd": True}, "DP-SGD sites withhold"),
        ({"site_dro_step": 0.5, "clip_norm": 1.0, "client_noise_multiplier": 1.0}, "one site's losses move every"),
    ],
)
def test_refusals(cfg: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig.from_dict(cfg)

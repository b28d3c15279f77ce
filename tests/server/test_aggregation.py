"""DP-FedAvgM aggregation on tiny arrays, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from server.aggregation import (
    AggregationError,
    StreamingAggregator,
    apply_server_momentum,
    check_update,
    clip_update,
    dp_fedavgm_step,
    l2_norm,
    shapes_of,
)


def f32(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def test_l2_norm_over_all_arrays() -> None:
    assert l2_norm([f32(3.0), np.array([[4.0]])]) == pytest.approx(5.0)
    assert l2_norm([]) == 0.0


def test_clip_update_by_hand() -> None:
    delta = [f32(3.0, 0.0), f32(0.0, 4.0)]  # norm 5
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [0.0, 0.8], rtol=1e-6)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert all(c.dtype == np.float32 for c in clipped)
    np.testing.assert_array_equal(delta[0], [3.0, 0.0])  # input untouched
    small, norm = clip_update([f32(0.3, 0.4)], 1.0)  # inside the ball: unchanged copy
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(small[0], f32(0.3, 0.4))
    zero, norm = clip_update([f32(0.0)], 1.0)
    assert norm == 0.0 and zero[0][0] == 0.0


def test_weighted_mean_by_hand_without_momentum_is_fedavg() -> None:
    w = [f32(1.0, 1.0), f32(2.0)]
    site_a = [f32(2.0, 3.0), f32(2.0)]  # 1 example
    site_b = [f32(5.0, 5.0), f32(6.0)]  # 3 examples
    deltas = [[s - g for s, g in zip(site, w, strict=True)] for site in (site_a, site_b)]
    new_w, v = dp_fedavgm_step(w, deltas, None, num_examples=[1, 3], server_momentum=0.0, server_lr=1.0)
    # FedAvg: (1*site_a + 3*site_b) / 4
    np.testing.assert_allclose(new_w[0], [(2 + 15) / 4, (3 + 15) / 4], rtol=1e-6)
    np.testing.assert_allclose(new_w[1], [(2 + 18) / 4], rtol=1e-6)
    np.testing.assert_allclose(v[0], [(1 + 12) / 4, (2 + 12) / 4], rtol=1e-6)
    assert [a.dtype for a in new_w + v] == [np.float32] * 4


def test_momentum_over_two_rounds_by_hand() -> None:
    w0 = [np.array([0.0, 0.0])]
    beta, eta = 0.5, 2.0
    d1 = [np.array([1.0, 2.0])]
    w1, v1 = dp_fedavgm_step(w0, [d1], None, num_examples=[4], server_lr=eta, server_momentum=beta)
    np.testing.assert_allclose(v1[0], [1.0, 2.0])  # v1 = 0.5*0 + d1
    np.testing.assert_allclose(w1[0], [2.0, 4.0])  # w1 = w0 + 2*v1
    d2a, d2b = [np.array([3.0, 0.0])], [np.array([1.0, 4.0])]
    w2, v2 = dp_fedavgm_step(w1, [d2a, d2b], v1, num_examples=[1, 1], server_lr=eta, server_momentum=beta)
    mean2 = np.array([2.0, 2.0])
    np.testing.assert_allclose(v2[0], 0.5 * np.array([1.0, 2.0]) + mean2)  # [2.5, 3.0]
    np.testing.assert_allclose(w2[0], np.array([2.0, 4.0]) + 2.0 * np.array([2.5, 3.0]))


def test_clipped_uniform_mean_divides_by_expected_sites() -> None:
    w = [np.zeros(2)]
    deltas = [[np.array([3.0, 4.0])], [np.array([0.1, 0.0])]]  # first one clipped to norm 1
    new_w, _ = dp_fedavgm_step(
        w, deltas, None, num_examples=[1000, 1], clip_norm=1.0, expected_sites=4, server_momentum=0.0
    )
    np.testing.assert_allclose(new_w[0], (np.array([0.6, 0.8]) + np.array([0.1, 0.0])) / 4)


def test_streaming_reports_norm_and_clipping() -> None:
    agg = StreamingAggregator([(2,)], clip_norm=1.0)
    assert agg.add([np.array([3.0, 4.0])]) == {"norm": pytest.approx(5.0), "clipped": True}
    assert agg.add([np.array([0.6, 0.8])]) == {"norm": pytest.approx(1.0), "clipped": False}
    assert agg.count == 2
    np.testing.assert_allclose(agg.finalize(expected_sites=2)[0], [0.6, 0.8])


@pytest.mark.parametrize("weighted", [True, False])
def test_streaming_without_clipping(weighted: bool) -> None:
    agg = StreamingAggregator([(1,)], weighted=weighted)
    agg.add([f32(1.0)], num_examples=3)
    agg.add([f32(5.0)], num_examples=1)
    out = agg.finalize()
    assert out[0].dtype == np.float32
    assert out[0][0] == pytest.approx(2.0 if weighted else 3.0)


def test_noise_std_matches_sigma_c_over_expected_sites() -> None:
    sigma, c, m = 1.5, 2.0, 3.0  # std per coordinate = sigma * c / m = 1.0
    rng = np.random.default_rng(0)
    w = [np.zeros(10, dtype=np.float32)]
    draws = np.stack(
        [
            dp_fedavgm_step(
                w,
                [[np.zeros(10, dtype=np.float32)]],
                None,
                clip_norm=c,
                noise_multiplier=sigma,
                expected_sites=m,
                server_momentum=0.0,
                rng=rng,
            )[0][0]
            for _ in range(2000)
        ]
    )
    assert draws.dtype == np.float32
    assert draws.std() == pytest.approx(sigma * c / m, rel=0.03)
    assert abs(draws.mean()) < 0.03
    assert np.corrcoef(draws[:, 0], draws[:, 1])[0, 1] == pytest.approx(0.0, abs=0.1)


def test_streaming_equals_batch_exactly() -> None:
    rng = np.random.default_rng(7)
    shapes = [(3, 2), (4,), ()]
    w = [rng.normal(size=s).astype(np.float32) for s in shapes]
    v = [rng.normal(size=s).astype(np.float32) for s in shapes]
    deltas = [[rng.normal(scale=k + 1, size=s).astype(np.float32) for s in shapes] for k in range(4)]
    counts = [5, 1, 2, 9]
    for dp in (dict(clip_norm=1.5, noise_multiplier=0.7, expected_sites=3.5), {}):
        batch = dp_fedavgm_step(
            w, deltas, v, num_examples=counts, server_lr=0.5, server_momentum=0.8, rng=np.random.default_rng(3), **dp
        )
        agg = StreamingAggregator(shapes_of(w), clip_norm=dp.get("clip_norm"))
        for d, n in zip(deltas, counts, strict=True):
            agg.add(d, n)
        mean = agg.finalize(
            expected_sites=dp.get("expected_sites"),
            noise_multiplier=dp.get("noise_multiplier", 0.0),
            rng=np.random.default_rng(3),
        )
        stream = apply_server_momentum(w, mean, v, server_lr=0.5, server_momentum=0.8)
        for a, b in zip(batch[0] + batch[1], stream[0] + stream[1], strict=True):
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_array_equal(a, b)


def test_same_seed_same_noise_and_no_sites_is_pure_noise() -> None:
    def run(seed: int) -> np.ndarray:
        agg = StreamingAggregator([(5,)], clip_norm=1.0)
        return agg.finalize(expected_sites=2, noise_multiplier=1.0, rng=np.random.default_rng(seed))[0]

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


@pytest.mark.parametrize(
    ("delta", "match"),
    [
        ([f32(1.0, 2.0), f32(np.nan, np.inf, 0.0)], r"array 1: 2 non-finite"),
        ([f32(1.0, 2.0), f32(1.0, 2.0)], r"array 1: shape \(2,\), expected \(3,\)"),
        ([f32(1.0, 2.0)], r"1 arrays, expected 2"),
        ([np.array(["a", "b"]), f32(0, 0, 0)], r"array 0: dtype"),
    ],
)
def test_check_update_rejects(delta: list[np.ndarray], match: str) -> None:
    with pytest.raises(AggregationError, match=match):
        check_update(delta, [(2,), (3,)])


def test_bad_update_in_a_round_names_site_and_array() -> None:
    w = [np.zeros(2), np.zeros(1)]
    good, bad = [np.ones(2), np.ones(1)], [np.ones(2), np.array([np.inf])]
    with pytest.raises(AggregationError, match=r"site 1: update array 1: 1 non-finite"):
        dp_fedavgm_step(w, [good, bad], None, num_examples=[1, 1])
    with pytest.raises(AggregationError, match=r"array 0: shape \(3,\)"):
        StreamingAggregator(shapes_of(w)).add([np.ones(3), np.ones(1)])


W = [np.zeros(2)]
D = [[np.ones(2)]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_examples=[1], clip_norm=-1.0, expected_sites=2), r"clip_norm .* got -1.0"),
        (dict(num_examples=[1], clip_norm=1.0, expected_sites=0.5), r"expected_sites must be >= 1, got 0.5"),
        (dict(num_examples=[1], clip_norm=1.0), r"expected_sites is required"),
        (dict(num_examples=[1], noise_multiplier=1.0), r"noise_multiplier=1.0 needs clip_norm"),
        (dict(num_examples=[1], expected_sites=3), r"expected_sites=3 only applies with clip_norm"),
        (dict(num_examples=[1, 2]), r"num_examples has 2 entries for 1 updates"),
        (dict(), r"num_examples is required"),
        (dict(num_examples=[0]), r"num_examples must be a positive integer, got 0"),
        (dict(num_examples=[1], server_momentum=1.0), r"server_momentum must be in \[0, 1\), got 1.0"),
        (dict(num_examples=[1], server_lr=0.0), r"server_lr .* got 0.0"),
        (
            dict(num_examples=[1], clip_norm=1.0, expected_sites=2, noise_multiplier=-0.1),
            r"noise_multiplier .* got -0.1",
        ),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    with pytest.raises(AggregationError, match=match):
        dp_fedavgm_step(W, D, None, **kwargs)


def test_invalid_streaming_use() -> None:
    with pytest.raises(AggregationError, match="weighted=True cannot be combined"):
        StreamingAggregator([(2,)], clip_norm=1.0, weighted=True)
    with pytest.raises(AggregationError, match="no updates"):
        StreamingAggregator([(2,)]).finalize()
    agg = StreamingAggregator([(2,)])
    agg.add([np.ones(2)])
    agg.finalize()
    with pytest.raises(AggregationError, match="after finalize"):
        agg.add([np.ones(2)])
    with pytest.raises(AggregationError, match="already called"):
        agg.finalize()
    with pytest.raises(AggregationError, match=r"momentum array 0: shape \(3,\)"):
        apply_server_momentum(W, [np.ones(2)], [np.ones(3)], server_lr=1.0, server_momentum=0.9)
    assert issubclass(AggregationError, ValueError)

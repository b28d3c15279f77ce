"""Privacy against the people in the federation: secret noise, Poisson site sampling, independent ε.

A participating site knows its own update, the round config, the seed and every global model it
receives; with noise drawn from ``(seed, round)`` it could replay the noise and read another site's
clipped update off two consecutive global models. These tests play that attack, check that the
client-level ε is what an independent accountant (Google's ``dp_accounting``) gives for Poisson site
sampling, and that Poisson sampling divides by the fixed expected count.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from server.aggregation import clip_update
from server.config import ServerConfig
from server.registry import Registry
from server.round_engine import NOISE_STREAM, RoundEngine, round_rng
from server.round_types import SiteReply
from server.status import render_status

# Enough coordinates for the residual RMS to be a sharp estimate of the noise std (±~1 %).
W0 = [np.zeros((64, 64), np.float32), np.zeros(2000, np.float32)]
SIGMA, C = 1.0, 1.0
ATTACK = {"strategy": "fedavg", "server_momentum": 0.0, "server_lr": 1.0, "min_sites": 2}
ATTACK |= {"clip_norm": C, "client_noise_multiplier": SIGMA, "seed": 11, "fraction_train": 1.0}


def update(seed: int, norm: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    d = [rng.normal(size=w.shape).astype(np.float32) for w in W0]
    scale = norm / float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in d)))
    return [(a * scale).astype(np.float32) for a in d]


def one_round(config: ServerConfig, replies: dict[int, SiteReply], rnd: int = 1) -> RoundEngine:
    eng = RoundEngine(config, W0, log=lambda _: None)
    eng.site_names = {n: f"site-{n}" for n in replies}
    sampled = eng.sample(replies, rnd)
    eng.begin_round(rnd, sampled, total_sites=len(replies))
    for n in sampled:
        eng.fold(replies[n])
    eng.commit_round(eng.close_round())
    return eng


def rms(arrays: list[np.ndarray]) -> float:
    flat = np.concatenate([a.reshape(-1).astype(np.float64) for a in arrays])
    return float(np.sqrt(np.mean(flat**2)))


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_site_cannot_read_another_sites_update_off_two_global_models(reproducible: bool) -> None:
    cfg = ServerConfig.from_dict({**ATTACK, "reproducible_noise": reproducible})
    delta_a, delta_b = update(1, 3.0), update(2, 2.0)  # both above C: both clipped
    eng = one_round(
        cfg, {1: SiteReply(1, arrays=delta_a, num_examples=5), 2: SiteReply(2, arrays=delta_b, num_examples=7)}
    )

    # Site A's view: w_0, w_1, its own update, the config (σ, C, seed, fraction, N = 2 sites).
    expected_sites = cfg.fraction_train * 2
    clipped_a, _ = clip_update(delta_a, C)
    guess = [
        (w1.astype(np.float64) - w0) * expected_sites - a for w1, w0, a in zip(eng.weights, W0, clipped_a, strict=True)
    ]
    replay = np.random.default_rng([cfg.seed, 1, 1])  # the noise stream of the old seeded engine
    replayed = [g - replay.normal(0.0, SIGMA * C, size=g.shape) for g in guess]

    truth, _ = clip_update(delta_b, C)  # what the attack is after: B's clipped update
    plain = rms([g - b for g, b in zip(guess, truth, strict=True)])
    with_replay = rms([g - b for g, b in zip(replayed, truth, strict=True)])
    if reproducible:  # the seeded noise is replayed exactly: B's update is in the clear
        assert with_replay < 1e-5, with_replay
        assert plain == pytest.approx(SIGMA * C, rel=0.3)
    else:  # secret noise: whatever the attacker subtracts, B's update stays under noise of std σ·C
        assert plain == pytest.approx(SIGMA * C, rel=0.3), plain
        assert with_replay > 0.7 * SIGMA * C, with_replay
        assert with_replay == pytest.approx(np.sqrt(2) * SIGMA * C, rel=0.3)  # independent noise, twice


@pytest.mark.parametrize("reproducible", [False, True])
def test_two_runs_with_the_same_seed_release_different_noise_unless_reproducible(reproducible: bool) -> None:
    cfg = ServerConfig.from_dict({**ATTACK, "reproducible_noise": reproducible})
    replies = {n: SiteReply(n, arrays=update(n, 0.5), num_examples=3) for n in (1, 2)}
    first, second = one_round(cfg, replies), one_round(cfg, replies)
    same = all(a.tobytes() == b.tobytes() for a, b in zip(first.weights, second.weights, strict=True))
    assert same == reproducible
    if not reproducible:  # and the difference is the size of the noise, not rounding
        assert rms([a - b for a, b in zip(first.weights, second.weights, strict=True)]) > 0.3 * SIGMA * C


def test_study_cells_never_share_noise(tmp_path: Path) -> None:
    from simulations import study_run
    from simulations.study_config import StudyConfig

    studies = Path(__file__).resolve().parents[2] / "simulations" / "studies"
    s = StudyConfig.from_toml(studies / "screening_vs_referral_small.toml")
    base = study_run.base_scenario(s)
    dirs = {x.name: tmp_path / x.name for x in base.sites}
    sizes = dict.fromkeys(dirs, 5)
    cells = {c.cell_id: c for c in s.cells()}
    ids = ("fedavgm-lr1-m0.9-client2-s0", "fedavgm-lr1-m0.9-client8-s0")
    secret = [study_run.cell_scenario(s, base, cells[i], dirs, sizes)[0].server for i in ids]
    assert all(not c.reproducible_noise and c.noise_key == "" for c in secret)
    seeded = [study_run.cell_scenario(s, base, cells[i], dirs, sizes, reproducible_noise=True)[0].server for i in ids]
    assert all(c.reproducible_noise and c.seed == 0 for c in seeded)
    assert seeded[0].noise_key != seeded[1].noise_key
    draws = [round_rng(c, 1, NOISE_STREAM).normal(size=8) for c in seeded]
    assert not np.array_equal(draws[0], draws[1])  # same seed, different cells: different noise
    again = round_rng(seeded[0], 1, NOISE_STREAM).normal(size=8)
    np.testing.assert_array_equal(draws[0], again)  # but each cell is repeatable
    with pytest.raises(ValueError, match="noise_key"):
        ServerConfig(noise_key="x")


# ---------------------------------------------------------------------------------------- Poisson sampling


def test_poisson_sampling_frequency_is_q_and_the_divisor_is_q_times_n(tmp_path: Path) -> None:
    q, n_sites = 0.3, 20
    eng = RoundEngine(ServerConfig(fraction_train=q, min_sites=1), W0[:1], log=lambda _: None)
    nodes = list(range(1, n_sites + 1))
    draws = [eng.sample(nodes, rnd) for rnd in range(1, 501)]
    counts = np.array([len(d) for d in draws])
    freq = np.array([sum(n in d for d in draws) for n in nodes]) / len(draws)
    assert abs(freq.mean() - q) < 0.02 and np.all(np.abs(freq - q) < 0.1), freq
    assert len(set(counts.tolist())) > 4  # the realised count varies from round to round

    # The clipped mean divides by q·N = 2 whatever the realised count (σ = 0 to read it exactly).
    cfg = ServerConfig(fraction_train=0.5, min_sites=1, clip_norm=100.0, strategy="fedavg", server_momentum=0.0)
    eng = RoundEngine(cfg, [np.zeros(3, np.float32)], log=lambda _: None)
    seen: set[int] = set()
    for rnd in range(1, 41):
        before = eng.weights[0].copy()
        sampled = eng.sample([1, 2, 3, 4], rnd)
        eng.begin_round(rnd, sampled, total_sites=4)
        for node in sampled:
            eng.fold(SiteReply(node, arrays=[np.ones(3, np.float32)], num_examples=1 + node))
        out = eng.close_round()
        eng.commit_round(out)
        if out.status == "completed":
            seen.add(len(sampled))
            np.testing.assert_allclose(eng.weights[0] - before, len(sampled) / 2.0, rtol=1e-6)
    assert len(seen - {2}) >= 1  # rounds whose realised count was not q·N = 2


def test_fixed_sampling_draws_a_fixed_number_without_client_dp() -> None:
    eng = RoundEngine(ServerConfig(fraction_train=0.5, site_sampling="fixed"), W0, log=lambda _: None)
    assert {len(eng.sample(range(10), rnd)) for rnd in range(1, 30)} == {5}


# ---------------------------------------------------------------------------------------- ε, independently


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_dp_accounting_for_poisson_site_sampling(tmp_path: Path, accountant: str) -> None:
    """The project's ε after T rounds at q = fraction_train equals Google's dp_accounting for the same events.

    RDP: dp_accounting's RdpAccountant (its default orders, a superset of Opacus' 1.1..63) composing T
    ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``; PRV: its PLD accountant, the same privacy loss
    distribution computed another way. Every round counts, the ones whose Poisson draw fell below
    ``min_sites`` included.
    """
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    q, sigma, n_sites, rounds, delta = 0.25, 1.0, 10, 12, 1e-5  # q·N = 2.5: no fixed-size draw has this q
    cfg = ServerConfig(
        fraction_train=q, min_sites=2, clip_norm=1.0, client_noise_multiplier=sigma, delta=delta, accountant=accountant
    )
    reg = Registry(tmp_path / "reg.db")
    run = reg.start_run("eps", cfg.to_dict(), seed=0)
    eng = RoundEngine(cfg, [np.zeros(4, np.float32)], registry=reg, run_id=run, log=lambda _: None)
    statuses = []
    for rnd in range(1, rounds + 1):
        sampled = eng.sample(range(n_sites), rnd)
        eng.begin_round(rnd, sampled, total_sites=n_sites)
        for node in sampled:
            eng.fold(SiteReply(node, arrays=[np.full(4, 0.1, np.float32)], num_examples=1))
        out = eng.close_round()
        eng.commit_round(out)
        statuses.append(out.status)
    acc = eng.accountant
    assert acc is not None and acc.rounds == rounds and acc.sample_rate == pytest.approx(q)
    ledger = [p for p in reg.privacy(run) if p["level"] == "client"]
    assert [p["round"] for p in ledger] == list(range(1, rounds + 1))
    assert all(p["sample_rate"] == pytest.approx(q) for p in ledger)

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    independent = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    independent.compose(event)
    expected = independent.get_epsilon(delta)
    assert acc.epsilon == pytest.approx(expected, rel=0.02), (acc.epsilon, expected)
    assert ledger[-1]["epsilon"] == pytest.approx(acc.epsilon)


# ---------------------------------------------------------------------------------------- what status says


def render(reg: Registry) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(*render_status(reg))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_status_shows_the_sampling_and_flags_reproducible_noise(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "s.db")
    seeded = ServerConfig(fraction_train=0.5, clip_norm=1.0, client_noise_multiplier=1.0, reproducible_noise=True)
    reg.start_run("research", {"server": seeded.to_dict()}, seed=0)
    text = render(reg)
    assert "noise reproducible: not private" in text and "poisson, q=0.5" in text
    reg.start_run("private", {"server": ServerConfig(fraction_train=0.5).to_dict()}, seed=0)
    text = render(reg)
    assert "not private" not in text and "secret" in text and "poisson, q=0.5" in text

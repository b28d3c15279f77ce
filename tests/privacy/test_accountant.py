"""Privacy accountant: agreement with Opacus, monotone ε, persistence, budgets, registry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier as opacus_get_noise_multiplier

import privacy.accountant as accountant_module
from privacy.accountant import (
    ACCOUNTANT_STATE_FILE,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    available_accountants,
    create_accountant,
    get_noise_multiplier,
    register_accountant,
)
from privacy.budget import ClientLevelAccountant, SiteBudget

DELTA = 1e-5
OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_equals_opacus_called_directly(name: str) -> None:
    ours = PrivacyAccountant(name)
    ours.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=3)
    ours.step(noise_multiplier=1.5, sample_rate=0.2)
    ours.step(noise_multiplier=1.5, sample_rate=0.2)
    theirs = OPACUS[name]()
    for sigma, q in [(1.0, 0.1)] * 3 + [(1.5, 0.2)] * 2:
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.history == [tuple(h) for h in theirs.history] == [(1.0, 0.1, 3), (1.5, 0.2, 2)]
    assert ours.steps == 5 and len(ours) == 2
    assert ours.get_epsilon(DELTA) == theirs.get_epsilon(delta=DELTA) > 0


def test_no_steps_means_no_epsilon() -> None:
    # Opacus' PRV accountant raises on an empty history; the wrapper answers 0.
    assert PrivacyAccountant("prv").get_epsilon(DELTA) == 0.0
    assert PrivacyAccountant("rdp").get_epsilon(DELTA) == 0.0


# Opacus' RDP costs up to ~0.2 s per history entry for large σ·q (fractional orders): keep the ranges modest.
mechanisms = st.tuples(
    st.floats(min_value=0.5, max_value=3.0),
    st.floats(min_value=1e-3, max_value=0.3),
    st.integers(min_value=1, max_value=200),
)


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
@settings(max_examples=10, deadline=None)
@given(st.lists(mechanisms, min_size=1, max_size=3))
def test_epsilon_never_decreases_rdp(steps: list[tuple[float, float, int]]) -> None:
    acc = PrivacyAccountant("rdp")
    previous = 0.0
    for sigma, q, n in steps:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        eps = acc.get_epsilon(DELTA)
        assert eps >= previous
        previous = eps


def test_epsilon_never_decreases_prv() -> None:
    # PRV is slow (~0.3 s per ε) and numerical (its mesh depends on the step count): a few points only.
    acc = PrivacyAccountant("prv")
    eps = []
    for sigma, q, n in [(1.0, 0.05, 1), (1.0, 0.05, 9), (2.0, 0.5, 3)]:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        eps.append(acc.get_epsilon(DELTA))
    assert eps == sorted(eps) and eps[0] > 0


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_state_round_trip_continues_identically(tmp_path: Path, name: str) -> None:
    acc = PrivacyAccountant(name)
    acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=7)
    acc.step(noise_multiplier=0.9, sample_rate=1 / 3)
    state = acc.state_dict()
    assert json.loads(json.dumps(state)) == state
    path = tmp_path / "acc.json"
    acc.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["acc.json"]  # no temporary file left behind
    restored = PrivacyAccountant.load(path)
    assert restored.name == name and restored.history == acc.history
    for a in (acc, restored):
        a.step(noise_multiplier=0.9, sample_rate=1 / 3, num_steps=2)  # merges with the last entry
    assert restored.history == acc.history == [(1.1, 0.01, 7), (0.9, 1 / 3, 3)]
    assert restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    fresh = PrivacyAccountant(name)
    fresh.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert fresh.history == acc.history


def test_load_state_dict_rejects_bad_state() -> None:
    state = PrivacyAccountant("rdp").state_dict()
    with pytest.raises(ValueError, match="'rdp' cannot be loaded into a 'prv'"):
        PrivacyAccountant("prv").load_state_dict(state)
    with pytest.raises(ValueError, match=r"history entry 1 = \[1.0, 0.0, 2\] is invalid"):
        PrivacyAccountant("rdp").load_state_dict({**state, "history": [[1.0, 0.1, 1], [1.0, 0.0, 2]]})
    with pytest.raises(ValueError, match="needs 'name' and 'history'"):
        PrivacyAccountant("rdp").load_state_dict({"mechanism": "rdp"})


def test_would_exceed_does_not_mutate() -> None:
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)
    before_eps, before_hist = acc.get_epsilon(DELTA), acc.history
    kw = dict(delta=DELTA, noise_multiplier=1.0, sample_rate=0.1, num_steps=30)
    after = acc.epsilon_after(**kw)
    assert acc.would_exceed(target_epsilon=after - 0.01, **kw)
    assert not acc.would_exceed(target_epsilon=after + 0.01, **kw)
    assert acc.history == before_hist and acc.get_epsilon(DELTA) == before_eps
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=30)
    assert acc.get_epsilon(DELTA) == after


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")  # Opacus' doubling search visits σ = 20, 40
def test_get_noise_multiplier_meets_target() -> None:
    target, q, steps = 3.0, 0.05, 200
    sigma = get_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert target - 0.01 <= acc.get_epsilon(DELTA) <= target
    assert sigma == opacus_get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps)
    with pytest.raises(KeyError, match="did you mean 'rdp'"):
        get_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant="rpd")
    with pytest.raises(ValueError, match="target_epsilon must be > 0, got 0"):
        get_noise_multiplier(target_epsilon=0, delta=DELTA, sample_rate=q, steps=steps)


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accountant_module, "_ACCOUNTANTS", dict(accountant_module._ACCOUNTANTS))
    assert {"rdp", "prv"} <= set(available_accountants())
    with pytest.raises(ValueError, match="'rdp' is already registered"):
        register_accountant("rdp", PRVAccountant)
    with pytest.raises(KeyError, match="did you mean 'prv'"):
        create_accountant("prb")
    with pytest.raises(TypeError, match="IAccountant subclass"):
        register_accountant("mine", dict)  # type: ignore[arg-type]

    class MyRDP(RDPAccountant):
        pass

    register_accountant("my-rdp", MyRDP)
    assert isinstance(create_accountant("my-rdp"), MyRDP)
    acc = PrivacyAccountant("my-rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.5)
    assert acc.state_dict()["name"] == "my-rdp"
    register_accountant("my-rdp", RDPAccountant, force=True)
    assert type(create_accountant("my-rdp")) is RDPAccountant


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(noise_multiplier=0.0, sample_rate=0.1), "noise_multiplier must be finite and > 0.*got 0.0"),
        (dict(noise_multiplier=1.0, sample_rate=0.0), r"sample_rate must be in \(0, 1\], got 0.0"),
        (dict(noise_multiplier=1.0, sample_rate=1.5), r"sample_rate must be in \(0, 1\], got 1.5"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=0), "num_steps must be an integer >= 1, got 0"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=2.5), "num_steps must be an integer >= 1, got 2.5"),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    acc = PrivacyAccountant("rdp")
    with pytest.raises(ValueError, match=match):
        acc.step(**kwargs)
    assert acc.history == []


def test_invalid_delta_and_positional_use() -> None:
    acc = PrivacyAccountant("rdp")
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 1.0"):
        acc.get_epsilon(1.0)
    with pytest.raises(TypeError):
        acc.step(1.0, 0.1)  # type: ignore[misc]  # keyword-only


def test_budget_exceeded_message_names_the_numbers() -> None:
    err = PrivacyBudgetExceeded(spent=4.2, requested=5.39, target=5.0, delta=1e-5, who="site")
    assert isinstance(err, RuntimeError)
    assert (err.spent, err.requested, err.target) == (4.2, 5.39, 5.0)
    for text in ("4.2", "5.39", "target ε = 5", "1e-05", "site"):
        assert text in str(err)


def test_client_level_accountant() -> None:
    server = ClientLevelAccountant(
        total_sites=10, expected_sites=3, noise_multiplier=1.2, delta=DELTA, target_epsilon=4.0
    )
    assert server.sample_rate == pytest.approx(0.3)
    reference = PrivacyAccountant("rdp")
    for _ in range(3):
        server.check_next_round()
        eps = server.step_round()
        reference.step(noise_multiplier=1.2, sample_rate=0.3)
        assert eps == reference.get_epsilon(DELTA)
    assert server.rounds == 3
    while server.next_round_epsilon() <= 4.0:
        server.step_round()
    with pytest.raises(PrivacyBudgetExceeded, match="server: privacy budget exceeded") as info:
        server.check_next_round()
    assert info.value.spent <= 4.0 < info.value.requested
    again = ClientLevelAccountant(total_sites=10, expected_sites=3, noise_multiplier=1.2, delta=DELTA)
    again.load_state_dict(json.loads(json.dumps(server.state_dict())))
    assert again.rounds == server.rounds and again.epsilon == server.epsilon
    with pytest.raises(ValueError, match=r"expected_sites must be in \(0, total_sites=10\], got 11"):
        ClientLevelAccountant(total_sites=10, expected_sites=11, noise_multiplier=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="total_sites must be an integer >= 1, got 0"):
        ClientLevelAccountant(total_sites=0, expected_sites=1, noise_multiplier=1.0, delta=DELTA)


@dataclass(frozen=True)
class _PrivacyConfig:
    epsilon_budget: float
    delta: float


def test_site_budget_refuses_past_budget_and_survives_restart(tmp_path: Path) -> None:
    train = dict(noise_multiplier=1.0, sample_rate=0.1, steps=20)  # ε ≈ 4.2 after 20 steps, ≈ 5.4 after 40
    site = SiteBudget(tmp_path, epsilon_budget=5.0, delta=DELTA)
    assert site.spent == 0.0 and not (tmp_path / ACCOUNTANT_STATE_FILE).exists()
    projected = site.check_can_train(**train)
    spent = site.record(**train)
    assert spent == projected == site.spent < 5.0
    assert json.loads((tmp_path / ACCOUNTANT_STATE_FILE).read_text())["history"] == [[1.0, 0.1, 20]]
    with pytest.raises(PrivacyBudgetExceeded, match="site: privacy budget exceeded") as info:
        site.check_can_train(**train)
    assert info.value.target == 5.0 and info.value.requested > 5.0

    # a restart: a new instance reads the state file and still refuses
    restarted = SiteBudget.from_config(tmp_path, {"epsilon_budget": 5.0, "delta": DELTA})
    assert restarted.spent == spent and restarted.remaining == pytest.approx(5.0 - spent)
    with pytest.raises(PrivacyBudgetExceeded):
        restarted.check_can_train(**train)
    assert restarted.check_can_train(noise_multiplier=1.0, sample_rate=0.1, steps=1) <= 5.0
    bigger = SiteBudget.from_config(tmp_path, _PrivacyConfig(epsilon_budget=8.0, delta=DELTA))
    bigger.record(**train)
    assert SiteBudget(tmp_path, epsilon_budget=8.0, delta=DELTA).accountant.steps == 40

    with pytest.raises(ValueError, match="holds a 'rdp' accountant state, but 'prv' was asked for"):
        SiteBudget(tmp_path, epsilon_budget=8.0, delta=DELTA, accountant="prv")
    with pytest.raises(KeyError, match="lacks \\['delta'\\]"):
        SiteBudget.from_config(tmp_path, {"epsilon_budget": 5.0})
    with pytest.raises(ValueError, match="epsilon_budget must be > 0, got -1"):
        SiteBudget(tmp_path, epsilon_budget=-1, delta=DELTA)


def test_noise_for_a_curriculum_schedule_keeps_every_phase_under_the_target() -> None:
    """A seg phase (batch 4 of 6 patients, 16 steps) then a vl phase (batch 2 of 6, 8 steps) at ε = 2."""
    from privacy.accountant import get_noise_multiplier_for_schedule

    schedule = [(4 / 6, 16), (2 / 6, 8)]
    sigma = get_noise_multiplier_for_schedule(target_epsilon=2.0, delta=DELTA, schedule=schedule)
    acc = PrivacyAccountant("rdp")
    for q, n in schedule:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    assert 2.0 - 0.01 <= acc.get_epsilon(DELTA) < 2.0  # tight: the smallest σ within the tolerance
    # between the first phase alone and every step at the larger q
    alone = get_noise_multiplier(target_epsilon=2.0, delta=DELTA, sample_rate=4 / 6, steps=16)
    worst = get_noise_multiplier(target_epsilon=2.0, delta=DELTA, sample_rate=4 / 6, steps=24)
    assert alone < sigma < worst
    # the independent accountant agrees that the composition stays under 2
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    independent = RdpAccountant()
    for q, n in schedule:
        independent.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
            )
        )
    assert independent.get_epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=0.02)
    # one phase is get_noise_multiplier's value; bad phases are named
    assert get_noise_multiplier_for_schedule(target_epsilon=2.0, delta=DELTA, schedule=[(0.5, 10)]) == (
        get_noise_multiplier(target_epsilon=2.0, delta=DELTA, sample_rate=0.5, steps=10)
    )
    with pytest.raises(ValueError, match="phase 1: .*"):
        get_noise_multiplier_for_schedule(target_epsilon=2.0, delta=DELTA, schedule=[(0.5, 10), (1.5, 3)])
    with pytest.raises(ValueError, match="at least one"):
        get_noise_multiplier_for_schedule(target_epsilon=2.0, delta=DELTA, schedule=[])

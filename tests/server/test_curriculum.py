"""The federated curriculum: parsing ``[[curriculum]]``, the round config of each round, the learning-rate
schedule, momentum reset at a stage boundary (hand-computed) and resumption across a boundary."""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest

from server.config import ServerConfig
from server.curriculum import CurriculumPhase, phase_at, phase_starts, scheduled_lr
from server.round_engine import RoundEngine
from server.round_types import SiteReply
from tests.server.test_strategy import W0, delta, play_round

FOUR_STAGES = """
[training]
local_steps = 3
lr = 1e-3
batch_size = 2

[[curriculum]]
stage = "text"
rounds = 2
local_steps = 10

[[curriculum]]
stage = "ssl"
rounds = 1

[[curriculum]]
stage = "seg"
rounds = 3
seg_patch = 32
seg_fg_prob = 0.5
lr_schedule = "cosine"

[[curriculum]]
stage = "vl"
rounds = 2
lr = 3e-4
"""


def parse(text: str) -> ServerConfig:
    return ServerConfig.from_mapping(tomllib.loads(text))


def test_each_round_gets_its_phase_settings() -> None:
    c = parse(FOUR_STAGES)
    assert c.rounds == 8  # the phases' sum, rounds not given
    got = [c.round_config(r) for r in range(1, 9)]
    assert [r.stage for r in got] == ["text", "text", "ssl", "seg", "seg", "seg", "vl", "vl"]
    assert [r.local_steps for r in got] == [10, 10, 3, 3, 3, 3, 3, 3]  # unset: [training]'s
    assert [r.seg_patch for r in got] == [0, 0, 0, 32, 32, 32, 0, 0]
    assert got[3].seg_fg_prob == 0.5 and got[0].seg_fg_prob == 0.67 and got[3].seg_hard_negative_prob == 0.5
    # cosine over the 3 seg rounds: peak, half-way (0.1 + 0.9·0.5 = 0.55 of the peak), floor (0.1)
    assert [r.lr for r in got[3:6]] == pytest.approx([1e-3, 0.55e-3, 1e-4])
    assert [r.lr for r in got[:3]] == [1e-3] * 3 and [r.lr for r in got[6:]] == [3e-4] * 2
    assert len({r.seed for r in got}) == 8  # the round seed still changes every round
    # a round past the end (a resumed run) keeps the last phase
    assert c.round_config(9).stage == "vl" and c.round_config(9).lr == 3e-4


def test_round_trips_through_json_and_scenario_layout() -> None:
    c = parse(FOUR_STAGES)
    again = ServerConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    assert again.to_dict()["curriculum"][2] == {
        "stage": "seg", "rounds": 3, "local_steps": 3, "lr": 1e-3, "batch_size": 2, "lr_schedule": "cosine",
        "seg_patch": 32, "seg_fg_prob": 0.5, "seg_hard_negative_prob": 0.5, "reset_momentum": True,
    }  # fmt: skip


def test_a_run_without_curriculum_is_one_phase() -> None:
    c = ServerConfig.from_dict({"stage": "seg", "rounds": 3, "seg_patch": 16, "lr": 2e-3, "lr_schedule": "cosine"})
    assert len(c.phases) == 1 and c.phases[0].stage == "seg"
    assert [c.round_config(r).seg_patch for r in (1, 2, 3)] == [16, 16, 16]
    assert [c.round_config(r).lr for r in (1, 2, 3)] == pytest.approx([2e-3, 1.1e-3, 2e-4])
    assert not any(c.momentum_reset(r - 1, r) for r in (1, 2, 3))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('dp_sgd = true\n[[curriculum]]\nstage = "text"\nrounds = 1', r"#1: .*'text' has no DP-SGD path"),
        ('rounds = 3\n[[curriculum]]\nstage = "ssl"\nrounds = 2', "rounds = 3 but the curriculum's phases add up to 2"),
        ('stage = "vl"\n[[curriculum]]\nstage = "ssl"\nrounds = 1', "each phase names its own stage"),
        ('[[curriculum]]\nstage = "ssl"\nrounds = 1\nseg_patch = 16', "stage 'ssl': seg_patch = 16 applies"),
        ('[[curriculum]]\nstage = "seg"\nrounds = 1\nseg_patch = 20', "#1: .*'seg_patch' must be 0 or a pos"),
        ('[[curriculum]]\nstage = "sg"\nrounds = 1', "#1: stage must be one of"),
        ('[[curriculum]]\nstage = "seg"\nround = 1', "#1: unknown key 'round'; did you mean 'rounds'"),
        ('[[curriculum]]\nstage = "seg"', "#1: 'rounds' is required"),
        ('[[curriculum]]\nstage = "seg"\nrounds = 0', "#1: stage 'seg': rounds must be >= 1, got 0"),
        ('[[curriculum]]\nstage = "ssl"\nrounds = 1\nlr_schedule = "step"', "lr_schedule must be one of"),
        ('[[curriculum]]\nstage = "ssl"\nrounds = 1\n[[curriculum]]\nstage = "vl"\nrounds = 1\nlr = -1',
         r"#2: .*'lr' must be > 0"),
        ('curriculum = [1]', "must be one or more tables"),
    ],
)  # fmt: skip
def test_bad_curricula_name_the_phase_key_and_value(text: str, match: str) -> None:
    with pytest.raises((KeyError, ValueError), match=match):
        parse(text)


def test_phase_arithmetic() -> None:
    phases = parse(FOUR_STAGES).curriculum
    assert phase_starts(phases) == [1, 3, 4, 7]
    assert [phase_at(phases, r) for r in (1, 2, 3, 4, 6, 7, 8)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (2, 0),
        (2, 2),
        (3, 0),
        (3, 1),
    ]
    with pytest.raises(ValueError, match="round 9 is outside the curriculum's 8 rounds"):
        phase_at(phases, 9)
    p = CurriculumPhase(stage="ssl", rounds=5, local_steps=1, lr=1.0, batch_size=1, lr_schedule="cosine")
    assert [scheduled_lr(p, i) for i in range(5)] == pytest.approx(
        [0.1 + 0.45 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    )


MOMENTUM = """
strategy = "fedavgm"
server_momentum = 0.5
server_lr = 1.0
min_sites = 2
[[curriculum]]
stage = "ssl"
rounds = 2
[[curriculum]]
stage = "seg"
rounds = 2
{extra}
"""
OK = {1: SiteReply(1, arrays=delta(1.0), num_examples=4), 2: SiteReply(2, arrays=delta(1.0), num_examples=4)}
FAIL = {1: SiteReply(1, error="[code 2] boom"), 2: SiteReply(2, error="[code 2] boom")}


def run_rounds(extra: str, rounds: list[dict[int, SiteReply]]) -> list[float]:
    eng = RoundEngine(parse(MOMENTUM.format(extra=extra)), W0, log=lambda _: None)
    seen = []
    for rnd, replies in enumerate(rounds, 1):
        play_round(eng, rnd, replies)
        seen.append(float(eng.weights[0][0, 0]))
    return seen


def test_momentum_starts_from_zero_at_a_stage_boundary() -> None:
    """Hand-computed, Δ̄ = 1 every round, β = 0.5: v = 1, 1.5 | reset | 1, 1.5 → w = 1, 2.5, 3.5, 5."""
    assert run_rounds("", [OK] * 4) == pytest.approx([1.0, 2.5, 3.5, 5.0])
    # without the reset the velocity carries over: v = 1, 1.5, 1.75, 1.875 → w = 1, 2.5, 4.25, 6.125
    assert run_rounds("reset_momentum = false", [OK] * 4) == pytest.approx([1.0, 2.5, 4.25, 6.125])


def test_momentum_reset_survives_a_failed_first_round_of_the_phase() -> None:
    """Round 3 (the seg phase's first) fails: round 4 still starts from zero velocity: w = 1, 2.5, 2.5, 3.5."""
    assert run_rounds("", [OK, OK, FAIL, OK]) == pytest.approx([1.0, 2.5, 2.5, 3.5])


def test_resume_across_the_stage_boundary_continues_with_the_next_phase() -> None:
    """An engine restored from the state after round 2 (the last ssl round) trains seg from zero momentum,
    exactly as the uninterrupted run."""
    config = parse(MOMENTUM.format(extra=""))
    first = RoundEngine(config, W0, log=lambda _: None)
    for rnd in (1, 2):
        play_round(first, rnd, OK)
    state = first.state_dict()
    saved_config = json.loads(json.dumps(state["config"]))  # as the checkpoint stores it
    resumed = RoundEngine(ServerConfig.from_dict(saved_config), W0, log=lambda _: None)
    resumed.load_state_dict(state, first.weights)
    assert resumed.round == 2 and resumed.momentum_round == 2
    assert resumed.round_config(3).stage == "seg"
    for rnd in (3, 4):
        play_round(resumed, rnd, OK)
    np.testing.assert_allclose(resumed.weights[0], 5.0)

"""federation.protocol: the round config is validated once, where it enters, with the key and value named."""

from __future__ import annotations

from typing import Any

import pytest

from federation.protocol import RoundConfig


def test_defaults_and_record_round_trip() -> None:
    rc = RoundConfig(server_round=2, stage="seg", dp_sgd=True, dp_sgd_noise_multiplier=1.2)
    assert RoundConfig.from_record(rc.to_record()) == rc
    assert RoundConfig.from_record({"lr": 1}).lr == 1.0  # ConfigRecord ints are fine for float keys


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"server_round": 0}, "'server_round' must be >= 1"),
        ({"local_steps": 2.5}, "'local_steps' must be an integer"),
        ({"batch_size": True}, "'batch_size' must be an integer"),
        ({"stage": "txt"}, "'stage' must be one of"),
        ({"stage": "text", "dp_sgd": True}, "stage 'text' has no DP-SGD path"),
        ({"seg_patch": 24}, "'seg_patch' must be 0 or a positive multiple of 16, got 24"),
        ({"seg_patch": -16}, "'seg_patch' must be 0 or a positive multiple of 16"),
        ({"seg_fg_prob": 1.5}, "'seg_fg_prob' must be in \\[0, 1\\]"),
        ({"seg_hard_negative_prob": 1.2}, "'seg_hard_negative_prob' must be in \\[0, 1\\], got 1.2"),
        ({"lr": 0.0}, "'lr' must be > 0"),
        ({"lr": float("nan")}, "'lr' must be finite"),
        ({"dp_sgd_max_grad_norm": -1.0}, "'dp_sgd_max_grad_norm' must be > 0"),
        ({"dp_sgd": True, "dp_sgd_noise_multiplier": 0.0}, "needs dp_sgd_noise_multiplier > 0"),
        ({"dp_sgd": 1}, "'dp_sgd' must be true or false"),
        ({"dg_penalty": -0.1}, "'dg_penalty' must be >= 0"),
        ({"dp_sgd": True, "dro_step": 0.1}, "cannot be combined with dp_sgd"),
        ({"seed": -1}, "'seed' must be >= 0"),
    ],
)
def test_invalid_args(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoundConfig(**kwargs)


def test_unknown_record_key_is_named() -> None:
    with pytest.raises(KeyError, match="noise_multiplier"):
        RoundConfig.from_record({"noise_multiplier": 1.0})

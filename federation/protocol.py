"""What crosses the wire between a site client and the consortium server: record names and the round config.

A round's *train* message from the server carries the global model arrays and a config record
(:class:`RoundConfig`); the reply carries the update Δ = w_site − w_global as arrays (float32), the
number of examples and whitelisted scalar metrics only. The arrays travel packed
(:mod:`federation.arrays`, :mod:`federation.records`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

#: Message record names.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
#: Metric key every train reply carries.
NUM_EXAMPLES = "num_examples"
#: Config record key of a ``query`` message (what the server asks a site).
QUERY_KEY = "query"
#: The site-name query, and the key of the site's name in the reply's config record.
SITE_NAME_KEY = "site_name"
#: Keys of a packed array record: the concatenated float32 values and the int64 shape table.
PACKED_VALUES = "values"
PACKED_SHAPES = "shapes"


#: Stages a site trains in a federated round, in curriculum order: ``text`` (report warm-up of the
#: decoder on the site's reports, no image), ``ssl`` (masked-volume pretraining), ``seg`` (nodule
#: segmentation, on whole volumes or foreground-biased patches) and ``vl`` (end to end).
TRAIN_STAGES: Final = ("text", "ssl", "seg", "vl")
#: Stages with a DP-SGD path at the sites (the report warm-up has none: it trains the decoder alone on
#: text, outside the per-study-separable model forward that Opacus clips).
DP_SGD_STAGES: Final = ("ssl", "seg", "vl")


def _number(name: str, value: Any, *, integer: bool = False) -> float:
    """``value`` as a finite number (an int where ``integer``), or ValueError naming the round config key."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"round config {name!r} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"round config {name!r} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RoundConfig:
    """The per-round config record the server sends with a train or evaluate message.

    This is where a round's training settings are validated, once: a site gets them from the wire
    (:meth:`from_record`) and the server's :class:`~server.config.ServerConfig` builds one to check its
    own ``[training]``/``[dp]`` values, so the two sides apply the same rules.

    Attributes:
        server_round: the round number (1-based).
        stage: training stage at the sites (:data:`TRAIN_STAGES`).
        local_steps: optimisation steps per site (>= 1).
        lr: local learning rate (> 0).
        batch_size: local batch size (>= 1; under DP-SGD the expected number of patients per step).
        seed: seed of the round's data order at the sites (sites mix in their own name). It never
            seeds DP noise or DP sampling, which come from OS entropy on both sides.
        dp_sgd: sites run Opacus DP-SGD (patient-level DP).
        dp_sgd_noise_multiplier: DP-SGD noise multiplier σ at the sites (> 0 with ``dp_sgd``).
        dp_sgd_max_grad_norm: DP-SGD per-study clip (> 0).
        dg_penalty: domain-generalisation weight ``λ`` of the variance of the subgroup risks inside
            each local step (slice-thickness groups of the batch; 0 = off; not with DP-SGD). See
            :mod:`lungvl_model.losses.group_penalty`.
        dro_step: group-DRO step size ``η`` of the subgroup weights (0 = example-weighted mean; not
            with DP-SGD).
        seg_patch: edge in voxels of the cubic foreground-biased patches the ``seg`` stage trains on
            (a multiple of 16; 0 = whole volumes), as central training's ``seg_crop``
            (:class:`~lungvl_model.data.crops.ForegroundCrops`).
        seg_fg_prob: probability that a ``seg`` patch is centred on a nodule voxel.
        seg_hard_negative_prob: probability that a ``seg`` patch not centred on a nodule is centred on
            a hard-negative point (heart border, hilar vessels, chest wall...: where real false
            positives come from, when the site knows them); the remaining patches lie anywhere.
    """

    server_round: int = 1
    stage: str = "vl"
    local_steps: int = 5
    lr: float = 3e-4
    batch_size: int = 2
    seed: int = 0
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 1.0
    dp_sgd_max_grad_norm: float = 1.0
    dg_penalty: float = 0.0
    dro_step: float = 0.0
    seg_patch: int = 0
    seg_fg_prob: float = 0.67
    seg_hard_negative_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("server_round", "local_steps", "batch_size"):
            if _number(name, getattr(self, name), integer=True) < 1:
                raise ValueError(f"round config {name!r} must be >= 1, got {getattr(self, name)!r}")
        if _number("seed", self.seed, integer=True) < 0:
            raise ValueError(f"round config 'seed' must be >= 0, got {self.seed!r}")
        if self.stage not in TRAIN_STAGES:
            raise ValueError(f"round config 'stage' must be one of {TRAIN_STAGES}, got {self.stage!r}")
        if not isinstance(self.dp_sgd, bool):
            raise ValueError(f"round config 'dp_sgd' must be true or false, got {self.dp_sgd!r}")
        for name in ("lr", "dp_sgd_max_grad_norm"):
            if _number(name, getattr(self, name)) <= 0:
                raise ValueError(f"round config {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("dp_sgd_noise_multiplier", "dg_penalty", "dro_step"):
            if _number(name, getattr(self, name)) < 0:
                raise ValueError(f"round config {name!r} must be >= 0, got {getattr(self, name)!r}")
        if _number("seg_patch", self.seg_patch, integer=True) < 0 or self.seg_patch % 16:
            raise ValueError(f"round config 'seg_patch' must be 0 or a positive multiple of 16, got {self.seg_patch!r}")
        if not 0 <= _number("seg_fg_prob", self.seg_fg_prob) <= 1:
            raise ValueError(f"round config 'seg_fg_prob' must be in [0, 1], got {self.seg_fg_prob!r}")
        if not 0 <= _number("seg_hard_negative_prob", self.seg_hard_negative_prob) <= 1:
            raise ValueError(
                f"round config 'seg_hard_negative_prob' must be in [0, 1], got {self.seg_hard_negative_prob!r}"
            )
        if self.dp_sgd and self.stage not in DP_SGD_STAGES:
            raise ValueError(
                f"round config stage {self.stage!r} has no DP-SGD path (the report warm-up trains the decoder alone "
                f"on text); DP-SGD stages are {DP_SGD_STAGES}: leave the stage out or set dp_sgd = false"
            )
        if self.dp_sgd and self.dp_sgd_noise_multiplier == 0:
            raise ValueError("round config 'dp_sgd' needs dp_sgd_noise_multiplier > 0, got 0")
        if self.dp_sgd and (self.dg_penalty > 0 or self.dro_step > 0):
            raise ValueError(
                f"round config dg_penalty={self.dg_penalty} / dro_step={self.dro_step} cannot be combined with "
                "dp_sgd (the subgroup penalty couples the studies of a batch, so per-study clipping would not "
                "bound a study's influence)"
            )

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Flat dict of scalars (what Flower's ConfigRecord holds)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        """Parse a config record.

        Raises:
            KeyError: unknown keys (named).
            ValueError: a value of the wrong type or out of range (named with the value).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise KeyError(f"unknown round config key(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        defaults = cls()
        for k, v in record.items():
            default = getattr(defaults, k)
            # Flower's ConfigRecord keeps ints as ints; a float field may arrive as an int.
            kw[k] = float(v) if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool) else v
        return cls(**kw)

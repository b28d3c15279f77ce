"""What crosses the wire between a site client and the consortium server (both import this module).

A round's *train* message from the server carries the global model arrays and a config record
(:class:`RoundConfig`); the reply carries the update Δ = w_site − w_global as arrays (float32), the
number of examples and whitelisted scalar metrics only. Arrays are the model's ``state_dict``
floating-point tensors in :func:`array_keys` order, so both ends agree without sending names.

On the wire the arrays travel packed (:func:`flatten_arrays`): one float32 vector under
:data:`PACKED_VALUES` and a shape table under :data:`PACKED_SHAPES`. Flower 1.42 moves every array of
a record as its own object, one HTTPS request each (two at a time), so the ~180 tensors of the tiny
model cost ~360 requests per message and 5–20 s per transfer on loopback; packed, a message is a
handful of objects (the vector is chunked at Flower's 5 MB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

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


def flatten_arrays(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack arrays into one float32 vector and a shape table.

    Args:
        arrays: any shapes (0-d included); cast to float32.

    Returns:
        ``(values, shapes)``: ``values`` of shape ``(Σ sizes,)`` float32; ``shapes`` int64
        ``[ndim_0, *shape_0, ndim_1, *shape_1, ...]``.
    """
    table: list[int] = []
    for a in arrays:
        table += [a.ndim, *a.shape]
    parts = [np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]
    values = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return values, np.asarray(table, dtype=np.int64)


def unflatten_arrays(values: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`flatten_arrays` (the arrays are views of ``values``, no copy).

    Raises:
        ValueError: a table that is not 1-D int, runs past its end, has negative sizes, or does not
            account for exactly ``values.size`` numbers (names what is wrong).
    """
    if values.ndim != 1 or shapes.ndim != 1 or not np.issubdtype(shapes.dtype, np.integer):
        raise ValueError(f"packed arrays: values must be 1-D and shapes 1-D int, got {values.shape}, {shapes.dtype}")
    table: list[int] = shapes.tolist()
    out: list[np.ndarray] = []
    pos = i = 0
    while i < len(table):
        ndim = table[i]
        dims = table[i + 1 : i + 1 + ndim]
        if ndim < 0 or len(dims) != ndim or any(d < 0 for d in dims):
            raise ValueError(f"packed arrays: bad shape entry at {i}: ndim {ndim}, dims {dims}")
        size = math.prod(dims)
        if pos + size > values.size:
            raise ValueError(f"packed arrays: array {len(out)} {tuple(dims)} runs past {values.size} values")
        out.append(values[pos : pos + size].reshape(dims))
        pos, i = pos + size, i + 1 + ndim
    if pos != values.size:
        raise ValueError(f"packed arrays: the shapes account for {pos} of {values.size} values")
    return out


@dataclass(frozen=True)
class RoundConfig:
    """The per-round config record the server sends with a train message.

    Attributes:
        server_round: the round number (1-based).
        stage: training stage at the sites (``ssl``/``seg``/``vl``).
        local_steps: optimisation steps per site.
        lr: local learning rate.
        batch_size: local batch size.
        seed: seed of the round (sites mix in their own name).
        dp_sgd: sites run Opacus DP-SGD (sample-level DP).
        noise_multiplier: DP-SGD noise multiplier σ at the sites.
        max_grad_norm: DP-SGD per-sample clip.
        dg_penalty: domain-generalisation weight ``λ`` of the variance of the subgroup risks inside
            each local step (slice-thickness groups of the batch; 0 = off). See
            :mod:`lungvl_model.losses.group_penalty`.
        dro_step: group-DRO step size ``η`` of the subgroup weights (0 = example-weighted mean).
    """

    server_round: int = 1
    stage: str = "vl"
    local_steps: int = 5
    lr: float = 3e-4
    batch_size: int = 2
    seed: int = 0
    dp_sgd: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    dg_penalty: float = 0.0
    dro_step: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dg_penalty", "dro_step"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"round config {name!r} must be a finite number >= 0, got {value!r}")

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Flat dict of scalars (what Flower's ConfigRecord holds)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        """Parse a config record; unknown keys raise ``KeyError`` naming them, values are type-checked."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(record) - set(known))
        if unknown:
            raise KeyError(f"unknown round config key(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for k, v in record.items():
            default = getattr(cls(), k)
            try:
                kw[k] = type(default)(v) if not isinstance(default, bool) else bool(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"round config {k!r}: expected {type(default).__name__}, got {v!r}") from e
        return cls(**kw)


def array_keys(model: nn.Module) -> list[str]:
    """Names of the floating-point ``state_dict`` entries, in the order arrays are exchanged."""
    return [k for k, v in model.state_dict().items() if torch.is_floating_point(v)]


def model_to_arrays(model: nn.Module) -> list[np.ndarray]:
    """The model's exchanged tensors as float32 numpy arrays (bf16 is upcast first)."""
    state = model.state_dict()
    return [state[k].detach().to(torch.float32).cpu().numpy().copy() for k in array_keys(model)]


def arrays_to_model(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load exchanged arrays into ``model`` in place.

    Raises:
        ValueError: wrong number of arrays, or an array whose shape differs (names the key and shapes).
    """
    keys = array_keys(model)
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays for the model, got {len(arrays)}")
    state = model.state_dict()
    new = {}
    for k, a in zip(keys, arrays, strict=True):
        if tuple(a.shape) != tuple(state[k].shape):
            raise ValueError(f"array for {k!r} has shape {tuple(a.shape)}, model expects {tuple(state[k].shape)}")
        new[k] = torch.as_tensor(np.asarray(a), dtype=state[k].dtype)
    model.load_state_dict(new, strict=False)

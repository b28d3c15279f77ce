"""Model tensors as exchanged arrays, and the packing of those arrays for the wire (both sides use this).

Arrays are the model's ``state_dict`` floating-point tensors in :func:`array_keys` order, so both ends
agree without sending names. On the wire they travel packed (:func:`flatten_arrays`): one float32
vector and a shape table (see :mod:`federation.records`). Flower 1.42 moves every array of a record as
its own object, one HTTPS request each (two at a time), so the ~180 tensors of the tiny model cost
~360 requests per message and 5–20 s per transfer on loopback; packed, a message is a handful of
objects (the vector is chunked at Flower's 5 MB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["array_keys", "arrays_to_model", "flatten_arrays", "model_to_arrays", "unflatten_arrays"]


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

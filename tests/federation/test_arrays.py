"""federation.arrays: the packed wire format of model arrays (round trip for any shapes, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest

from federation.arrays import flatten_arrays, unflatten_arrays


@pytest.mark.parametrize(
    "shapes", [[(3, 4), (5,), (), (2, 1, 3)], [(0,), (2, 0)], [], [(7,)]], ids=["mixed", "empty-dims", "none", "one"]
)
def test_flatten_round_trips_every_shape(shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float64) for s in shapes]
    values, table = flatten_arrays(arrays)
    assert values.dtype == np.float32 and values.ndim == 1 and table.dtype == np.int64
    back = unflatten_arrays(values, table)
    assert [b.shape for b in back] == [tuple(s) for s in shapes]
    for a, b in zip(arrays, back, strict=True):
        np.testing.assert_allclose(b, a.astype(np.float32))


@pytest.mark.parametrize(
    ("values", "table", "match"),
    [
        (np.zeros(6, np.float32), np.array([2, 2, 2], np.int64), "shapes account for 4 of 6"),
        (np.zeros(3, np.float32), np.array([1, 4], np.int64), r"array 0 \(4,\) runs past 3 values"),
        (np.zeros(3, np.float32), np.array([2, 3], np.int64), "bad shape entry at 0"),
        (np.zeros(3, np.float32), np.array([1, -3], np.int64), "bad shape entry at 0"),
        (np.zeros((3, 1), np.float32), np.array([1, 3], np.int64), "values must be 1-D"),
        (np.zeros(3, np.float32), np.array([1.0, 3.0]), "shapes 1-D int"),
    ],
)
def test_unflatten_names_what_is_wrong(values: np.ndarray, table: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unflatten_arrays(values, table)

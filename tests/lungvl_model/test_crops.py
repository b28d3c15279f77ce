from __future__ import annotations

import numpy as np
import pytest
import torch

from lungvl_model.data.crops import ForegroundCrops, crop_window


def _item(shape=(16, 32, 32), fg=(3, 20, 5)) -> dict:
    seg = torch.zeros(1, *shape)
    seg[(0, *fg)] = 1
    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)
    return {"image": image, "seg": seg, "nodules": seg.long(), "lobes": seg.long() * 2, "has_mask": True, "t": "x"}


def test_window_contains_the_centre_and_fits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        centre = [int(rng.integers(0, n)) for n in (16, 32, 32)]
        w = crop_window((16, 32, 32), (8, 16, 16), centre, rng)
        for sl, c, n, s in zip(w, centre, (16, 32, 32), (8, 16, 16), strict=True):
            assert 0 <= sl.start and sl.stop <= n and sl.stop - sl.start == s and sl.start <= c < sl.stop
    with pytest.raises(ValueError, match=r"\(32, 16, 16\)"):
        crop_window((16, 32, 32), (32, 16, 16), None, rng)


def test_foreground_crops_hit_the_nodule_and_stay_aligned() -> None:
    item = _item()
    ds = ForegroundCrops([item] * 200, (8, 16, 16), fg_prob=1.0, seed=1)
    for k in range(200):
        out = ds[k]
        assert out["image"].shape == (1, 8, 16, 16) and out["seg"].sum() == 1 and out["t"] == "x"
        z, y, x = torch.nonzero(out["seg"][0])[0].tolist()
        v = int(out["image"][0, z, y, x])
        assert np.unravel_index(v, (16, 32, 32)) == (3, 20, 5)  # image and mask cropped by the same window
        assert torch.equal(out["lobes"], out["nodules"] * 2)
    never = ForegroundCrops([item] * 300, (8, 16, 16), fg_prob=0.0, seed=1)
    hits = sum(int(never[k]["seg"].sum()) for k in range(300))
    assert hits < 300 * 0.5  # uniform windows contain the voxel only sometimes (~27 % here)


@pytest.mark.parametrize(("kwargs", "match"), [({"fg_prob": 1.5}, "1.5"), ({"size": (8, 0, 8)}, "positive")])
def test_invalid_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ForegroundCrops([], **{"size": (8, 8, 8), **kwargs})

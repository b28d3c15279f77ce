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


def test_hard_negative_crops_centre_on_the_tempting_anatomy() -> None:
    """fg_prob 0.5, hard_negative_prob 1: every crop holds the nodule or the hard-negative point (they are
    too far apart to share a window), about half each; without a hard-negative map those draws are random."""
    item = _item()
    hard = torch.zeros(1, 16, 32, 32, dtype=torch.uint8)
    hard[0, 12, 4, 28] = 1  # e.g. a hilar vessel point, far from the nodule at (3, 20, 5)
    item["hard_negatives"] = hard
    ds = ForegroundCrops([item] * 400, (8, 16, 16), fg_prob=0.5, seed=3, hard_negative_prob=1.0)
    nodule = hard_neg = 0
    for k in range(400):
        out = ds[k]
        has_n, has_h = int(out["seg"].sum()), int(out["hard_negatives"].sum())
        assert has_n + has_h == 1, k
        nodule, hard_neg = nodule + has_n, hard_neg + has_h
        if has_h:  # the map is cropped with the image
            z, y, x = torch.nonzero(out["hard_negatives"][0])[0].tolist()
            assert np.unravel_index(int(out["image"][0, z, y, x]), (16, 32, 32)) == (12, 4, 28)
    assert 150 < hard_neg < 250 and nodule + hard_neg == 400
    plain = {k: v for k, v in item.items() if k != "hard_negatives"}
    ds = ForegroundCrops([plain] * 300, (8, 16, 16), fg_prob=0.0, seed=3, hard_negative_prob=1.0)
    assert sum(int(ds[k]["seg"].sum()) for k in range(300)) < 150  # random windows, as with fg_prob 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fg_prob": 1.5}, "1.5"),
        ({"size": (8, 0, 8)}, "positive"),
        ({"hard_negative_prob": 1.5}, r"hard_negative_prob must be in \[0, 1\], got 1.5"),
        ({"hard_negative_prob": -0.1}, "got -0.1"),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ForegroundCrops([], **{"size": (8, 8, 8), **kwargs})

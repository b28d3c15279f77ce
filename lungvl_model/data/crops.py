"""Foreground-biased random crops for segmentation training (nnU-Net's foreground oversampling).

A nodule covers ~1e-4 of a whole chest volume at the tiny preset's 5 mm grid (a median of 12 of
196,608 voxels in the synthetic training cohorts), so a whole-volume Dice + cross-entropy step carries
almost no signal about nodules. :class:`ForegroundCrops` wraps a dataset of whole studies and returns
a sub-volume per item: with probability ``fg_prob`` (and a non-empty mask) centred on a random
foreground voxel with a random offset; otherwise, with probability ``hard_negative_prob`` (and known
hard negatives), centred on a hard-negative point (heart border, hilar and intrapulmonary vessels, aorta,
sternum, chest wall, diaphragm: the anatomy real false positives come from, the item's
``"hard_negatives"`` map); otherwise anywhere. The encoder is fully convolutional, so the seg stage
trains on crops and every other stage, and inference, use whole volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ForegroundCrops", "crop_window"]

#: Item keys holding ``(1, D, H, W)`` voxel grids that are cropped together.
GRID_KEYS = ("image", "seg", "nodules", "lobes", "hard_negatives")


def crop_window(
    shape: Sequence[int], size: Sequence[int], centre: Sequence[int] | None, rng: np.random.Generator
) -> tuple[slice, ...]:
    """A window of ``size`` inside ``shape``, around ``centre`` (jittered by up to a quarter size) or random.

    Args:
        shape: ``(D, H, W)`` of the volume.
        size: ``(d, h, w)`` of the crop; each <= the matching ``shape`` entry.
        centre: a voxel the window must contain, or None for a uniformly random window.
        rng: random source.

    Returns:
        Three slices.

    Raises:
        ValueError: a crop larger than the volume.
    """
    if len(shape) != 3 or len(size) != 3 or any(s > n for s, n in zip(size, shape, strict=True)):
        raise ValueError(f"crop size {tuple(size)} must fit the volume {tuple(shape)}")
    out = []
    for axis, (n, s) in enumerate(zip(shape, size, strict=True)):
        if centre is None:
            lo = int(rng.integers(0, n - s + 1))
        else:
            jitter = int(rng.integers(-(s // 4), s // 4 + 1))
            lo = int(centre[axis]) - s // 2 + jitter
            lo = min(max(lo, int(centre[axis]) - s + 1, 0), int(centre[axis]), n - s)
        out.append(slice(lo, lo + s))
    return tuple(out)


class ForegroundCrops(Dataset[dict[str, Any]]):
    """Random sub-volumes of another dataset's items, biased towards the nodule mask.

    Args:
        base: a dataset of :class:`~lungvl_model.data.dataset.SiteDataset` items.
        size: ``(d, h, w)`` crop size (each divisible by 16 for the five-scale encoder).
        fg_prob: probability of centring a crop on a foreground voxel when the item has one.
        seed: seed of the crop positions.
        hard_negative_prob: probability that a crop not centred on the foreground is centred on a
            hard-negative point (the item's ``"hard_negatives"`` map); the rest are uniform. An item
            without the points drawn gets a uniform crop.

    Raises:
        ValueError: a probability outside [0, 1] or a non-positive size.
    """

    def __init__(
        self,
        base: Dataset[dict[str, Any]],
        size: Sequence[int],
        fg_prob: float = 0.67,
        seed: int = 0,
        hard_negative_prob: float = 0.0,
    ):
        if not 0.0 <= fg_prob <= 1.0:
            raise ValueError(f"ForegroundCrops fg_prob must be in [0, 1], got {fg_prob}")
        if not 0.0 <= hard_negative_prob <= 1.0:
            raise ValueError(f"ForegroundCrops hard_negative_prob must be in [0, 1], got {hard_negative_prob}")
        if len(size) != 3 or any(int(s) < 1 for s in size):
            raise ValueError(f"ForegroundCrops size must be three positive integers, got {tuple(size)}")
        self.base = base
        self.size = tuple(int(s) for s in size)
        self.fg_prob = float(fg_prob)
        self.hard_negative_prob = float(hard_negative_prob)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        seg = item["seg"][0]
        centre = None
        points = seg.new_zeros((0, 3))
        if self.rng.random() < self.fg_prob:
            if bool(item.get("has_mask", True)):
                points = torch.nonzero(seg > 0.5)
        elif self.rng.random() < self.hard_negative_prob and "hard_negatives" in item:
            points = torch.nonzero(item["hard_negatives"][0] > 0)
        if len(points):
            centre = points[int(self.rng.integers(len(points)))].tolist()
        window = crop_window(tuple(seg.shape), self.size, centre, self.rng)
        for key in GRID_KEYS:
            if key in item:
                item[key] = item[key][(slice(None), *window)].contiguous()
        return item

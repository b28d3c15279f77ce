"""Resample a CT volume (and its label maps) to the model's grid, with an on-disk cache.

Steps: anti-alias (Gaussian, only along axes that are downsampled) → MONAI ``Spacing`` to the target
voxel size → crop/pad to the target shape around the body centre (or a given point) → clip HU to
a window and scale to [0, 1]. Label maps use nearest-neighbour resampling.

Cached arrays live under ``<site_dir>/.cache/<key>.npz`` where the key hashes the series UID, the
preprocessing config and :data:`CACHE_VERSION` (DESIGN.md section 2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing
from scipy import ndimage

from lungvl_model.data.volume import CTVolume

CACHE_VERSION = 2
#: Label maps whose small objects must survive downsampling (a 6 mm nodule on a 5 mm grid).
KEEP_SMALL_LABELS = frozenset({"nodules", "hard_negatives"})


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT series becomes a model input.

    Attributes:
        spacing_mm: target voxel size ``(sz, sy, sx)`` in mm.
        size: target array shape ``(D, H, W)``; None keeps the resampled shape.
        hu_window: HU range clipped and scaled to [0, 1].
        antialias: Gaussian pre-filter when downsampling.
    """

    spacing_mm: tuple[float, float, float] = (5.0, 5.0, 5.0)
    size: tuple[int, int, int] | None = (48, 64, 64)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    antialias: bool = True

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"PreprocessConfig.spacing_mm must be 3 positive values, got {self.spacing_mm}")
        if self.size is not None and (len(self.size) != 3 or min(self.size) < 1):
            raise ValueError(f"PreprocessConfig.size must be 3 positive ints or None, got {self.size}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"PreprocessConfig.hu_window must be (low, high) with low < high, got {self.hu_window}")
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(s) for s in self.size))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        d["spacing_mm"] = list(self.spacing_mm)
        d["size"] = list(self.size) if self.size is not None else None
        d["hu_window"] = list(self.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``KeyError`` naming them."""
        unknown = set(d) - {"spacing_mm", "size", "hu_window", "antialias"}
        if unknown:
            raise KeyError(f"unknown PreprocessConfig key(s) {sorted(unknown)}")
        kw = dict(d)
        for k in ("spacing_mm", "size", "hu_window"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass
class Preprocessed:
    """A resampled study.

    Attributes:
        image: ``(D, H, W)`` float32 in [0, 1].
        labels: name → ``(D, H, W)`` uint8 label map on the same grid (e.g. ``"nodules"``, ``"lobes"``).
        spacing_mm: voxel size of the grid.
        origin_zyx_mm: position of voxel (0, 0, 0) in the source array's scaled frame, i.e.
            ``source_index * source_spacing`` (lets callers map points between the two grids).
    """

    image: np.ndarray
    labels: dict[str, np.ndarray]
    spacing_mm: tuple[float, float, float]
    origin_zyx_mm: tuple[float, float, float]


def _resample(arr: np.ndarray, src: tuple[float, ...], dst: tuple[float, ...], mode: str) -> np.ndarray:
    aff = torch.diag(torch.tensor([*src, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None], affine=aff)
    out = Spacing(pixdim=dst, mode=mode, padding_mode="border")(img)
    return np.asarray(out[0].detach().cpu().numpy())


def resample_labels(
    labels: np.ndarray, src: tuple[float, ...], dst: tuple[float, ...], keep_small: bool = False
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map, optionally keeping objects smaller than a target voxel.

    With ``keep_small`` a maximum filter over each target voxel's footprint comes first, so an object
    smaller than a target voxel still marks that voxel.

    Args:
        labels: ``(Z, Y, X)`` integer labels.
        src: source spacing.
        dst: target spacing.
        keep_small: dilate by the downsampling footprint before sampling (nodule masks).

    Returns:
        ``(D', H', W')`` uint8 labels on the target grid.
    """
    lab = labels
    if keep_small:
        size = [max(1, int(np.ceil(d / s))) for s, d in zip(src, dst, strict=True)]
        if max(size) > 1:
            lab = ndimage.maximum_filter(labels, size=size, mode="constant", cval=0)
    return np.rint(_resample(lab.astype(np.float32), src, dst, "nearest")).astype(np.uint8)


def _crop_pad(arr: np.ndarray, size: tuple[int, int, int], start: np.ndarray, fill: float) -> np.ndarray:
    out = np.full(size, fill, dtype=arr.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(size), arr.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    if np.all(src_hi > src_lo):
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))] = arr[
            tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
        ]
    return out


def body_center(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Centre ``(z, y, x)`` of the bounding box of voxels above ``threshold`` HU (the body)."""
    idx = np.nonzero(hu > threshold)
    if len(idx[0]) == 0:
        return (np.asarray(hu.shape) - 1) / 2.0
    return np.array([(i.min() + i.max()) / 2.0 for i in idx])


def preprocess(
    volume: CTVolume,
    config: PreprocessConfig,
    labels: dict[str, np.ndarray] | None = None,
    center_zyx: np.ndarray | None = None,
) -> Preprocessed:
    """Resample ``volume`` (and label maps on its grid) to ``config``.

    Args:
        volume: source CT.
        config: target grid and intensity window.
        labels: name → ``(Z, Y, X)`` integer map aligned with ``volume``.
        center_zyx: crop centre in source voxel indices; default the body's bounding-box centre.

    Returns:
        The resampled image and label maps.

    Raises:
        ValueError: a label map's shape differs from the volume's.
    """
    labels = labels or {}
    for name, lab in labels.items():
        if lab.shape != volume.shape:
            raise ValueError(f"label map {name!r} has shape {lab.shape}, volume has {volume.shape}")
    src, dst = volume.spacing, config.spacing_mm
    hu = volume.hu.astype(np.float32, copy=False)
    if config.antialias:
        sigma = [max(0.0, (d / s - 1.0) / 2.0) for s, d in zip(src, dst, strict=True)]
        if max(sigma) > 0:
            hu = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    img = _resample(hu, src, dst, "bilinear")
    labs = {k: resample_labels(v, src, dst, keep_small=k in KEEP_SMALL_LABELS) for k, v in labels.items()}
    center = body_center(volume.hu) if center_zyx is None else np.asarray(center_zyx, dtype=float)
    center_dst = center * np.asarray(src) / np.asarray(dst)
    start = np.zeros(3, dtype=int)
    if config.size is not None:
        size = config.size
        start = np.rint(center_dst - (np.asarray(size) - 1) / 2.0).astype(int)
        img = _crop_pad(img, size, start, fill=config.hu_window[0])
        labs = {k: _crop_pad(v, size, start, fill=0) for k, v in labs.items()}
    lo, hi = config.hu_window
    img = ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    origin = tuple(float(s * d) for s, d in zip(start, dst, strict=True))
    return Preprocessed(img, labs, dst, origin)  # type: ignore[arg-type]


def cache_key(series_uid: str, config: PreprocessConfig, extra: str = "") -> str:
    """Stable cache key of a series under a preprocessing config."""
    blob = json.dumps({"uid": series_uid, "cfg": config.to_dict(), "v": CACHE_VERSION, "x": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_cached(path: Path, item: Preprocessed) -> None:
    """Write a preprocessed study atomically (``.npz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        image=item.image,
        spacing=np.asarray(item.spacing_mm),
        origin=np.asarray(item.origin_zyx_mm),
        **{f"label_{k}": v for k, v in item.labels.items()},
    )
    tmp.replace(path)


def load_cached(path: Path) -> Preprocessed | None:
    """Read a cached study, None when absent or unreadable (then it is recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            labels = {k[len("label_") :]: z[k] for k in z.files if k.startswith("label_")}
            return Preprocessed(
                z["image"],
                labels,
                tuple(z["spacing"].tolist()),
                tuple(z["origin"].tolist()),  # type: ignore[arg-type]
            )
    except (OSError, ValueError, KeyError):
        return None

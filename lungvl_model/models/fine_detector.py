"""Native-resolution nodule detector: the cascade's fine stage, and its storage beside a checkpoint.

The coarse pass of :class:`~lungvl_model.models.lungvl.LungVLModel` sees the chest on 5 mm voxels, where a
4 mm nodule is a fraction of one voxel: on 28 held-out synthetic studies its candidates held 11 of 38
nodules, and lowering its threshold from 0.5 to 0.05 added none. :class:`FineDetector` is the same
encoder architecture (five scales, path aggregation, dual attention; :class:`~.vision.VisionEncoder`) with
its own, narrower weights and a segmentation head, trained on foreground-biased patches with hard
negatives at ``spacing_mm`` isotropic voxels (:mod:`lungvl_model.training.fine_detector`) and run by
sliding window over the lungs (:mod:`lungvl_model.inference.fine_detection`). Its components seed the
same native-resolution refinement, measurement and candidate filter as the coarse pass.

Why 2 mm and not 1 mm: the synthetic cohorts are 2 mm in-plane (matrix 160), so 1 mm would interpolate
without adding detail there, and costs 8x the voxels on CPU (the 2 cores this project runs its CI on).
Every nodule the cascade must find is >= 3 mm (LUNA16 ignores smaller ones); with a candidate mask
from the reference nodule on the 2 mm grid, the refinement and the shipped candidate filter kept 36 of
the 38 held-out nodules (median Dice of the refined mask 0.90). ``spacing_mm`` is a config value
(``lungvl train --stage detector --detector-spacing``): a GPU site can train 1 mm with a larger ``patch``.
Measured on 2026-12-08 (2 CPU threads, shared): 1.5 mm with the same 48-voxel patch (72 mm of context
instead of 96), 2,500 steps from scratch on the training + 30 more synthetic studies, small nodules drawn
2x as often, found 10 of 19 validation nodules against 16 for the shipped 2 mm detector (under 7.5 mm:
6 of 10 against 7; larger: 4 of 9 against 9 of 9, the 15-23 mm solid ones scored ~0): a finer grid
alone does not recover the small misses, and a smaller field of view loses the large nodules.

Stored beside a checkpoint as ``fine_detector.pt`` (float16 weights: the shipped model must stay under
5 MiB) + ``fine_detector.json`` (config, training facts, sha256 of the weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungvl_model.errors import CorruptStateError
from lungvl_model.models.config import VisionConfig
from lungvl_model.models.stored_pair import load_weights, read_pair, write_pair
from lungvl_model.models.vision import SIZE_DIVISOR, SegmentationHead, VisionEncoder

#: The two files of a stored detector, weights first.
DETECTOR_FILES: tuple[str, str] = ("fine_detector.pt", "fine_detector.json")
#: Version of ``fine_detector.json``.
FORMAT_VERSION = 1


def _default_vision() -> VisionConfig:
    # 124k parameters: 248 KB in float16 next to the 4.7 MiB LungVL checkpoint (limit 5 MiB). Measured,
    # 4 x 48^3 patches, 2 CPU threads: 0.77 s per training step; (8, 16, 32, 48, 64) was 0.78 s at 3.7x
    # the parameters, (16, 24, 32, 48, 64) 1.35 s.
    return VisionConfig(channels=(8, 12, 16, 20, 24), aggregation_channels=12, attention_scales=(3, 4))


@dataclass(frozen=True)
class FineDetectorConfig:
    """The fine detector's grid, intensity window and network.

    Attributes:
        spacing_mm: isotropic voxel size (mm) of the detector's grid.
        patch: training and sliding-window patch edge (voxels, a multiple of 16).
        hu_window: HU range clipped and scaled to ``[0, 1]``.
        vision: the encoder (same architecture as the coarse model's, own weights).
        head_hidden: width of the segmentation head's hidden layer.
        prior: initial foreground probability of the head (nodule voxels are ~1e-4 of the lungs).
    """

    spacing_mm: float = 2.0
    patch: int = 48
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    vision: VisionConfig = field(default_factory=_default_vision)
    head_hidden: int = 16
    prior: float = 0.01

    def __post_init__(self) -> None:
        s = self.spacing_mm
        if not (isinstance(s, (int, float)) and 0.25 <= float(s) <= 5.0):
            raise ValueError(f"FineDetectorConfig.spacing_mm must be in [0.25, 5] mm, got {s!r}")
        if not (isinstance(self.patch, int) and self.patch >= SIZE_DIVISOR and self.patch % SIZE_DIVISOR == 0):
            raise ValueError(f"FineDetectorConfig.patch must be a multiple of {SIZE_DIVISOR}, got {self.patch!r}")
        lo, hi = (float(v) for v in self.hu_window)
        if not lo < hi:
            raise ValueError(f"FineDetectorConfig.hu_window must be (low, high) with low < high, got {self.hu_window}")
        object.__setattr__(self, "hu_window", (lo, hi))
        if not (isinstance(self.head_hidden, int) and self.head_hidden > 0 and self.head_hidden % 4 == 0):
            raise ValueError(
                f"FineDetectorConfig.head_hidden must be a positive multiple of 4, got {self.head_hidden!r}"
            )
        if not 0.0 < self.prior < 1.0:
            raise ValueError(f"FineDetectorConfig.prior must be in (0, 1), got {self.prior!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        d["vision"] = self.vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FineDetectorConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: naming an unknown key or a bad value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FineDetectorConfig: unknown keys {unknown} (known: {sorted(known)})")
        kw = dict(d)
        if "vision" in kw:
            kw["vision"] = VisionConfig.from_dict(dict(kw["vision"]))
        if "hu_window" in kw:
            kw["hu_window"] = tuple(kw["hu_window"])
        return cls(**kw)


class FineDetector(nn.Module):
    """Nodule logits per voxel of a CT patch on the detector's grid.

    Args:
        config: the detector config.

    Shape:
        ``(B, 1, D, H, W)`` intensities in ``[0, 1]`` (:meth:`normalise`), D, H, W divisible by 16 →
        ``(B, 1, D, H, W)`` logits.
    """

    def __init__(self, config: FineDetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or FineDetectorConfig()
        v = self.config.vision
        self.encoder = VisionEncoder(v)
        self.head = SegmentationHead(
            v.aggregation_channels,
            hidden=self.config.head_hidden,
            norm_groups=v.norm_groups,
            prior=self.config.prior,
            bottleneck=v.bottleneck_full_resolution,
        )

    def normalise(self, hu: torch.Tensor) -> torch.Tensor:
        """HU → ``[0, 1]`` with the config's window (any shape)."""
        lo, hi = self.config.hu_window
        return ((hu - lo) / (hi - lo)).clamp(0.0, 1.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            image: ``(B, 1, D, H, W)`` normalised intensities.

        Returns:
            ``(B, 1, D, H, W)`` nodule logits.
        """
        return self.head(self.encoder(image).scales[0])


# --------------------------------------------------------------------------- storage


def save_fine_detector(directory: str | Path, detector: FineDetector, meta: dict[str, Any] | None = None) -> Path:
    """Write ``fine_detector.pt`` (float16) and ``fine_detector.json`` into a checkpoint directory, atomically.

    The JSON (config, ``meta``, sha256 of the weights) is written last, so a reader never sees a JSON
    whose weights are not in place (:func:`~lungvl_model.models.stored_pair.write_pair`).

    Args:
        directory: the checkpoint directory (must exist).
        detector: the trained detector.
        meta: JSON-able facts (training config, sites, metrics).

    Returns:
        The path of ``fine_detector.json``.
    """
    state = {k: v.detach().to(torch.float16).cpu() for k, v in detector.state_dict().items()}
    doc = {"format": FORMAT_VERSION, "config": detector.config.to_dict(), **(meta or {})}
    return write_pair(directory, DETECTOR_FILES, state, doc)


def load_fine_detector(directory: str | Path) -> FineDetector | None:
    """Load the fine detector stored beside a checkpoint (float32, eval mode).

    Args:
        directory: the checkpoint directory.

    Returns:
        The detector, or None when the directory holds neither file (no detector trained).

    Raises:
        CorruptStateError: naming the file, when one of the two is missing, unreadable, damaged, its
            hash differs from the JSON, or the weights do not fit the config.
    """
    found = read_pair(directory, DETECTOR_FILES, "the fine detector")
    if found is None:
        return None
    pt, doc = found
    js = pt.with_name(DETECTOR_FILES[1])
    if doc.get("format") != FORMAT_VERSION:
        raise CorruptStateError(f"{js}: format {doc.get('format')!r}, this lungvl reads {FORMAT_VERSION}")
    try:
        config = FineDetectorConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptStateError(f"{js}: not a fine detector config this lungvl can build ({e})") from None
    detector = FineDetector(config)
    load_weights(detector, pt)
    detector.eval()
    return detector

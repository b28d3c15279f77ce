"""Training settings (one frozen dataclass, saved beside every checkpoint)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

STAGE_NAMES = ("text", "ssl", "seg", "vl", "findings")


@dataclass(frozen=True)
class TrainConfig:
    """How one training stage runs.

    Attributes:
        stage: ``"text"`` (report warm-up), ``"ssl"``, ``"seg"``, ``"vl"`` or ``"findings"`` (finding
            sentences from slot attributes, :mod:`lungvl_model.training.findings_text`).
        max_steps: optimisation steps.
        batch_size: studies per step.
        lr: peak learning rate (AdamW, linear warm-up then cosine decay).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        grad_clip: global gradient-norm clip (0 = off; DP-SGD clips per sample instead).
        seed: seed of weights' init order, data order and SSL masks.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        bf16: bf16 autocast on CUDA (ignored on CPU).
        gradient_checkpointing: recompute encoder activations (CUDA memory saver).
        num_workers: DataLoader workers.
        log_every: steps between progress lines.
        seg_crop: ``(d, h, w)`` foreground-biased crops for the seg stage (each divisible by 16; None:
            whole volumes); see :class:`~lungvl_model.data.crops.ForegroundCrops`.
        seg_fg_prob: probability that a seg crop is centred on a nodule voxel.
        seg_hard_negative_prob: probability that a seg crop not centred on a nodule is centred on a
            hard-negative point (the anatomy real false positives come from; synthetic sites'
            sidecars); the rest lie anywhere. The default 0.5 makes ~17 % of all crops hard negatives.
    """

    stage: str = "vl"
    max_steps: int = 50
    batch_size: int = 2
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 5
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    gradient_checkpointing: bool = False
    num_workers: int = 0
    log_every: int = 10
    seg_crop: tuple[int, int, int] | None = None
    seg_fg_prob: float = 0.67
    seg_hard_negative_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"TrainConfig.stage must be one of {STAGE_NAMES}, got {self.stage!r}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"TrainConfig: max_steps and batch_size must be >= 1, got {self.max_steps}, {self.batch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.seg_crop is not None:
            crop = tuple(int(c) for c in self.seg_crop)
            if len(crop) != 3 or any(c < 16 or c % 16 for c in crop):
                raise ValueError(f"TrainConfig.seg_crop must be 3 multiples of 16, got {self.seg_crop!r}")
            object.__setattr__(self, "seg_crop", crop)
        if not 0.0 <= self.seg_fg_prob <= 1.0:
            raise ValueError(f"TrainConfig.seg_fg_prob must be in [0, 1], got {self.seg_fg_prob}")
        if not 0.0 <= self.seg_hard_negative_prob <= 1.0:
            raise ValueError(f"TrainConfig.seg_hard_negative_prob must be in [0, 1], got {self.seg_hard_negative_prob}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``KeyError`` with a suggestion."""
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                hint = difflib.get_close_matches(k, sorted(known), n=1)
                raise KeyError(f"unknown TrainConfig key {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        return cls(**d)

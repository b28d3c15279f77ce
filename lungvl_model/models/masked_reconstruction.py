"""Stage 1 self-supervision: masked-subvolume reconstruction (DESIGN.md §3, stage 1).

``mask_subvolumes`` hides random cubes of the CT volume, the ``VisionEncoder`` encodes the masked
volume, a ``ReconstructionHead`` on the finest aggregated scale predicts the original intensities,
and ``MaskedReconstructionLoss`` scores only the hidden voxels::

    masked, mask = mask_subvolumes(image, ratio=0.4, block=8)
    pred = head(encoder(masked).scales[0])
    loss = MaskedReconstructionLoss()(pred, image, mask)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lungvl_model.models.blocks import smoothing_conv

__all__ = ["MaskedReconstructionLoss", "ReconstructionHead", "mask_subvolumes"]

_FILLS = ("noise", "zeros")
_REDUCTIONS = ("mean", "sum", "none")
_KINDS = ("l1", "l2")


def mask_subvolumes(
    image: torch.Tensor,
    *,
    ratio: float = 0.4,
    block: int = 8,
    generator: torch.Generator | None = None,
    fill: str = "noise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace random cubes of ``block³`` voxels by noise or zeros.

    The volume is tiled by a grid of ``block``-sized cells (the last cell of a dimension is cropped
    when the size is not a multiple of ``block``); in every sample exactly
    ``round(ratio * n_cells)`` cells are picked at random, so the voxel ratio is exact when the size
    is a multiple of ``block``. All channels of a picked cell are hidden.

    Args:
        image: ``(B, C, D, H, W)`` volume (intensities in [0, 1] after preprocessing).
        ratio: fraction of cells to hide, in [0, 1].
        block: edge of a hidden cube in voxels (>= 1).
        generator: optional ``torch.Generator`` (on ``image``'s device) for reproducible masks.
        fill: ``"noise"`` (Gaussian with each sample's mean and std) or ``"zeros"``.

    Returns:
        ``(masked, mask)``: ``masked`` has ``image``'s shape and dtype, ``mask`` is a bool
        ``(B, 1, D, H, W)`` tensor, true where voxels were hidden. ``image`` is not modified.

    Raises:
        ValueError: on a non 5-D image or an out-of-range ``ratio``/``block``/``fill``.
    """
    if image.ndim != 5:
        raise ValueError(f"mask_subvolumes expects (B, C, D, H, W), received shape {tuple(image.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask_subvolumes ratio must be in [0, 1], got {ratio}")
    if block < 1:
        raise ValueError(f"mask_subvolumes block must be >= 1, got {block}")
    if fill not in _FILLS:
        raise ValueError(f"mask_subvolumes fill must be one of {_FILLS}, got {fill!r}")
    b = image.shape[0]
    spatial = image.shape[2:]
    grid = [math.ceil(s / block) for s in spatial]
    n_cells = math.prod(grid)
    n_masked = round(ratio * n_cells)
    dev = generator.device if generator is not None else image.device
    # Random ranks per cell: the n_masked smallest are hidden (exact count per sample).
    ranks = torch.rand(b, n_cells, generator=generator, device=dev).argsort(dim=1).argsort(dim=1)
    cells = (ranks < n_masked).view(b, 1, *grid).to(image.device)
    mask = cells
    for dim, size in zip((2, 3, 4), spatial, strict=True):
        mask = mask.repeat_interleave(block, dim=dim).narrow(dim, 0, size)
    if fill == "zeros":
        filler = torch.zeros_like(image)
    else:
        noise = torch.randn(image.shape, generator=generator, device=dev, dtype=image.dtype).to(image.device)
        mean = image.mean(dim=(1, 2, 3, 4), keepdim=True)
        std = image.std(dim=(1, 2, 3, 4), keepdim=True)
        filler = mean + std * noise
    return torch.where(mask, filler, image), mask


class ReconstructionHead(nn.Module):
    """Predict the original intensities from the finest aggregated scale.

    ``ConvNormAct3d(in_channels → hidden, 3x3x3)`` (a bottleneck when ``bottleneck``) →
    ``Conv3d(hidden → out_channels, 1x1x1)``
    (linear output: the loss compares intensities directly).

    Args:
        in_channels: channels of the finest aggregated scale (``VisionEncoder.out_channels``).
        hidden: hidden width.
        out_channels: channels of the reconstructed image (``VisionConfig.in_channels``).
        norm_groups: GroupNorm groups of the hidden layer.

    Shape:
        ``(B, in_channels, D, H, W)`` → ``(B, out_channels, D, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 16,
        out_channels: int = 1,
        norm_groups: int = 4,
        *,
        bottleneck: bool = False,
    ) -> None:
        super().__init__()
        self.hidden = smoothing_conv(in_channels, hidden, bottleneck=bottleneck, norm_groups=norm_groups)
        self.out = nn.Conv3d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct.

        Args:
            x: ``(B, in_channels, D, H, W)``, usually ``VisionOutput.scales[0]``.

        Returns:
            ``(B, out_channels, D, H, W)``.
        """
        return self.out(self.hidden(x))


class MaskedReconstructionLoss(nn.Module):
    """L1 or L2 reconstruction error on the hidden voxels only (STYLE.md habit 5).

    A study's loss is the mean error over *its own* hidden voxels (:meth:`per_study`), never a mean
    pooled over the batch (whose divisor would depend on the other studies' masks).

    Args:
        kind: ``"l1"`` (absolute error) or ``"l2"`` (squared error).
        reduction: ``"mean"``: the per-study losses averaged with fixed weights ``1/B`` (a study with
            nothing hidden contributes 0), 0 (with grad) when nothing is hidden; ``"sum"``: summed error
            over hidden voxels; ``"none"``: the element-wise error map ``(B, C, D, H, W)``, zero outside
            the mask.

    Raises:
        ValueError: on an unknown ``kind`` or ``reduction``.
    """

    def __init__(self, kind: str = "l1", reduction: str = "mean") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"MaskedReconstructionLoss kind must be one of {_KINDS}, got {kind!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"MaskedReconstructionLoss reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.kind = kind
        self.reduction = reduction

    def per_study(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean error over each study's hidden voxels (and channels): ``(B,)``, 0 where nothing is hidden.

        Args and shapes as :meth:`forward`.
        """
        err, weight = self._error(pred, target, mask)
        return err.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Score the reconstruction.

        Args:
            pred: ``(B, C, D, H, W)`` reconstruction.
            target: ``(B, C, D, H, W)`` original (unmasked) image.
            mask: ``(B, 1, D, H, W)`` or ``(B, C, D, H, W)`` bool, true on hidden voxels.

        Returns:
            A scalar for ``"mean"``/``"sum"``, the ``(B, C, D, H, W)`` map for ``"none"``.

        Raises:
            ValueError: when the shapes do not match.
        """
        if self.reduction == "mean":
            return self.per_study(pred, target, mask).mean()
        err, _ = self._error(pred, target, mask)
        return err if self.reduction == "none" else err.sum()

    def _error(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The error map, zero outside the mask, and the mask as weights (both ``(B, C, D, H, W)``)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"MaskedReconstructionLoss: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if (
            mask.ndim != pred.ndim
            or mask.shape[0] != pred.shape[0]
            or mask.shape[2:] != pred.shape[2:]
            or (mask.shape[1] not in (1, pred.shape[1]))
        ):
            raise ValueError(
                f"MaskedReconstructionLoss: mask must be (B, 1 or C, D, H, W) matching {tuple(pred.shape)}, "
                f"received {tuple(mask.shape)}"
            )
        diff = pred - target.detach()
        err = diff.abs() if self.kind == "l1" else diff.square()
        weight = mask.expand_as(err).to(err.dtype)
        return err * weight, weight

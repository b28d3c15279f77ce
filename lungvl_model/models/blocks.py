"""3-D building blocks of the vision encoder: conv-norm-act, residual block, dual attention.

Every block uses GroupNorm (never BatchNorm: DP-SGD with Opacus needs per-sample gradients, and
CT batches are small), no in-place operations and only parameters owned by standard layers
(``nn.Conv3d``, ``nn.GroupNorm``) so Opacus can compute per-sample gradients for all of them.
Building blocks take explicit typed kwargs (STYLE.md habit 1); the encoder builds them from
``VisionConfig``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "BottleneckConvNormAct3d",
    "ConvNormAct3d",
    "DualAttention3d",
    "ResidualBlock3d",
    "count_parameters",
    "group_count",
    "smoothing_conv",
]

_ACTIVATIONS = ("leakyrelu", "gelu")


def group_count(channels: int, norm_groups: int) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` not above ``norm_groups``.

    ``VisionConfig`` already guarantees divisibility for its widths; this keeps heads with free
    widths (e.g. ``hidden=6``) valid instead of failing inside ``nn.GroupNorm``.

    Args:
        channels: number of channels to normalise.
        norm_groups: wanted number of groups.

    Returns:
        A group count that divides ``channels``.

    Raises:
        ValueError: if ``channels`` or ``norm_groups`` is not positive.
    """
    if channels < 1 or norm_groups < 1:
        raise ValueError(f"group_count needs positive channels and norm_groups, got {channels}, {norm_groups}")
    return max(g for g in range(1, min(channels, norm_groups) + 1) if channels % g == 0)


def _activation(name: str) -> nn.Module:
    if name == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=False)
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected one of {_ACTIVATIONS}")


class ConvNormAct3d(nn.Sequential):
    """``Conv3d`` (no bias) → ``GroupNorm`` → activation.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel size (odd; padded to keep the size at stride 1).
        stride: convolution stride (2 halves every spatial dimension).
        norm_groups: GroupNorm groups (reduced to a divisor of ``out_channels`` if needed).
        act: ``"leakyrelu"``, ``"gelu"`` or ``None`` for no activation.

    Shape:
        ``(B, in_channels, D, H, W)`` → ``(B, out_channels, D/stride, H/stride, W/stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_groups: int = 4,
        act: str | None = "leakyrelu",
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvNormAct3d needs an odd kernel_size, got {kernel_size}")
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(group_count(out_channels, norm_groups), out_channels),
        ]
        if act is not None:
            layers.append(_activation(act))
        super().__init__(*layers)


class BottleneckConvNormAct3d(nn.Sequential):
    """``1x1x1`` reduce → ``k³`` conv at the reduced width → ``1x1x1`` expand (no biases) → ``GroupNorm`` → act.

    A cheap stand-in for :class:`ConvNormAct3d` at full resolution, where a dense ``3x3x3`` conv at
    aggregation width costs ``C_in · C_out · 27`` multiply-adds per voxel (27,648 at 32 → 32) and
    this one ``C_in · m + m² · 27 + m · C_out`` (2,240 at 32 → 32 with ``m = 8``). (A depthwise
    separable conv has fewer multiply-adds but PyTorch's CPU backward of a depthwise 3-D conv is as
    slow as the dense one: measured, not used.)

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd cubic kernel size of the middle conv.
        norm_groups: GroupNorm groups (reduced to a divisor of ``out_channels`` if needed).
        act: ``"leakyrelu"``, ``"gelu"`` or ``None``.
        reduction: ``m = max(out_channels // reduction, 4)``.

    Shape:
        ``(B, in_channels, D, H, W)`` → ``(B, out_channels, D, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        norm_groups: int = 4,
        act: str | None = "leakyrelu",
        reduction: int = 4,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"BottleneckConvNormAct3d needs an odd kernel_size, got {kernel_size}")
        if reduction < 1:
            raise ValueError(f"BottleneckConvNormAct3d reduction must be >= 1, got {reduction}")
        mid = max(out_channels // reduction, 4)
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, mid, 1, bias=False),
            nn.Conv3d(mid, mid, kernel_size, padding=kernel_size // 2, bias=False),
            nn.Conv3d(mid, out_channels, 1, bias=False),
            nn.GroupNorm(group_count(out_channels, norm_groups), out_channels),
        ]
        if act is not None:
            layers.append(_activation(act))
        super().__init__(*layers)


def smoothing_conv(
    in_channels: int, out_channels: int, *, bottleneck: bool, norm_groups: int = 4, act: str | None = "leakyrelu"
) -> nn.Module:
    """A stride-1 ``3x3x3`` conv-norm-act: :class:`BottleneckConvNormAct3d` or dense :class:`ConvNormAct3d`.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        bottleneck: :class:`BottleneckConvNormAct3d` instead of :class:`ConvNormAct3d`.
        norm_groups: GroupNorm groups.
        act: activation name or None.

    Returns:
        The module, ``(B, in_channels, D, H, W)`` → ``(B, out_channels, D, H, W)``.
    """
    if bottleneck:
        return BottleneckConvNormAct3d(in_channels, out_channels, 3, norm_groups, act)
    return ConvNormAct3d(in_channels, out_channels, 3, 1, norm_groups, act)


class ResidualBlock3d(nn.Module):
    """Post-activation residual block: two 3x3x3 conv-norm layers plus a (projected) shortcut.

    ``y = act(norm(conv(drop(act(norm(conv(x)))))) + shortcut(x))``; the shortcut is the identity
    when shape is kept, else a strided 1x1x1 conv + GroupNorm.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: 1 keeps the resolution, 2 halves it.
        norm_groups: GroupNorm groups.
        dropout: channel-wise 3-D dropout between the two convolutions (0 disables it).
        act: activation name (``"leakyrelu"`` or ``"gelu"``).

    Shape:
        ``(B, in_ch, D, H, W)`` → ``(B, out_ch, D/stride, H/stride, W/stride)``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        norm_groups: int = 4,
        dropout: float = 0.0,
        act: str = "leakyrelu",
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ResidualBlock3d dropout must be in [0, 1), got {dropout}")
        if stride not in (1, 2):
            raise ValueError(f"ResidualBlock3d stride must be 1 or 2, got {stride}")
        self.conv1 = ConvNormAct3d(in_ch, out_ch, 3, stride, norm_groups, act)
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = ConvNormAct3d(out_ch, out_ch, 3, 1, norm_groups, act=None)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else ConvNormAct3d(in_ch, out_ch, 1, stride, norm_groups, None)
        )
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B, in_ch, D, H, W)``.

        Returns:
            ``(B, out_ch, D/stride, H/stride, W/stride)``.
        """
        return self.act(self.conv2(self.drop(self.conv1(x))) + self.shortcut(x))


class DualAttention3d(nn.Module):
    """Channel-spatial dual attention (CBAM-like), added residually.

    * Channel branch: global average and max pooling, concatenated to ``(B, 2C, 1, 1, 1)`` (one MLP
      call rather than CBAM's shared MLP applied twice, so no layer is re-used inside a forward,
      which keeps Opacus' per-sample hooks simple) → 1x1x1 MLP ``2C → C/reduction → C`` → sigmoid.
    * Spatial branch: per-voxel channel mean and max of the channel-refined map → ``k³`` conv
      ``2 → 1`` → sigmoid, one gate per voxel.
    * Output: ``x + norm(proj(x * g_channel * g_spatial))`` with a 1x1x1 conv + GroupNorm
      projection, so the block is a refinement of ``x`` (not identity at initialisation).

    The last computed gates are kept in ``last_channel_gate`` ``(B, C, 1, 1, 1)`` and
    ``last_spatial_gate`` ``(B, 1, D, H, W)`` (detached) for explanations.

    Args:
        channels: input/output channels ``C``.
        reduction: channel-MLP bottleneck factor (hidden width ``max(C // reduction, 4)``).
        norm_groups: GroupNorm groups of the output projection.
        spatial_kernel: odd kernel size of the spatial-gate convolution.

    Shape:
        ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 4, norm_groups: int = 4, spatial_kernel: int = 7) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"DualAttention3d reduction must be >= 1, got {reduction}")
        if spatial_kernel % 2 != 1:
            raise ValueError(f"DualAttention3d spatial_kernel must be odd, got {spatial_kernel}")
        hidden = max(channels // reduction, 4)
        self.channel_mlp = nn.Sequential(
            nn.Conv3d(2 * channels, hidden, 1),
            nn.LeakyReLU(0.01, inplace=False),
            nn.Conv3d(hidden, channels, 1),
        )
        self.spatial_conv = nn.Conv3d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.proj = ConvNormAct3d(channels, channels, 1, 1, norm_groups, act=None)
        self.last_channel_gate: torch.Tensor | None = None
        self.last_spatial_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply channel then spatial gating and add the projected result to ``x``.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, C, D, H, W)``.
        """
        pooled = torch.cat([x.mean(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)], dim=1)
        g_channel = torch.sigmoid(self.channel_mlp(pooled))  # (B, C, 1, 1, 1)
        refined = x * g_channel
        maps = torch.cat([refined.mean(dim=1, keepdim=True), refined.amax(dim=1, keepdim=True)], dim=1)
        g_spatial = torch.sigmoid(self.spatial_conv(maps))  # (B, 1, D, H, W)
        self.last_channel_gate = g_channel.detach()
        self.last_spatial_gate = g_spatial.detach()
        return x + self.proj(refined * g_spatial)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)

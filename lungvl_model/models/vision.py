"""Hierarchical 3-D vision encoder with five scales, path aggregation and dual attention (DESIGN.md §3).

``VisionEncoder(config)`` = ``HierarchicalEncoder3d`` (residual CNN, scales 1 … 1/16, channel-spatial
dual attention after the scales in ``config.attention_scales``) → ``PathAggregation3d`` (FPN
top-down then PANet bottom-up, every scale at ``config.aggregation_channels``). The finest
aggregated scale feeds the ``SegmentationHead`` (and the SSL reconstruction head); the coarser ones
feed the language decoder's cross-attention; ``pooled`` feeds the risk heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lungvl_model.models.blocks import ConvNormAct3d, DualAttention3d, ResidualBlock3d, smoothing_conv
from lungvl_model.models.config import VisionConfig

__all__ = [
    "NUM_SCALES",
    "SIZE_DIVISOR",
    "HierarchicalEncoder3d",
    "PathAggregation3d",
    "SegmentationHead",
    "VisionEncoder",
    "VisionOutput",
]

NUM_SCALES = 5
#: Input D, H, W must be multiples of this (four stride-2 steps).
SIZE_DIVISOR = 2 ** (NUM_SCALES - 1)


@dataclass
class VisionOutput:
    """Output of :class:`VisionEncoder` (STYLE.md habit 6).

    Attributes:
        scales: aggregated maps, finest first; ``scales[i]`` is
            ``(B, aggregation_channels, D/2^i, H/2^i, W/2^i)``.
        encoder_scales: raw encoder maps before aggregation, ``(B, channels[i], D/2^i, H/2^i, W/2^i)``.
        pooled: ``(B, 2 * aggregation_channels)``: global average pooling then global max pooling of
            the coarsest aggregated scale (``scales[-1]``), concatenated. After the bottom-up path
            the coarsest scale has seen every finer scale, so one map suffices.
    """

    scales: list[torch.Tensor]
    encoder_scales: list[torch.Tensor]
    pooled: torch.Tensor


class HierarchicalEncoder3d(nn.Module):
    """Residual 3-D CNN with five scales and dual attention on selected scales.

    Scale 0 is a stem ``ConvNormAct3d`` plus ``blocks_per_scale`` residual blocks at full
    resolution; scale ``i > 0`` starts with a stride-2 residual block. A ``DualAttention3d`` closes
    every scale listed in ``config.attention_scales``.

    When ``gradient_checkpointing`` is true (initialised from the config, may be switched at run
    time) and the module is training with grad enabled, each scale's blocks are recomputed in
    backward (``torch.utils.checkpoint``, ``use_reentrant=False``). Do not combine it with Opacus
    per-sample-gradient hooks: the recomputation would run the forward hooks twice.

    Args:
        config: the vision config.

    Shape:
        ``(B, in_channels, D, H, W)`` → list of 5 maps ``(B, channels[i], D/2^i, H/2^i, W/2^i)``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        ch, n, g = config.channels, config.blocks_per_scale, config.norm_groups
        if n < 1:
            raise ValueError(f"VisionConfig.blocks_per_scale must be >= 1, got {n}")
        self.stem = ConvNormAct3d(config.in_channels, ch[0], 3, 1, g)
        stages = []
        for i in range(NUM_SCALES):
            blocks: list[nn.Module] = []
            for j in range(n):
                c_in = ch[i] if j > 0 or i == 0 else ch[i - 1]
                stride = 2 if j == 0 and i > 0 else 1
                blocks.append(ResidualBlock3d(c_in, ch[i], stride, g, config.dropout))
            if i in config.attention_scales:
                blocks.append(DualAttention3d(ch[i], reduction=4, norm_groups=g))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode.

        Args:
            x: ``(B, in_channels, D, H, W)``, D, H, W divisible by 16.

        Returns:
            Five maps, finest first: ``(B, channels[i], D/2^i, H/2^i, W/2^i)``.
        """
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=False) if ckpt else stage(x)
            out.append(x)
        return out


class PathAggregation3d(nn.Module):
    """FPN top-down then PANet bottom-up fusion of the five encoder scales.

    * Lateral: 1x1x1 conv + GroupNorm, ``channels[i] → A`` (``A = aggregation_channels``).
    * Top-down: ``p4 = l4``; ``p_i = l_i + up(p_{i+1})`` (trilinear to ``l_i``'s size), then a 3x3x3
      smoothing conv-norm-act on every ``p_i`` (a bottleneck at full resolution when
      ``config.bottleneck_full_resolution``).
    * Bottom-up: ``n0 = p0``; ``n_i = fuse_i(p_i + down_i(n_{i-1}))`` with a stride-2 3x3x3 conv.

    Args:
        config: the vision config.

    Shape:
        five maps ``(B, channels[i], D/2^i, …)`` → five maps ``(B, A, D/2^i, H/2^i, W/2^i)``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        a, g = config.aggregation_channels, config.norm_groups
        self.lateral = nn.ModuleList(ConvNormAct3d(c, a, 1, 1, g, act=None) for c in config.channels)
        sep = config.bottleneck_full_resolution
        self.smooth = nn.ModuleList(
            smoothing_conv(a, a, bottleneck=sep and i == 0, norm_groups=g) for i in range(NUM_SCALES)
        )
        self.down = nn.ModuleList(ConvNormAct3d(a, a, 3, 2, g) for _ in range(NUM_SCALES - 1))
        self.fuse = nn.ModuleList(ConvNormAct3d(a, a, 3, 1, g) for _ in range(NUM_SCALES - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse.

        Args:
            feats: five encoder maps, finest first.

        Returns:
            Five aggregated maps ``(B, A, D/2^i, H/2^i, W/2^i)``, finest first.
        """
        if len(feats) != NUM_SCALES:
            raise ValueError(f"PathAggregation3d expects {NUM_SCALES} scales, received {len(feats)}")
        lat = [layer(f) for layer, f in zip(self.lateral, feats, strict=True)]
        top_down: list[torch.Tensor] = [lat[-1]]
        for i in range(NUM_SCALES - 2, -1, -1):
            up = F.interpolate(top_down[0], size=lat[i].shape[2:], mode="trilinear", align_corners=False)
            top_down.insert(0, lat[i] + up)
        p = [smooth(t) for smooth, t in zip(self.smooth, top_down, strict=True)]
        out = [p[0]]
        for i in range(1, NUM_SCALES):
            out.append(self.fuse[i - 1](p[i] + self.down[i - 1](out[-1])))
        return out


class VisionEncoder(nn.Module):
    """The vision side of the model: hierarchical encoder + path aggregation + pooled summary.

    Args:
        config: the vision config.

    Example:
        >>> enc = VisionEncoder(VisionConfig())
        >>> out = enc(torch.zeros(1, 1, 32, 32, 32))
        >>> [tuple(s.shape[2:]) for s in out.scales][-1], tuple(out.pooled.shape)
        ((2, 2, 2), (1, 64))
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = HierarchicalEncoder3d(config)
        self.aggregation = PathAggregation3d(config)

    @property
    def out_channels(self) -> int:
        """Channels of every aggregated scale (``aggregation_channels``)."""
        return self.config.aggregation_channels

    @property
    def pooled_channels(self) -> int:
        """Width of ``VisionOutput.pooled`` (``2 * aggregation_channels``)."""
        return 2 * self.config.aggregation_channels

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the encoder scales are checkpointed in training."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def check_input(self, image: torch.Tensor) -> None:
        """Fail early on a badly shaped CT batch (STYLE.md habit 9).

        Args:
            image: expected ``(B, in_channels, D, H, W)`` with D, H, W divisible by 16.

        Raises:
            ValueError: naming the expected and the received shape.
        """
        shape = tuple(image.shape)
        expected = f"(B, {self.config.in_channels}, D, H, W) with D, H, W divisible by {SIZE_DIVISOR}"
        if image.ndim != 5:
            raise ValueError(f"VisionEncoder expects {expected}; received {image.ndim}-D shape {shape}")
        if shape[1] != self.config.in_channels:
            raise ValueError(f"VisionEncoder expects {expected}; received {shape[1]} channels in shape {shape}")
        bad = [f"{name}={s}" for name, s in zip("DHW", shape[2:], strict=True) if s % SIZE_DIVISOR]
        if bad:
            raise ValueError(
                f"VisionEncoder expects {expected}; received shape {shape} "
                f"({', '.join(bad)} not divisible by {SIZE_DIVISOR}; pad or crop the volume)"
            )

    def forward(self, image: torch.Tensor) -> VisionOutput:
        """Encode a CT batch.

        Args:
            image: ``(B, in_channels, D, H, W)``, D, H, W divisible by 16, intensities in [0, 1].

        Returns:
            :class:`VisionOutput` with five aggregated scales, five encoder scales and the pooled
            ``(B, 2 * aggregation_channels)`` vector.

        Raises:
            ValueError: when the shape is not accepted by :meth:`check_input`.
        """
        self.check_input(image)
        enc = self.encoder(image)
        agg = self.aggregation(enc)
        top = agg[-1]
        pooled = torch.cat([top.mean(dim=(2, 3, 4)), top.amax(dim=(2, 3, 4))], dim=1)
        return VisionOutput(scales=agg, encoder_scales=enc, pooled=pooled)


class SegmentationHead(nn.Module):
    """Nodule segmentation logits from the finest aggregated scale.

    ``ConvNormAct3d(in_channels → hidden, 3x3x3)`` (a bottleneck when ``bottleneck``) →
    ``Conv3d(hidden → 1, 1x1x1)`` with bias. Apply ``sigmoid`` for the nodule probability map.

    Args:
        in_channels: channels of the finest aggregated scale (``VisionEncoder.out_channels``).
        hidden: width of the hidden layer.
        norm_groups: GroupNorm groups of the hidden layer.
        prior: initial foreground probability (bias = logit(prior)); 0.5 gives a zero bias.
        bottleneck: a bottleneck hidden layer (``VisionConfig.bottleneck_full_resolution``).

    Shape:
        ``(B, in_channels, D, H, W)`` → ``(B, 1, D, H, W)`` logits.
    """

    def __init__(
        self, in_channels: int, hidden: int = 16, norm_groups: int = 4, prior: float = 0.5, *, bottleneck: bool = False
    ) -> None:
        super().__init__()
        if not 0.0 < prior < 1.0:
            raise ValueError(f"SegmentationHead prior must be in (0, 1), got {prior}")
        self.hidden = smoothing_conv(in_channels, hidden, bottleneck=bottleneck, norm_groups=norm_groups)
        self.out = nn.Conv3d(hidden, 1, 1)
        nn.init.constant_(self.out.bias, float(torch.logit(torch.tensor(prior))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            x: ``(B, in_channels, D, H, W)``, usually ``VisionOutput.scales[0]``.

        Returns:
            ``(B, 1, D, H, W)`` logits.
        """
        return self.out(self.hidden(x))

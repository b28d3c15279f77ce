"""Specialised segmentation peer: an nnU-Net-style MONAI ``DynUNet`` (``lungvl bench``, evaluation).

The peer is the anchor our segmentation head is compared against. It has the same five levels
(full resolution down to 1/16) and, by default, the same widths as the tiny ``VisionConfig``
preset, so a comparison isolates the architecture rather than the capacity. Pass
``filters=config.vision.channels`` to match another preset.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet

__all__ = ["DEFAULT_PEER_FILTERS", "build_dynunet_peer"]

#: Widths of the tiny preset (``PRESETS["tiny"].vision.channels``).
DEFAULT_PEER_FILTERS: tuple[int, ...] = (8, 16, 32, 48, 64)
_LEVELS = 5


def build_dynunet_peer(
    in_channels: int = 1,
    out_channels: int = 1,
    filters: Sequence[int] | None = None,
    *,
    res_block: bool = False,
) -> DynUNet:
    """Build the DynUNet peer.

    Five levels with 3x3x3 kernels, strides ``1, 2, 2, 2, 2`` (input D, H, W divisible by 16, as for
    ``VisionEncoder``), transposed-conv upsampling, affine instance norm and LeakyReLU without
    in-place ops (Opacus-friendly), no deep supervision.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for the binary nodule mask, ``(B, 1, D, H, W)``).
        filters: five widths, finest first; defaults to :data:`DEFAULT_PEER_FILTERS`.
        res_block: residual blocks instead of nnU-Net's plain conv blocks.

    Returns:
        An untrained ``monai.networks.nets.DynUNet`` mapping ``(B, in_channels, D, H, W)`` to
        ``(B, out_channels, D, H, W)`` logits in eval mode and training mode alike.

    Raises:
        ValueError: when ``filters`` does not have five positive widths.
    """
    widths = tuple(DEFAULT_PEER_FILTERS if filters is None else filters)
    if len(widths) != _LEVELS or any(int(w) < 1 for w in widths):
        raise ValueError(f"build_dynunet_peer needs {_LEVELS} positive filters, got {widths}")
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * _LEVELS,
        strides=[1, 2, 2, 2, 2],
        upsample_kernel_size=[2] * (_LEVELS - 1),
        filters=[int(w) for w in widths],
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": False, "negative_slope": 0.01}),
        deep_supervision=False,
        res_block=res_block,
    )

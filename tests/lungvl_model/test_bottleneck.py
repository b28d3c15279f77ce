"""Full-resolution bottleneck convs: shapes, cost, the config switch, and per-sample gradients for DP-SGD."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lungvl_model.models.blocks import BottleneckConvNormAct3d, ConvNormAct3d, smoothing_conv
from lungvl_model.models.config import VisionConfig
from lungvl_model.models.vision import PathAggregation3d, SegmentationHead


def test_bottleneck_shape_and_parameters_by_hand() -> None:
    block = BottleneckConvNormAct3d(32, 32, 3, norm_groups=4)
    assert block(torch.zeros(2, 32, 8, 8, 8)).shape == (2, 32, 8, 8, 8)
    # 32·8 (reduce) + 8·8·27 (3³) + 8·32 (expand) + 2·32 (GroupNorm affine)
    assert sum(p.numel() for p in block.parameters()) == 256 + 1728 + 256 + 64
    dense = ConvNormAct3d(32, 32, 3, 1, 4)
    assert sum(p.numel() for p in dense.parameters()) == 32 * 32 * 27 + 64


def test_bottleneck_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="odd kernel_size, got 2"):
        BottleneckConvNormAct3d(8, 8, 2)
    with pytest.raises(ValueError, match="reduction must be >= 1, got 0"):
        BottleneckConvNormAct3d(8, 8, reduction=0)


def test_config_switch_picks_the_full_resolution_convs() -> None:
    on = PathAggregation3d(VisionConfig())
    off = PathAggregation3d(dataclasses.replace(VisionConfig(), bottleneck_full_resolution=False))
    assert isinstance(on.smooth[0], BottleneckConvNormAct3d)
    assert all(isinstance(m, ConvNormAct3d) for m in on.smooth[1:])  # coarser scales stay dense
    assert all(isinstance(m, ConvNormAct3d) for m in off.smooth)
    assert isinstance(SegmentationHead(32, hidden=32, bottleneck=True).hidden, BottleneckConvNormAct3d)
    assert isinstance(smoothing_conv(8, 8, bottleneck=False), ConvNormAct3d)


def test_bottleneck_per_sample_gradients_match_single_sample_gradients() -> None:
    """Opacus' per-sample hooks handle every layer of the block (no layer is reused within a forward)."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    block = nn.Sequential(BottleneckConvNormAct3d(8, 8, 3, norm_groups=4), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(3, 8, 4, 4, 4)
    block(x)  # materialise the lazy layer
    plain = copy.deepcopy(block)
    gsm = GradSampleModule(block, loss_reduction="sum")
    gsm(x).sum().backward()
    samples = [p.grad_sample for p in block.parameters()]  # type: ignore[attr-defined]
    assert len(samples) == 7  # three convs, GroupNorm weight and bias, the linear weight and bias
    for i in range(3):
        plain.zero_grad()
        plain(x[i : i + 1]).sum().backward()
        for p, gs in zip(plain.parameters(), samples, strict=True):
            torch.testing.assert_close(gs[i], p.grad, rtol=1e-4, atol=1e-5)

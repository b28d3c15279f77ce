from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lungvl_model.models.vision as vision_mod
from lungvl_model.losses.segmentation import SegmentationLoss
from lungvl_model.models.blocks import ConvNormAct3d, DualAttention3d, ResidualBlock3d, group_count
from lungvl_model.models.config import PRESETS, VisionConfig
from lungvl_model.models.peers import build_dynunet_peer
from lungvl_model.models.vision import SegmentationHead, VisionEncoder, VisionOutput

TINY = PRESETS["tiny"].vision


@pytest.fixture(scope="module")
def tiny_encoder() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(TINY)


def test_output_shapes_every_scale(tiny_encoder: VisionEncoder) -> None:
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = tiny_encoder(x)
    assert isinstance(out, VisionOutput)
    assert len(out.scales) == len(out.encoder_scales) == 5
    for i, (agg, enc) in enumerate(zip(out.scales, out.encoder_scales, strict=True)):
        side = 32 // 2**i
        assert agg.shape == (2, TINY.aggregation_channels, side, side, side)
        assert enc.shape == (2, TINY.channels[i], side, side, side)
    assert out.pooled.shape == (2, 2 * TINY.aggregation_channels)
    assert tiny_encoder.out_channels == TINY.aggregation_channels
    assert tiny_encoder.pooled_channels == out.pooled.shape[1]
    logits = SegmentationHead(tiny_encoder.out_channels)(out.scales[0])
    assert logits.shape == (2, 1, 32, 32, 32)


def test_anisotropic_input(tiny_encoder: VisionEncoder) -> None:
    with torch.no_grad():
        out = tiny_encoder(torch.rand(1, 1, 16, 32, 48))
    assert out.scales[4].shape[2:] == (1, 2, 3)
    assert out.scales[0].shape[2:] == (16, 32, 48)


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_no_batchnorm_anywhere(preset: str) -> None:
    cfg = PRESETS[preset].vision
    models = [
        VisionEncoder(cfg),
        SegmentationHead(cfg.aggregation_channels),
        build_dynunet_peer(filters=cfg.channels),
    ]
    for model in models:
        bad = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not bad, bad


@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ((1, 1, 30, 32, 32), "30"),
        ((1, 2, 32, 32, 32), "2 channels"),
        ((1, 32, 32, 32), "4-D"),
        ((1, 1, 32, 32, 40), "40"),
    ],
)
def test_check_input_rejects(tiny_encoder: VisionEncoder, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        tiny_encoder(torch.zeros(shape))
    assert "divisible by 16" in str(err.value)


def test_gradient_checkpointing_same_output_and_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = vision_mod.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vision_mod, "checkpoint", counting)
    torch.manual_seed(0)
    plain = VisionEncoder(VisionConfig(channels=(8, 16, 16, 16, 16), aggregation_channels=8, dropout=0.0))
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    x = torch.rand(1, 1, 16, 16, 16)
    outs, grads = [], []
    for model in (plain, ckpt):
        model.train()  # checkpointing only runs in training; GroupNorm and no dropout make train == eval
        out = model(x)
        (out.scales[0].square().mean() + out.pooled.sum()).backward()
        outs.append(torch.cat([s.flatten() for s in out.scales]))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert calls == [False] * 5
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    ckpt.eval()
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    assert not calls


def test_dual_attention_shape_and_not_identity() -> None:
    torch.manual_seed(0)
    att = DualAttention3d(16, reduction=4, norm_groups=4)
    x = torch.randn(2, 16, 6, 8, 8)
    y = att(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    assert att.last_spatial_gate is not None and att.last_spatial_gate.shape == (2, 1, 6, 8, 8)
    assert att.last_channel_gate is not None and att.last_channel_gate.shape == (2, 16, 1, 1, 1)
    y.sum().backward()
    assert all(p.grad is not None for p in att.parameters())


def test_blocks_shapes_and_invalid_args() -> None:
    x = torch.randn(1, 8, 8, 8, 8)
    assert ResidualBlock3d(8, 16, stride=2, norm_groups=4, dropout=0.1)(x).shape == (1, 16, 4, 4, 4)
    assert ConvNormAct3d(8, 6, act="gelu")(x).shape == (1, 6, 8, 8, 8)
    assert group_count(6, 4) == 3 and group_count(32, 4) == 4
    with pytest.raises(ValueError, match="3"):
        ResidualBlock3d(8, 8, stride=3)
    with pytest.raises(ValueError, match="1.5"):
        ResidualBlock3d(8, 8, dropout=1.5)
    with pytest.raises(ValueError, match="swish"):
        ConvNormAct3d(8, 8, act="swish")
    with pytest.raises(ValueError, match="4"):
        ConvNormAct3d(8, 8, kernel_size=4)


def test_peer_shapes_and_invalid_filters() -> None:
    peer = build_dynunet_peer()
    with torch.no_grad():
        assert peer(torch.rand(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="five|5"):
        build_dynunet_peer(filters=(8, 16, 32))


def test_toy_sphere_segmentation_loss_decreases() -> None:
    torch.manual_seed(0)
    z, y, x = torch.meshgrid(*(torch.arange(16.0),) * 3, indexing="ij")
    centres = [(6.0, 7.0, 8.0), (9.0, 8.0, 7.0)]
    target = torch.stack([((z - a) ** 2 + (y - b) ** 2 + (x - c) ** 2 <= 9).float() for a, b, c in centres])[:, None]
    image = 0.2 + 0.6 * target + 0.05 * torch.randn_like(target)
    enc, head = VisionEncoder(TINY), SegmentationHead(TINY.aggregation_channels)
    params = [*enc.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    loss_fn = SegmentationLoss(boundary_weight=0.01)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(head(enc(image).scales[0]), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

from __future__ import annotations

import pytest
import torch

from lungvl_model.models.config import VisionConfig
from lungvl_model.models.masked_reconstruction import (
    MaskedReconstructionLoss,
    ReconstructionHead,
    mask_subvolumes,
)
from lungvl_model.models.vision import VisionEncoder


@pytest.mark.parametrize(
    ("shape", "ratio", "block", "tol"),
    [
        ((2, 1, 32, 32, 32), 0.4, 8, 0.01),
        ((3, 2, 16, 16, 16), 0.25, 4, 0.01),
        ((1, 1, 20, 20, 20), 0.5, 8, 0.15),
    ],
)
def test_mask_ratio_honoured(shape: tuple[int, ...], ratio: float, block: int, tol: float) -> None:
    image = torch.rand(shape)
    masked, mask = mask_subvolumes(image, ratio=ratio, block=block, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (shape[0], 1, *shape[2:])
    assert masked.shape == image.shape
    for b in range(shape[0]):
        assert abs(mask[b].float().mean().item() - ratio) <= tol
    keep = ~mask.expand_as(image)
    assert torch.equal(masked[keep], image[keep])
    assert not torch.equal(masked[~keep], image[~keep])


def test_mask_blocks_are_cubes_and_reproducible() -> None:
    image = torch.rand(2, 1, 16, 16, 16)
    a = mask_subvolumes(image, ratio=0.3, block=4, generator=torch.Generator().manual_seed(1), fill="zeros")
    b = mask_subvolumes(image, ratio=0.3, block=4, generator=torch.Generator().manual_seed(1), fill="zeros")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cells = a[1].view(2, 1, 4, 4, 4, 4, 4, 4).permute(0, 1, 2, 4, 6, 3, 5, 7).flatten(5).float()
    assert torch.all((cells.mean(-1) == 0) | (cells.mean(-1) == 1))  # every 4³ cell all-in or all-out
    assert torch.all(a[0][a[1]] == 0)


@pytest.mark.parametrize("kwargs", [{"ratio": 1.2}, {"ratio": -0.1}, {"block": 0}, {"fill": "mean"}])
def test_mask_invalid_args(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        mask_subvolumes(torch.rand(1, 1, 8, 8, 8), **kwargs)
    with pytest.raises(ValueError, match=r"\(8, 8, 8\)"):
        mask_subvolumes(torch.rand(8, 8, 8))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_only_on_masked_voxels(kind: str) -> None:
    target = torch.rand(2, 1, 8, 8, 8)
    _, mask = mask_subvolumes(target, ratio=0.5, block=4, generator=torch.Generator().manual_seed(0))
    pred = torch.rand_like(target, requires_grad=True)
    loss_fn = MaskedReconstructionLoss(kind=kind)
    loss = loss_fn(pred, target, mask)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.any(pred.grad[mask] != 0)
    changed = torch.where(mask, pred.detach(), pred.detach() + 5.0)
    torch.testing.assert_close(loss_fn(changed, target, mask), loss.detach())
    err = (pred.detach() - target).abs() if kind == "l1" else (pred.detach() - target).square()
    torch.testing.assert_close(loss.detach(), err[mask].mean())


def test_loss_reductions_and_empty_mask() -> None:
    target, pred = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True
    none = MaskedReconstructionLoss(reduction="none")(pred, target, mask)
    assert none.shape == pred.shape and torch.all(none[~mask] == 0)
    torch.testing.assert_close(MaskedReconstructionLoss(reduction="sum")(pred, target, mask), none.sum())
    # per study, fixed weights 1/B: study 1 hides nothing and adds 0 (not a batch-pooled voxel mean)
    torch.testing.assert_close(MaskedReconstructionLoss()(pred, target, mask), none[0].sum() / mask[0].sum() / 2)
    empty = MaskedReconstructionLoss()(pred, target, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_loss_of_a_study_does_not_depend_on_the_others_masks() -> None:
    target, pred = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4)
    small, large = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool), torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    small[:, :, :1] = True
    large[0, :, :1] = True
    large[1] = True  # study 1 hides 4x more voxels: a batch-pooled mean would shrink study 0's weight
    loss_fn = MaskedReconstructionLoss()
    a, b = loss_fn.per_study(pred, target, small), loss_fn.per_study(pred, target, large)
    torch.testing.assert_close(a[0], b[0])
    p = pred.clone().requires_grad_(True)
    loss_fn(p, target, large).backward()
    grad_large = p.grad[0].clone()
    p.grad = None
    loss_fn(p, target, small).backward()
    torch.testing.assert_close(p.grad[0], grad_large)


def test_loss_invalid_args() -> None:
    with pytest.raises(ValueError, match="huber"):
        MaskedReconstructionLoss(kind="huber")
    with pytest.raises(ValueError, match="avg"):
        MaskedReconstructionLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4, 4\)"):
        MaskedReconstructionLoss()(
            torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 2), torch.ones(1, 1, 4, 4, 4).bool()
        )


def test_few_steps_reduce_reconstruction_loss() -> None:
    torch.manual_seed(0)
    cfg = VisionConfig(channels=(8, 8, 16, 16, 16), aggregation_channels=8)
    enc, head = VisionEncoder(cfg), ReconstructionHead(cfg.aggregation_channels, hidden=8)
    z = torch.arange(16.0).view(16, 1, 1)
    image = (0.5 + 0.4 * torch.sin(z / 3) + torch.zeros(1, 1, 16, 16, 16)).expand(2, 1, 16, 16, 16)
    masked, mask = mask_subvolumes(image, ratio=0.4, block=4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    loss_fn = MaskedReconstructionLoss()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(head(enc(masked).scales[0]), image, mask)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from lungvl_model.losses.segmentation import SegmentationLoss


def _target(b: int = 2, side: int = 12) -> torch.Tensor:
    t = torch.zeros(b, 1, side, side, side)
    for i in range(b):
        t[i, :, 3 + i : 8 + i, 3:8, 4:9] = 1
    return t


def test_perfect_prediction_is_about_zero() -> None:
    target = _target()
    logits = (target * 2 - 1) * 30
    assert SegmentationLoss()(logits, target).item() < 1e-3
    bad = SegmentationLoss()(-logits, target)
    assert bad.item() > 0.5


def test_valid_mask_excludes_samples() -> None:
    target = _target(3)
    logits = torch.randn(3, 1, 12, 12, 12, requires_grad=True)
    valid = torch.tensor([True, False, True])
    loss_fn = SegmentationLoss()
    loss = loss_fn(logits, target, valid)
    expected = loss_fn(logits[[0, 2]], target[[0, 2]]) * 2 / 3  # fixed weights 1/B: the invalid study adds 0
    torch.testing.assert_close(loss, expected)
    other = target.clone()
    other[1] = 1 - other[1]
    torch.testing.assert_close(loss_fn(logits, other, valid), loss)
    loss.backward()
    assert torch.all(logits.grad[1] == 0) and torch.any(logits.grad[0] != 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_sample_gives_zero_with_grad(reduction: str) -> None:
    logits = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    loss = SegmentationLoss(reduction=reduction)(logits, _target(2, 8), torch.tensor([False, False]))
    assert torch.all(loss == 0) and loss.requires_grad
    loss.sum().backward()
    assert torch.all(logits.grad == 0)


def test_reductions() -> None:
    target, logits = _target(3), torch.randn(3, 1, 12, 12, 12)
    valid = torch.tensor([True, True, False])
    none = SegmentationLoss(reduction="none")(logits, target, valid)
    assert none.shape == (3,) and none[2] == 0 and torch.all(none[:2] > 0)
    torch.testing.assert_close(SegmentationLoss(reduction="sum")(logits, target, valid), none.sum())
    torch.testing.assert_close(SegmentationLoss(reduction="mean")(logits, target, valid), none.sum() / 3)


def test_terms_and_empty_target() -> None:
    target, logits = _target(2), torch.randn(2, 1, 12, 12, 12)
    target[1] = 0
    dice = DiceLoss(sigmoid=True, reduction="none")(logits, target).flatten()
    bce = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, pos_weight=torch.tensor(30.0), reduction="none"
        )
        .flatten(1)
        .mean(1)
    )
    all_terms = SegmentationLoss(boundary_weight=0.5, reduction="none")(logits, target)
    dice_only = SegmentationLoss(boundary_weight=0.0, bce_weight=0.0, reduction="none")(logits, target)
    bce_only = SegmentationLoss(dice_weight=0.0, boundary_weight=0.0, reduction="none")(logits, target)
    torch.testing.assert_close(dice_only, torch.stack([dice[0], torch.tensor(0.0)]))  # no Dice on empty
    torch.testing.assert_close(bce_only, bce)
    torch.testing.assert_close(all_terms[1], bce[1])  # empty target: BCE only
    assert all_terms[0] > dice[0] + bce[0]  # plus the boundary term
    assert torch.isfinite(all_terms).all()
    with_empty = SegmentationLoss(boundary_weight=0.0, bce_weight=0.0, dice_on_empty=True, reduction="none")
    torch.testing.assert_close(with_empty(logits, target), dice)


def test_empty_targets_do_not_hide_progress() -> None:
    """A batch with one empty study: a better prediction of the nodule must lower the loss visibly."""
    target = _target(2)
    target[1] = 0
    background = torch.full((2, 1, 12, 12, 12), -4.0)
    better = background.clone()
    better[0] = torch.where(target[0] > 0, 4.0, -4.0)
    loss_fn = SegmentationLoss(boundary_weight=0.0)
    assert loss_fn(background, target).item() - loss_fn(better, target).item() > 0.3


def test_bce_pushes_empty_studies_to_background() -> None:
    logits = torch.zeros(1, 1, 8, 8, 8, requires_grad=True)
    SegmentationLoss()(logits, torch.zeros(1, 1, 8, 8, 8)).backward()
    assert torch.all(logits.grad > 0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dice_weight": -1.0}, "-1.0"),
        ({"boundary_weight": -0.5}, "-0.5"),
        ({"dice_weight": 0.0, "boundary_weight": 0.0, "bce_weight": 0.0}, "all 0"),
        ({"bce_weight": -2.0}, "-2.0"),
        ({"pos_weight": 0.0}, "pos_weight"),
        ({"reduction": "avg"}, "avg"),
        ({"alpha": 0.0}, "alpha"),
    ],
)
def test_invalid_args(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SegmentationLoss(**kwargs)


def test_invalid_shapes() -> None:
    loss_fn = SegmentationLoss()
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8, 4\)"):
        loss_fn(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"\(2, 2, 8, 8, 8\)"):
        loss_fn(torch.zeros(2, 2, 8, 8, 8), torch.zeros(2, 2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        loss_fn(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8), torch.ones(3, dtype=torch.bool))

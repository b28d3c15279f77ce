"""The site's evaluation reports nodule sensitivity and Dice on found nodules beside whole-volume Dice
(hand-computed on a stub model's logits)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from client.ledger import METRIC_WHITELIST
from client.site_evaluation import score_studies


class StubModel(torch.nn.Module):
    """Returns fixed segmentation logits: +1 where ``pred`` is set, -1 elsewhere; no risk heads."""

    def __init__(self, pred: torch.Tensor) -> None:
        super().__init__()
        self.pred = pred

    def forward(self, batch: dict[str, Any], stage: str, generator: torch.Generator) -> SimpleNamespace:
        logits = torch.where(self.pred, 1.0, -1.0)
        return SimpleNamespace(loss=torch.tensor(0.5), seg_logits=logits, risk=None)


def test_found_nodule_metrics() -> None:
    """Study 0: nodule A (8 voxels) half found with a 4-voxel leak (Dice 0.5), nodule B missed. Study 1: no
    nodule, nothing predicted (whole-volume Dice 1, no found-nodule entry). Study 2: one nodule found exactly.
    Sensitivity 2/3 over the 2 studies with nodules; Dice on found nodules (0.5 + 1) / 2 = 0.75."""
    seg = torch.zeros(3, 1, 8, 8, 8)
    seg[0, 0, 1:3, 1:3, 1:3] = 1
    seg[0, 0, 6, 6, 6] = 1
    seg[2, 0, 4:6, 4:6, 4:6] = 1
    pred = torch.zeros(3, 1, 8, 8, 8, dtype=torch.bool)
    pred[0, 0, 1:3, 1:3, 1] = True
    pred[0, 0, 1:3, 1:3, 0] = True
    pred[2] = seg[2] > 0
    batch = {
        "image": torch.zeros(3, 1, 8, 8, 8),
        "seg": seg,
        "has_mask": torch.tensor([True, True, True]),
        "study_uid": ["a", "b", "c"],
    }
    n, metrics, support = score_studies(
        StubModel(pred), [batch], stage="seg", device=torch.device("cpu"), generator=torch.Generator(),
        group=lambda _: None,
    )  # fmt: skip
    assert n == 3
    assert metrics["val_nodule_sensitivity"] == pytest.approx(2 / 3)
    assert metrics["val_dice_found"] == pytest.approx(0.75)
    assert metrics["val_dice"] == pytest.approx((2 * 4 / (8 + 1 + 8) + 1.0 + 1.0) / 3)
    assert support["val_nodule_sensitivity"] == 2 and support["val_dice_found"] == 2
    assert {"val_nodule_sensitivity", "val_dice_found"} <= METRIC_WHITELIST

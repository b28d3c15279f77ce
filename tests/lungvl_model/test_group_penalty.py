"""Subgroup penalties of local training (V-REx variance, group DRO) and the site risk-head summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from federation.protocol import RoundConfig
from lungvl_model.evaluation.site_summary import site_risk_metrics
from lungvl_model.losses.group_penalty import (
    GroupPenalized,
    GroupRiskLoss,
    dro_update,
    group_risks,
    slice_thickness_group,
    take_batch,
    variance_penalty,
)


@pytest.mark.parametrize(
    ("mm", "group"),
    [(1.0, "thin"), ("1.25", "thin"), (2.5, "medium"), (3.0, "medium"), (4.0, "thick"), ("5", "thick"),
     (None, None), ("", None), (0.0, None), (float("nan"), None)],
)  # fmt: skip
def test_slice_thickness_group(mm, group) -> None:
    assert slice_thickness_group(mm) == group


def test_group_risks_and_variance_by_hand() -> None:
    losses = torch.tensor([1.0, 3.0, 4.0, 0.5])
    risks, counts = group_risks(losses, torch.tensor([0, 0, 2, 2]), 3)
    torch.testing.assert_close(risks, torch.tensor([2.0, 0.0, 2.25]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 2.0]))
    # groups 0 and 2 present: mean 2.125, variance ((−0.125)² + 0.125²) / 2
    assert float(variance_penalty(risks, counts > 0)) == pytest.approx(0.015625)
    assert float(variance_penalty(torch.tensor([5.0]))) == 0.0
    with pytest.raises(ValueError, match="group indices"):
        group_risks(losses, torch.tensor([0, 0, 3, 2]), 3)


def test_dro_update_boosts_the_worst_group() -> None:
    w = dro_update(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]), step=math.log(3.0))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]))
    same = dro_update(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]), step=0.0)
    torch.testing.assert_close(same, torch.tensor([0.5, 0.5]))
    kept = dro_update(torch.tensor([0.2, 0.8]), torch.tensor([9.0, 0.0]), 1.0, present=torch.tensor([False, True]))
    torch.testing.assert_close(kept, torch.tensor([0.2, 0.8]))
    with pytest.raises(ValueError, match="step"):
        dro_update(torch.tensor([1.0]), torch.tensor([1.0]), -1.0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 0.5 * 1.0 + 0.5 * 3.0),  # example-weighted mean of the groups present
        ({"penalty": 2.0}, 2.0 + 2.0 * 1.0),  # + λ · Var = (1 + 1) / 2
        ({"reduction": "mean"}, 2.0 / 3),
    ],
)
def test_group_risk_loss(kwargs, expected) -> None:
    loss = GroupRiskLoss(3, **kwargs)
    value = loss(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([2.0, 0.0, 2.0]))
    assert float(value) == pytest.approx(expected)
    terms = GroupRiskLoss(3, **{**kwargs, "reduction": "none"})(
        torch.tensor([1.0, 0.0, 3.0]), torch.tensor([2.0, 0.0, 2.0])
    )
    assert terms.shape == (3,) and float(terms[1]) == 0.0


def test_group_dro_weights_move_in_training_only() -> None:
    loss = GroupRiskLoss(2, dro_step=1.0)
    risks, counts = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    first = float(loss(risks, counts))
    assert first == pytest.approx(2.0 * math.e**2 / (math.e**2 + 1))  # weights updated before use
    loss.eval()
    before = loss.dro_weights.clone()
    loss(risks, counts)
    torch.testing.assert_close(loss.dro_weights, before)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_groups": 0}, {"n_groups": 2, "penalty": -1.0}, {"n_groups": 2, "dro_step": math.inf},
     {"n_groups": 2, "reduction": "max"}],
)  # fmt: skip
def test_invalid_args(kwargs) -> None:
    with pytest.raises(ValueError):
        GroupRiskLoss(**kwargs)
    with pytest.raises(ValueError, match="dg_penalty"):
        RoundConfig(dg_penalty=-0.1)
    with pytest.raises(ValueError, match="dro_step"):
        RoundConfig(dro_step=math.nan)


@dataclass
class _Out:
    loss: torch.Tensor
    losses: dict[str, float] = field(default_factory=dict)


class _MeanModel(nn.Module):
    """loss = mean over the batch of w · x; records the batch sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.seen: list[int] = []

    def forward(self, batch, stage="vl", generator=None):
        self.seen.append(int(batch["image"].shape[0]))
        loss = (self.w * batch["x"]).mean()
        return _Out(loss, {"term": float(loss.detach())})


def _batch(x: list[float], uids: list[str]) -> dict:
    return {
        "image": torch.zeros(len(x), 1),
        "x": torch.tensor(x),
        "study_uid": uids,
        "targets": {"y": torch.arange(len(x))},
    }


def test_take_batch_keeps_structure() -> None:
    part = take_batch(_batch([1.0, 2.0, 3.0], ["a", "b", "c"]), [2, 0])
    assert part["study_uid"] == ["c", "a"] and part["x"].tolist() == [3.0, 1.0]
    assert part["targets"]["y"].tolist() == [2, 0]


def test_group_penalized_combines_group_losses() -> None:
    model = _MeanModel()
    groups = {"a": 0, "b": 2, "c": 2, "d": -1}
    wrapped = GroupPenalized(model, lambda b: [groups[u] for u in b["study_uid"]], penalty=1.0)
    out = wrapped(_batch([1.0, 3.0, 5.0], ["a", "b", "c"]))
    # groups: {0: [1]} risk 1, {2: [3, 5]} risk 4; shares 1/3, 2/3; variance ((1-2.5)² + (4-2.5)²)/2 = 2.25
    assert float(out.loss) == pytest.approx(1 / 3 + 8 / 3 + 2.25)
    assert out.losses["group_variance"] == pytest.approx(2.25) and out.losses["term"] == pytest.approx(3.0)
    out.loss.backward()
    assert model.w.grad is not None and sorted(model.seen) == [1, 2]
    # one known group (plus an unknown item): a plain forward
    model.seen.clear()
    plain = wrapped(_batch([1.0, 3.0], ["b", "d"]))
    assert float(plain.loss) == pytest.approx(2.0) and model.seen == [2]
    # unknown items join with their share of the batch
    mixed = wrapped(_batch([1.0, 3.0, 8.0], ["a", "b", "d"]))
    assert float(mixed.loss) == pytest.approx(2 / 3 * (0.5 * 1 + 0.5 * 3 + 1.0) + 1 / 3 * 8.0)


def test_site_risk_metrics_by_hand() -> None:
    m = site_risk_metrics(
        malignant=[1, 0, 1, 0, math.nan],
        malignancy_prob=[0.9, 0.2, 0.4, 0.6, 0.5],
        lung_rads_true=[3, 0, 5, 1, -1],
        lung_rads_pred=[4, 0, 2, 3, 5],
        concepts_true=np.array([[1, 0, 0], [0, 0, 1], [1, 1, math.nan], [0, 0, 0], [1, 1, 1]]),
        concepts_pred=np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 0]]),
        groups=["thin", "thin", "thick", "thick", None],
    )
    assert m["val_auc"] == pytest.approx(0.75)  # pairs (0.9>0.2, 0.9>0.6, 0.4>0.2, 0.4<0.6)
    assert m["val_sensitivity"] == pytest.approx(0.5) and m["val_specificity"] == pytest.approx(0.5)
    # concepts (NaN skipped): TP at (0,0), (1,2), (2,1); FP at (0,2); FN at (2,0) and all of row 4
    tp, fp, fn = 3, 1, 1 + 3
    assert m["val_concept_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["val_auc_thin"] == 1.0 and m["val_auc_thick"] == 0.0 and "val_auc_medium" not in m
    assert 0 <= m["val_ece"] <= 1
    one_class = site_risk_metrics(
        malignant=[0, 0], malignancy_prob=[0.1, 0.2], lung_rads_true=[0, 1], lung_rads_pred=[0, 0]
    )
    assert "val_auc" not in one_class and "val_sensitivity" not in one_class and one_class["val_specificity"] == 1.0
    with pytest.raises(ValueError, match="length"):
        site_risk_metrics(malignant=[0], malignancy_prob=[0.1, 0.2], lung_rads_true=[0], lung_rads_pred=[0])

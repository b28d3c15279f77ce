"""Finding slots: pooling, attribute rows, per-study independence, and the slot sequences of a report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lungvl_model.data.targets import MAX_SLOTS, NODULE_ATTRIBUTES, nodule_attributes
from lungvl_model.models.lungvl import LungVLModel, SlotSequence, slot_sequences
from lungvl_model.models.slots import SlotEncoder, ball_mask, masked_average, slot_memory
from lungvl_model.text.tokenizer import train_tokenizer
from privacy.dp_sgd import dp_sgd_ready, per_sample_parameters
from tests.lungvl_model.test_lungvl_model import SMALL, TEXTS, make_batch

E = 16


def test_masked_average_by_hand() -> None:
    feats = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)  # channel 0: 0..7, channel 1: 8..15
    masks = torch.zeros(1, 2, 2, 2, 2)
    masks[0, 0, 0, 0, :] = 1  # voxels 0 and 1
    pooled, has = masked_average(feats, masks)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([0.5, 8.5]))
    torch.testing.assert_close(pooled[0, 1], torch.zeros(2))  # empty mask
    assert has.tolist() == [[True, False]]
    # a mask on a 4^3 grid is area-averaged onto the 2^3 feature grid: one full octant = voxel 7
    big = torch.zeros(1, 1, 4, 4, 4)
    big[0, 0, 2:, 2:, 2:] = 1
    torch.testing.assert_close(masked_average(feats, big)[0][0, 0], torch.tensor([7.0, 15.0]))


def test_ball_mask() -> None:
    ball = ball_mask((5, 5, 5), np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    assert ball.sum() == 7 and ball[2, 2, 2] and ball[1, 2, 2] and not ball[1, 1, 2]
    tiny = ball_mask((5, 5, 5), np.array([0.4, 3.6, 9.0]), np.array([0.1, 0.1, 0.1]))
    assert tiny.sum() == 1 and tiny[0, 4, 4]  # no voxel inside: the nearest voxel in the grid


def test_nodule_attributes_rows_largest_first() -> None:
    rows = [
        {"nodule_id": "1", "mean_diameter_mm": "4", "volume_mm3": "30", "type": "solid", "lobe": "LLL",
         "calcification": "0", "margin": "smooth", "lung_rads": "2", "brock_probability": "0.01"},
        {"nodule_id": "2", "mean_diameter_mm": "9", "volume_mm3": "", "type": "part_solid", "lobe": "RUL",
         "calcification": "", "margin": "spiculated", "lung_rads": "4A", "brock_probability": ""},
    ]  # fmt: skip
    attrs, ids = nodule_attributes(rows, max_slots=3)
    assert ids == [2, 1, 0]
    first = dict(zip(NODULE_ATTRIBUTES, attrs[0], strict=True))
    assert first["log_diameter"] == pytest.approx(math.log(10.0))
    assert math.isnan(first["log_volume"]) and math.isnan(first["calcified"]) and math.isnan(first["brock"])
    assert (first["type"], first["lobe"], first["margin"], first["lung_rads"]) == (1.0, 0.0, 2.0, 3.0)
    second = dict(zip(NODULE_ATTRIBUTES, attrs[1], strict=True))
    assert second["log_volume"] == pytest.approx(math.log(31.0)) and second["lobe"] == 4.0
    assert all(math.isnan(v) for v in attrs[2])
    empty, empty_ids = nodule_attributes([], 2)
    assert empty_ids == [0, 0] and all(math.isnan(v) for row in empty for v in row)


def _inputs(b: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, 8, 4, 4, 4, generator=g)
    masks = (torch.rand(b, k, 8, 8, 8, generator=g) > 0.7).float()
    attrs = torch.tensor([[math.log1p(6.0), math.log1p(100.0), 0, 2, 0, 1, 2, 0.05]] * k).expand(b, k, -1).clone()
    valid = torch.ones(b, k, dtype=torch.bool)
    return feats, masks, attrs, valid


def test_slot_encoder_shapes_unknowns_and_per_study() -> None:
    torch.manual_seed(0)
    enc = SlotEncoder(8, E, max_slots=4).eval()
    feats, masks, attrs, valid = _inputs(2, 3, 0)
    valid[1, 2] = False
    out = enc(feats, masks, attrs, valid)
    assert out.shape == (2, 4, E)
    assert (out[1, 2] == 0).all() and (out[0, 2] != 0).any()  # an invalid slot is 0
    torch.testing.assert_close(out[0, 3], out[1, 3])  # the same "no finding" slot for every study
    alone = enc(feats[:1], masks[:1], attrs[:1], valid[:1])
    torch.testing.assert_close(alone[0], out[0])  # a study's slots depend on that study alone
    unknown = attrs.clone()
    unknown[0, 0, NODULE_ATTRIBUTES.index("lobe")] = float("nan")
    unknown[0, 0, NODULE_ATTRIBUTES.index("brock")] = float("nan")
    changed = enc(feats, masks, unknown, valid)
    assert not torch.allclose(changed[0, 0], out[0, 0]) and torch.isfinite(changed).all()
    torch.testing.assert_close(changed[0, 1], out[0, 1])
    with pytest.raises(ValueError, match="SlotEncoder"):
        enc(feats, masks, attrs[..., :5], valid)


def test_slot_memory_mask() -> None:
    slots, vt = torch.randn(2, 3, E), torch.randn(2, 5, E)
    select = torch.tensor([[True, False, False], [False, False, True]])
    memory, mask = slot_memory(slots, vt, select)
    assert memory.shape == (2, 8, E) and torch.equal(memory[:, 3:], vt)
    assert mask.tolist() == [[1, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]]


REPORT = (
    "TECHNIQUE: 1 mm.\nFINDINGS:\n2 pulmonary nodules are identified. A 3 mm solid nodule in the RLL (image 9). "
    "A 9 mm part-solid nodule in the right upper lobe. No effusion.\nIMPRESSION:\n1. 9 mm nodule in the RUL.\n"
    "2. Lung-RADS 4A: suspicious."
)


def test_slot_sequences_of_a_labelled_report() -> None:
    rows = [
        {"nodule_id": "1", "mean_diameter_mm": "3.2", "lobe": "RLL", "type": "solid"},
        {"nodule_id": "2", "mean_diameter_mm": "9.1", "lobe": "RUL", "type": "part_solid"},
    ]
    attrs, ids = nodule_attributes(rows)
    valid = torch.tensor(ids) != 0
    seqs = slot_sequences(REPORT, torch.tensor(attrs), valid, 2)
    impression = "1. 9 mm nodule in the RUL.\n2. Lung-RADS 4A: suspicious."
    assert seqs == [
        SlotSequence("A 9 mm part-solid nodule in the right upper lobe.", (0,), "finding", 0),
        SlotSequence("A 3 mm solid nodule in the RLL.", (1,), "finding", 1),
        SlotSequence(impression, (0, 1), "impression"),
    ]
    none = torch.zeros(MAX_SLOTS, dtype=torch.bool)
    nan = torch.full((MAX_SLOTS, len(NODULE_ATTRIBUTES)), float("nan"))
    negative = "FINDINGS: No pulmonary nodules. No effusion.\nIMPRESSION: 1. Lung-RADS 1: negative."
    assert slot_sequences(negative, nan, none, 0) == [
        SlotSequence("No pulmonary nodules.", (MAX_SLOTS,), "negative"),
        SlotSequence("1. Lung-RADS 1: negative.", (MAX_SLOTS,), "impression"),
    ]
    # no labels (count unknown): the whole FINDINGS + IMPRESSION from the visual tokens; no report: nothing
    whole = slot_sequences(REPORT, nan, none, -1)
    assert len(whole) == 1 and whole[0].kind == "report" and whole[0].slots == ()
    assert whole[0].text.startswith("FINDINGS:") and "TECHNIQUE" not in whole[0].text
    assert slot_sequences("", None, None, 2) == []


def test_slot_decoding_keeps_per_study_gradients_for_dp_sgd() -> None:
    """Under DP-SGD's per-sample hooks every slot and decoder parameter gets a correct per-study gradient."""
    torch.manual_seed(0)
    model = LungVLModel(SMALL, train_tokenizer(TEXTS, vocab_size=300))
    batch = make_batch(2)
    batch["text"] = [
        "FINDINGS: A 9 mm solid nodule in the right upper lobe. IMPRESSION: Lung-RADS 4A.",
        "FINDINGS: No pulmonary nodules. IMPRESSION: Lung-RADS 1.",
    ]
    a0, i0 = nodule_attributes([{"nodule_id": "1", "mean_diameter_mm": "9", "lobe": "RUL", "type": "solid"}])
    a1, i1 = nodule_attributes([])
    batch["nodule_attrs"], batch["nodule_ids"] = torch.tensor([a0, a1]), torch.tensor([i0, i1])
    batch["nodule_valid"], batch["nodules"] = batch["nodule_ids"] != 0, batch["seg"].long()
    batch["targets"]["n_nodules"] = torch.tensor([1, 0])
    with dp_sgd_ready(model):
        kept, dropped = per_sample_parameters(model, batch, stage="vl")
    slot_params = {n for n, _ in model.slots.named_parameters(prefix="slots")}
    assert "slots.kind.weight" in slot_params
    assert slot_params and slot_params <= kept, slot_params - kept
    assert not [n for n in dropped if n.startswith(("decoder.", "slots."))], dropped


def test_prefix_is_kind_plus_mean_selected_slot() -> None:
    torch.manual_seed(0)
    enc = SlotEncoder(8, E, max_slots=4).eval()
    slots = torch.randn(2, 5, E)
    select = torch.tensor([[True, False, True, False, False], [False, False, False, False, False]])
    kind = torch.tensor([3, 0])
    got = enc.prefix(slots, select, kind)
    torch.testing.assert_close(got[0], enc.kind.weight[3] + (slots[0, 0] + slots[0, 2]) / 2)
    torch.testing.assert_close(got[1], enc.kind.weight[0])  # nothing selected: the kind alone

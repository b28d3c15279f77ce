"""Finding slots: pooling, attribute rows, per-study independence, and the slot sequences of a report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lungvl_model.data.targets import (
    MAX_SLOTS,
    NODULE_ATTRIBUTES,
    NODULE_CONTEXTS,
    nodule_attribute_row,
    nodule_attributes,
)
from lungvl_model.inference.findings import Finding
from lungvl_model.inference.narrative import finding_attributes
from lungvl_model.models.lungvl import LungVLModel, SlotSequence, slot_sequences
from lungvl_model.models.slots import SlotEncoder, ball_mask, masked_average, slot_memory
from lungvl_model.text.tokenizer import train_tokenizer
from lungvl_model.training.checkpoint import CheckpointError, load_checkpoint, sha256_file
from privacy.dp_sgd import dp_sgd_ready, per_sample_parameters
from tests.conftest import micro_checkpoint
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
    # rows without context / growth_mm: the comparison is unknown
    assert all(math.isnan(first[c]) for c in ("context", "growth_mm", "log_prior_diameter"))
    empty, empty_ids = nodule_attributes([], 2)
    assert empty_ids == [0, 0] and all(math.isnan(v) for row in empty for v in row)


def _inputs(b: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, 8, 4, 4, 4, generator=g)
    masks = (torch.rand(b, k, 8, 8, 8, generator=g) > 0.7).float()
    row = [math.log1p(6.0), math.log1p(100.0), 0, 2, 0, 1, 2, 0.05, 3, 0.2, math.log1p(5.8)]
    attrs = torch.tensor([row] * k).expand(b, k, -1).clone()
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


def _row(context: str, growth_mm: float = math.nan, prior_mm: float = math.nan) -> list[float]:
    return nodule_attribute_row(
        mean_diameter_mm=8.0, volume_mm3=200.0, type="solid", lobe="RUL", calcified=0.0, margin="smooth",
        lung_rads="3", brock=0.05, context=context, growth_mm=growth_mm, prior_mean_diameter_mm=prior_mm,
    )  # fmt: skip


def test_attribute_layout_keeps_the_first_eight_columns() -> None:
    assert NODULE_ATTRIBUTES[:8] == (
        "log_diameter", "log_volume", "type", "lobe", "calcified", "margin", "lung_rads", "brock"
    )  # fmt: skip
    assert NODULE_ATTRIBUTES[8:] == ("context", "growth_mm", "log_prior_diameter")


@pytest.mark.parametrize(
    ("context", "index"), [("baseline", 0.0), ("new", 1.0), ("growing", 2.0), ("stable", 3.0), ("slow_growing", 4.0)]
)
def test_each_context_value_is_encoded(context: str, index: float) -> None:
    assert NODULE_CONTEXTS[int(index)] == context
    row = dict(zip(NODULE_ATTRIBUTES, _row(context), strict=True))
    assert row["context"] == index
    assert math.isnan(row["growth_mm"]) and math.isnan(row["log_prior_diameter"])  # unknown growth: NaN


def test_unknown_context_and_growth_are_nan_and_growth_is_kept() -> None:
    for bad in ("", "shrinking", "Growing"):
        assert math.isnan(_row(bad)[NODULE_ATTRIBUTES.index("context")])
    row = dict(zip(NODULE_ATTRIBUTES, _row("growing", 2.1, 5.9), strict=True))
    assert row["growth_mm"] == pytest.approx(2.1) and row["log_prior_diameter"] == pytest.approx(math.log(6.9))
    assert math.isnan(_row("stable", math.inf, -1.0)[9]) and math.isnan(_row("stable", math.inf, -1.0)[10])


def test_nodule_attributes_read_context_and_growth_from_labels_csv_rows() -> None:
    rows = [
        {"nodule_id": "1", "mean_diameter_mm": "8", "lobe": "RUL", "context": "growing", "growth_mm": "2.1"},
        {"nodule_id": "2", "mean_diameter_mm": "5", "lobe": "LLL", "context": "new", "growth_mm": ""},
        {"nodule_id": "3", "mean_diameter_mm": "4", "lobe": "RLL", "context": "baseline", "growth_mm": ""},
        {"nodule_id": "4", "mean_diameter_mm": "3", "lobe": "LUL", "context": "stable", "growth_mm": "-0.2"},
    ]
    attrs, ids = nodule_attributes(rows, max_slots=4)
    assert ids == [1, 2, 3, 4]
    c, g, p = (NODULE_ATTRIBUTES.index(n) for n in ("context", "growth_mm", "log_prior_diameter"))
    assert [a[c] for a in attrs] == [2.0, 1.0, 0.0, 3.0]
    assert attrs[0][g] == pytest.approx(2.1) and attrs[0][p] == pytest.approx(math.log1p(5.9))
    assert attrs[3][g] == pytest.approx(-0.2) and attrs[3][p] == pytest.approx(math.log1p(3.2))
    assert all(math.isnan(attrs[i][g]) and math.isnan(attrs[i][p]) for i in (1, 2))


def _bare_encoder() -> SlotEncoder:
    """An eval-mode encoder without the final LayerNorm, so a slot is the plain sum of its embeddings."""
    torch.manual_seed(0)
    enc = SlotEncoder(8, E, max_slots=2).eval()
    enc.norm = nn.Identity()  # type: ignore[assignment]
    return enc


def _slot(enc: SlotEncoder, row: list[float]) -> torch.Tensor:
    feats, masks, _, valid = _inputs(1, 1, 0)
    return enc(feats, masks, torch.tensor([[row]], dtype=torch.float32), valid)[0, 0]


def test_slot_embeds_context_and_unknown_growth() -> None:
    enc = _bare_encoder()
    ctx = enc.categorical["context_embed"].weight
    w, unk = enc.continuous.weight, enc.continuous_unknown.weight  # (E, 5), (5, E)
    base = _slot(enc, _row("baseline"))
    for i, name in enumerate(NODULE_CONTEXTS):
        torch.testing.assert_close(_slot(enc, _row(name)) - base, ctx[i] - ctx[0])
    torch.testing.assert_close(_slot(enc, _row("")) - base, ctx[len(NODULE_CONTEXTS)] - ctx[0])  # unknown
    # growth 2.1 mm and prior 5.9 mm instead of unknown: the linear terms replace the unknown embeddings
    grown = _slot(enc, _row("baseline", 2.1, 5.9))
    expected = 2.1 * w[:, 3] + math.log1p(5.9) * w[:, 4] - unk[3] - unk[4]
    torch.testing.assert_close(grown - base, expected)


def _measured(**kw: object) -> Finding:
    return Finding(
        centroid_zyx=(10.0, 10.0, 10.0), centroid_lps=(10.0, 10.0, 10.0), longest_diameter_mm=8.0,
        short_axis_mm=8.0, mean_diameter_mm=8.0, volume_mm3=200.0, solid_component_mm=8.0, type="solid",
        calcified=False, lobe="RUL", index=1, lung_rads="3", brock_probability=0.05, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_slot_from_a_growing_finding_carries_its_comparison() -> None:
    growing = finding_attributes(_measured(context="growing", prior_mean_diameter_mm=5.9, growth_mm=2.1))
    named = dict(zip(NODULE_ATTRIBUTES, growing, strict=True))
    assert named["context"] == 2.0 and named["growth_mm"] == pytest.approx(2.1)
    assert named["log_prior_diameter"] == pytest.approx(math.log1p(5.9))
    assert math.isnan(named["margin"])  # margin is not measured
    baseline = finding_attributes(_measured())  # no prior: context "baseline", growth unknown
    assert baseline[NODULE_ATTRIBUTES.index("context")] == 0.0 and math.isnan(baseline[9]) and math.isnan(baseline[10])
    enc = _bare_encoder()
    ctx, w, unk = enc.categorical["context_embed"].weight, enc.continuous.weight, enc.continuous_unknown.weight
    diff = _slot(enc, growing) - _slot(enc, baseline)
    expected = ctx[2] - ctx[0] + 2.1 * w[:, 3] + math.log1p(5.9) * w[:, 4] - unk[3] - unk[4]
    torch.testing.assert_close(diff, expected)


def test_a_checkpoint_of_the_eight_column_layout_is_refused(tmp_path: Path) -> None:
    d = micro_checkpoint(tmp_path / "ck")
    state = torch.load(d / "model.pt", weights_only=True)
    state["slots.continuous.weight"] = state["slots.continuous.weight"][:, :3].clone()  # old: 3 continuous
    state["slots.continuous_unknown.weight"] = state["slots.continuous_unknown.weight"][:3].clone()
    del state["slots.categorical.context_embed.weight"]  # old: no context embedding
    torch.save(state, d / "model.pt")
    meta = json.loads((d / "meta.json").read_text())
    meta["model_sha256"] = sha256_file(d / "model.pt")
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the configured architecture"):
        load_checkpoint(d)

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lungvl_model.data.preprocess import PreprocessConfig
from lungvl_model.losses.group_penalty import take_batch
from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig, get_preset
from lungvl_model.models.fusion import attention_to_heatmap
from lungvl_model.models.lungvl import LungVLModel, mention_regions
from lungvl_model.text.tokenizer import train_tokenizer
from lungvl_model.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TEXTS = [
    "A 9 mm solid nodule in the right upper lobe with spiculated margins. Lung-RADS 4A.",
    "No pulmonary nodules. Mild centrilobular emphysema. Lung-RADS 1.",
    "A 5 mm ground-glass nodule in the left lower lobe. Lung-RADS 2.",
    "Part-solid nodule in the right lower lobe measuring 12 mm. Lung-RADS 4B.",
] * 6

SMALL = LungVLConfig(
    preset="test",
    vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
    text=TextConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, visual_scales=(2, 3), dropout=0.0),
    heads=HeadsConfig(hidden=16),
    input=PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), size=(32, 32, 32)),
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def make_batch(b: int = 2) -> dict:
    d = 32
    z, y, x = torch.meshgrid(*[torch.arange(d)] * 3, indexing="ij")
    image = torch.rand(b, 1, d, d, d) * 0.1
    seg = torch.zeros(b, 1, d, d, d)
    lobes = torch.zeros(b, 1, d, d, d, dtype=torch.long)
    for i in range(b):
        c = 10 + 8 * i
        blob = ((z - 16) ** 2 + (y - c) ** 2 + (x - c) ** 2) <= 16
        seg[i, 0][blob] = 1
        image[i, 0][blob] = 0.8
        lobes[i, 0, :, :16, :16] = 1
        lobes[i, 0, :, 16:, 16:] = 5
    return {
        "image": image,
        "seg": seg,
        "lobes": lobes,
        "has_mask": torch.tensor([True] * b),
        "has_lobes": torch.tensor([True] * b),
        "text": TEXTS[:b],
        "targets": {
            "malignant": torch.tensor([1.0, 0.0][:b]),
            "lung_rads": torch.tensor([3, 0][:b]),
            "growth_mm": torch.tensor([2.0, 0.0][:b]),
            "nodule_type": torch.tensor([0, -1][:b]),
            "spiculated": torch.tensor([1.0, float("nan")][:b]),
            "calcified": torch.tensor([0.0, float("nan")][:b]),
            "juxtapleural": torch.tensor([0.0, float("nan")][:b]),
            "roundness": torch.tensor([0.8, float("nan")][:b]),
            "diameter_mm": torch.tensor([9.0, 0.0][:b]),
        },
    }


def test_presets_round_trip_and_unknown_keys() -> None:
    for name in ("tiny", "base"):
        cfg = get_preset(name)
        assert LungVLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="did you mean 'tiny'"):
        get_preset("tinny")
    with pytest.raises(KeyError, match="did you mean 'channels'"):
        VisionConfig.from_dict({"chanels": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match="5 scales"):
        VisionConfig(channels=(4, 8))


def test_stage_outputs_and_heatmap_alignment(tok) -> None:
    torch.manual_seed(0)
    model = LungVLModel(SMALL, tok)
    batch = make_batch()
    out = model(batch, stage="vl")
    assert out.seg_logits.shape == (2, 1, 32, 32, 32)
    assert out.risk.lung_rads_logits.shape == (2, 6) and out.risk.malignancy_logit.shape == (2,)
    assert out.cross_attention is not None
    b, t, n = out.cross_attention.shape
    assert n == out.layout.n_tokens == 8**3 + 4**3
    torch.testing.assert_close(out.cross_attention.sum(-1), torch.ones(b, t), atol=1e-4, rtol=0)
    heat = attention_to_heatmap(out.cross_attention, out.layout, (32, 32, 32), normalize=False)
    assert heat.shape == (2, t, 32, 32, 32)
    # heatmaps keep the attention mass: each token's map sums to 1 over the input grid
    torch.testing.assert_close(heat.flatten(2).sum(-1), torch.ones(2, t), atol=1e-3, rtol=0)
    # a one-hot attention on one token lands on that token's cell
    one = torch.zeros(1, 1, n)
    one[0, 0, 0] = 1.0  # first token of scale 2: the corner cell (z, y, x) = (0, 0, 0) of an 8^3 grid
    h = attention_to_heatmap(one, out.layout, (32, 32, 32))
    assert h[0, 0, :4, :4, :4].mean() > 0.5 and h[0, 0, 16:, 16:, 16:].max() < 1e-6
    for stage in ("ssl", "seg"):
        assert torch.isfinite(model(batch, stage=stage).loss)
    with pytest.raises(ValueError, match="unknown stage"):
        model(batch, stage="pretrain")


def test_every_loss_is_per_study_with_fixed_weights(tok) -> None:
    """A study's loss depends on that study alone; the batch loss is the plain mean of the studies' (1/B)."""
    torch.manual_seed(0)
    model = LungVLModel(SMALL, tok).eval()  # eval: no dropout, so two passes are comparable
    model.config = replace(SMALL, loss=replace(SMALL.loss, contrastive=0.0))  # InfoNCE couples by design
    batch = make_batch(2)
    other = take_batch(batch, [0, 1])  # a copy; study 1: no report, no mask, every label unknown
    other["text"] = [batch["text"][0], ""]
    other["has_mask"] = torch.tensor([True, False])
    for v in other["targets"].values():
        v[1] = -1 if v.dtype == torch.int64 else float("nan")
    alone = take_batch(batch, [0])
    with torch.no_grad():
        for stage in ("ssl", "seg", "vl"):
            outs = [model(b, stage=stage, generator=torch.Generator().manual_seed(3)) for b in (batch, other, alone)]
            for b, out in zip((batch, other, alone), outs, strict=True):
                assert out.study_losses is not None and out.study_losses.shape == (len(b["text"]),)
                torch.testing.assert_close(out.loss, out.study_losses.mean())
            if stage == "ssl":  # study 0's mask noise differs between a batch of 2 and of 1 (one RNG stream)
                torch.testing.assert_close(outs[0].study_losses[0], outs[1].study_losses[0])
                continue
            for out in outs[1:]:
                torch.testing.assert_close(out.study_losses[0], outs[0].study_losses[0], rtol=1e-5, atol=1e-6)
        # an unknown label adds 0 to its term and leaves the divisor at B: the term halves in a batch of 2
        vl = [model(b, stage="vl") for b in (other, alone)]
    for term in ("report", "segmentation", "malignancy", "lung_rads", "growth", "grounding"):
        assert vl[0].losses[term] == pytest.approx(vl[1].losses[term] / 2, rel=1e-4), term


def test_mention_regions_mark_nodule_and_lobe_tokens(tok) -> None:
    regions = mention_regions(tok, [TEXTS[0]], 40)
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    marked = [tok.decode([ids[i - 1]]).strip() for i in range(1, 40) if i - 1 < len(ids) and regions[0, i] >= 0]
    joined = "".join(marked).lower()
    assert "nodule" in joined and "upper" in joined and "spiculated" in joined
    assert set(regions[0].tolist()) >= {-1, 0, 1}  # nodule region 0 and RUL = 1


def test_a_few_steps_reduce_every_loss(tok) -> None:
    torch.manual_seed(0)
    model = LungVLModel(SMALL, tok)
    batch = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first, last = None, None
    for _ in range(25):
        out = model(batch, stage="vl")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or out.losses
        last = out.losses
    for k in ("report", "segmentation", "malignancy", "lung_rads", "concepts", "grounding"):
        assert last[k] < first[k], (k, first[k], last[k])
    g = torch.Generator().manual_seed(0)
    ssl0 = model(batch, stage="ssl", generator=g).loss.item()
    for _ in range(10):
        out = model(batch, stage="ssl", generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert model(batch, stage="ssl", generator=torch.Generator().manual_seed(0)).loss.item() < ssl0


def test_checkpoint_round_trip_and_tamper(tok, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = LungVLModel(SMALL, tok).eval()
    save_checkpoint(tmp_path / "ck", model, {"stage": "seg"})
    back, meta = load_checkpoint(tmp_path / "ck")
    back.eval()
    batch = make_batch()
    with torch.no_grad():
        a = model(batch, stage="seg").seg_logits
        b = back(batch, stage="seg").seg_logits
    torch.testing.assert_close(a, b)
    assert meta["stage"] == "seg" and meta["parameters"]["total"] > 0
    (tmp_path / "ck" / "model.pt").write_bytes((tmp_path / "ck" / "model.pt").read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")

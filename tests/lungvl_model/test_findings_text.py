"""The findings stage: public attribute → sentence pairs, the bank trick, decoder + slots only, heads carried."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lungvl_model.data.site_layout import LOBES
from lungvl_model.data.synth import SynthConfig, generate_site
from lungvl_model.data.targets import MAX_SLOTS, NODULE_ATTRIBUTES
from lungvl_model.models.slots import masked_average
from lungvl_model.text.labeler import label_report
from lungvl_model.training import findings_text
from lungvl_model.training.checkpoint import load_checkpoint
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.findings_text import (
    NO_MASK_PROB,
    StudyBank,
    _slot_inputs,
    findings_examples,
    run_findings_text,
    slot_text,
)
from lungvl_model.training.stages import CARRIED_FILES, run_stage

from ..conftest import micro_checkpoint

COL_D, COL_L = NODULE_ATTRIBUTES.index("log_diameter"), NODULE_ATTRIBUTES.index("lobe")


def test_examples_state_their_slot_attributes() -> None:
    ex = findings_examples(40, seed=3)
    kinds = {e.sequence.kind for e in ex}
    assert kinds == {"finding", "negative", "impression"}
    n = lobe_ok = size_ok = 0
    for e in ex:
        assert e.attributes.shape == (MAX_SLOTS, len(NODULE_ATTRIBUTES)) and e.valid.shape == (MAX_SLOTS,)
        n_valid = int(e.valid.sum())
        if e.sequence.kind == "negative":
            assert n_valid == 0 and e.sequence.slots == (MAX_SLOTS,)  # the "no finding" slot
        elif e.sequence.kind == "impression":
            assert e.sequence.slots == (tuple(range(n_valid)) or (MAX_SLOTS,))
        else:
            k = e.sequence.finding
            assert k is not None and e.sequence.slots == (k,) and bool(e.valid[k])
            nods = label_report(f"FINDINGS: {e.sequence.text}").nodules
            lobe = LOBES[int(e.attributes[k, COL_L])]
            diam = math.expm1(float(e.attributes[k, COL_D]))
            n += 1
            lobe_ok += bool(nods) and nods[0].lobe == {"lingula": "LUL"}.get(lobe, lobe)
            size_ok += bool(nods) and nods[0].size_mm is not None and abs(nods[0].size_mm - diam) <= 0.25 * diam
    assert not any("emphysema" in e.sequence.text.lower() for e in ex)  # no slot attribute says it
    # the targets name their own slot's lobe and size (stated sizes are longest x short axis: within 25 %)
    assert n >= 30 and lobe_ok == n and size_ok == n
    negatives = [e.sequence for e in findings_examples(40, seed=3, kinds=("negative",))]
    assert negatives == [e.sequence for e in ex if e.sequence.kind == "negative"] and negatives
    with pytest.raises(ValueError, match="report"):
        findings_examples(2, seed=0, kinds=("report",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1. 5 mm solid nodule in the RLL.\n2. Centrilobular emphysema.\n3. Lung-RADS 2: benign appearance.",
         "1. 5 mm solid nodule in the RLL.\n2. Lung-RADS 2: benign appearance."),
        ("1. No suspicious pulmonary nodules.\n2. Lung-RADS 1: negative.",
         "1. No suspicious pulmonary nodules.\n2. Lung-RADS 1: negative."),
        ("A 6 mm nodule in the LUL. Mild emphysema is present. No effusion.", "A 6 mm nodule in the LUL. No effusion."),
        ("1. Paraseptal emphysema.", ""),
    ],
)  # fmt: skip
def test_slot_text_drops_what_no_slot_says(text: str, expected: str) -> None:
    assert slot_text(text) == expected


def test_slot_inputs_pool_a_bank_vector_or_nothing() -> None:
    c, n_tok, e_dim = 5, 7, 4
    bank = StudyBank(torch.randn(3, n_tok, e_dim), torch.randn(11, c))
    ex = findings_examples(6, seed=1)[:4]
    feats, masks, vt = _slot_inputs(ex, bank, random.Random(0))
    assert feats.shape == (4, c, 1, 1, MAX_SLOTS) and masks.shape == (4, MAX_SLOTS, 1, 1, MAX_SLOTS)
    assert vt.shape == (4, n_tok, e_dim)
    assert all(any(torch.equal(v, b) for b in bank.visual_tokens) for v in vt)
    pooled, has = masked_average(feats, masks)
    for i in range(4):
        for k in range(MAX_SLOTS):
            if has[i, k]:  # slot k pools exactly one bank vector
                assert any(torch.allclose(pooled[i, k], f) for f in bank.features)
            else:
                assert torch.all(pooled[i, k] == 0)
    many = [ex[0]] * 200
    _, masks, _ = _slot_inputs(many, bank, random.Random(1))
    dropped = 1.0 - float(masks.sum()) / (200 * MAX_SLOTS)
    assert abs(dropped - NO_MASK_PROB) < 0.05


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fsite") / "site"
    generate_site(SynthConfig(cohort="referral", n_studies=2, out_dir=d, seed=4, matrix=64, z_extent_mm=120.0))
    return d


def test_findings_stage_trains_decoder_and_slots_only_and_carries_heads(
    site: Path, tmp_path: Path, one_thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(findings_text, "HELD_OUT_REPORTS", 12)
    init = micro_checkpoint(tmp_path / "init", stage="vl")
    (init / "candidate_filter.json").write_text('{"kind": "test"}')
    before, _ = load_checkpoint(init)
    with pytest.raises(ValueError, match="--init"):
        run_stage([site], tmp_path / "x", TrainConfig(stage="findings", max_steps=1, device="cpu"), log=lambda m: None)
    run = run_stage(
        [site], tmp_path / "out",
        TrainConfig(stage="findings", max_steps=3, batch_size=4, device="cpu"), init=init, log=lambda m: None,
    )  # fmt: skip
    after, meta = load_checkpoint(run.checkpoint)
    assert meta["history_stages"][-1] == "findings" and meta["steps"] == 3
    assert (run.checkpoint / "candidate_filter.json").read_text() == '{"kind": "test"}'
    assert "candidate_filter.json" in CARRIED_FILES and not (run.checkpoint / "nodule_risk.pt").exists()
    sb, sa = before.state_dict(), after.state_dict()
    changed = {k.split(".")[0] for k in sb if not torch.equal(sb[k], sa[k])}
    assert changed == {"decoder", "slots"}
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]
    for k in ("before_lobe_agreement", "after_lobe_agreement", "after_size_agreement"):
        assert 0.0 <= summary[k] <= 1.0
    assert summary["after_finding_sentences"] >= 8
    assert (tmp_path / "out" / "loss_curve.png").exists()


def test_findings_training_lowers_the_sentence_loss(site: Path, tmp_path: Path, one_thread) -> None:
    from lungvl_model.data.dataset import SiteDataset

    model, _ = load_checkpoint(micro_checkpoint(tmp_path / "m"))
    ds = SiteDataset([site], model.config.input)
    res, _ = run_findings_text(
        model, ds, TrainConfig(stage="findings", max_steps=60, batch_size=8, lr=3e-3, warmup_steps=2, device="cpu"),
        n_reports=60, held_out_reports=0, log=lambda m: None,
    )  # fmt: skip
    first = sum(h["loss"] for h in res.history[:5]) / 5
    last = sum(h["loss"] for h in res.history[-5:]) / 5
    assert last < 0.7 * first

"""Text-only warm-up: corruptions for the coherence task, the head, and a tiny training run."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lungvl_model.models import report_pretrain
from lungvl_model.models.config import TextConfig
from lungvl_model.models.decoder import ReportDecoder
from lungvl_model.models.report_pretrain import (
    CoherenceHead,
    coherence_pairs,
    corrupt_report,
    pretrain_reports,
    report_corpus,
    report_lm_loss,
)
from lungvl_model.text.tokenizer import split_sentences, train_tokenizer

CFG = TextConfig(n_layer=1, n_head=2, n_embd=32, n_positions=96, dropout=0.0)


def synthetic_reports(n: int, seed: int = 0) -> list[str]:
    """Short structured screening reports: nodule, margins, emphysema, Lung-RADS from the size."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        size = r.choice([4, 5, 6, 7, 8, 9, 12, 15])
        lobe = r.choice(["right upper", "right middle", "right lower", "left upper", "left lower"])
        kind = r.choice(["solid", "part-solid", "ground-glass"])
        cat = "2" if size < 6 else ("3" if size < 8 else "4A")
        out.append(
            f"FINDINGS: There is a {size} mm {kind} nodule in the {lobe} lobe. "
            f"The margins are {r.choice(['smooth', 'lobulated', 'spiculated'])}. "
            f"{r.choice(['No emphysema.', 'Mild emphysema.'])} IMPRESSION: Lung-RADS {cat}."
        )
    return out


REPORTS = synthetic_reports(40)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(REPORTS, vocab_size=300)


def test_corrupt_report_swap_and_insert():
    text = "A 6 mm nodule. Margins smooth.\nLung-RADS 2."
    swaps, inserts = 0, 0
    rng = random.Random(0)
    for _ in range(40):
        bad = corrupt_report(text, ["Mild emphysema. No effusion."], rng)
        assert bad is not None and bad != text
        got, orig = split_sentences(bad), split_sentences(text)
        if sorted(got) == sorted(orig):
            swaps += 1
            assert "\n" in bad  # layout kept, only the sentences moved
        else:
            inserts += 1
            assert len(got) == len(orig) + 1 and set(orig) <= set(got)
            assert set(got) - set(orig) <= {"Mild emphysema.", "No effusion."}
    assert swaps and inserts
    assert corrupt_report("Only one sentence.", [], rng) is None
    assert corrupt_report("Same. Same.", ["Same."], rng) is None  # nothing can change the text


def test_coherence_pairs_labels():
    rows, labels = coherence_pairs(REPORTS[:5], random.Random(1))
    assert labels == [1, 0] * 5
    assert rows[0::2] == REPORTS[:5] and all(a != b for a, b in zip(rows[0::2], rows[1::2], strict=True))


@pytest.mark.parametrize("pooling", ["last", "mean", "both"])
def test_coherence_head_shape(pooling):
    head = CoherenceHead(8, pooling)
    hidden, mask = torch.randn(3, 5, 8), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4])
    assert head(hidden, mask).shape == (3,)


def test_invalid_args(tok):
    with pytest.raises(ValueError, match="pooling"):
        CoherenceHead(8, "max")
    dec = ReportDecoder(CFG, tok)
    with pytest.raises(ValueError, match="at least 2"):
        pretrain_reports(REPORTS[:1], tok, dec, steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_reports(REPORTS, tok, dec, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="eval_size=-1"):
        pretrain_reports(REPORTS, tok, dec, steps=1, eval_size=-1)
    with pytest.raises(ValueError, match="batch_size"):
        report_lm_loss(dec, tok, REPORTS, batch_size=0)
    # only FINDINGS + IMPRESSION are learned: reports with header lines alone leave nothing to train on
    headers_only = ["TECHNIQUE: 1 mm slices.\nCOMPARISON: None.", "CLINICAL INDICATION: 62-year-old male."]
    with pytest.raises(ValueError, match="at least 2 non-empty reports, got 0"):
        pretrain_reports(headers_only, tok, dec, steps=1)


def test_pretrain_lowers_loss_and_learns_coherence(tok):
    torch.manual_seed(123)
    dec = ReportDecoder(CFG, tok)
    seen: list[int] = []
    m = pretrain_reports(REPORTS, tok, dec, steps=30, batch_size=8, lr=3e-3, seed=0,
                         progress=lambda step, metrics: seen.append(step))  # fmt: skip
    assert seen == list(range(30))
    assert m["final_lm_loss"] < m["initial_lm_loss"] - 1.0
    assert m["perplexity"] < m["initial_perplexity"]
    assert m["coherence_accuracy"] > 0.6 and m["train_coherence_accuracy"] > 0.55
    assert dec.training  # mode restored


def test_pretrain_is_deterministic(tok):
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        dec = ReportDecoder(CFG, tok)
        rng_state = torch.get_rng_state()
        m = pretrain_reports(REPORTS[:10], tok, dec, steps=3, batch_size=4, seed=5, eval_size=4)
        assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone
        runs.append((m, [p.detach().clone() for p in dec.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_eval_size_zero_skips_the_evaluation_and_trains_the_same(tok, monkeypatch):
    """``eval_size=0``: no before/after scoring (NaN metrics), the same training as with an evaluation."""
    calls: list[int] = []
    real = report_pretrain._evaluate
    monkeypatch.setattr(report_pretrain, "_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for eval_size in (4, 0):
        torch.manual_seed(3)
        dec = ReportDecoder(CFG, tok)
        calls.clear()
        m = pretrain_reports(REPORTS[:10], tok, dec, steps=2, batch_size=4, seed=1, eval_size=eval_size)
        assert len(calls) == (2 if eval_size else 0)
        runs.append((m, [p.detach().clone() for p in dec.parameters()]))
    (with_eval, w_eval), (without, w_none) = runs
    assert all(torch.equal(a, b) for a, b in zip(w_eval, w_none, strict=True))
    for key in ("initial_lm_loss", "final_lm_loss", "perplexity", "coherence_accuracy"):
        assert math.isfinite(with_eval[key]) and math.isnan(without[key])
    assert without["train_coherence_accuracy"] == with_eval["train_coherence_accuracy"]


def test_report_lm_loss_is_token_weighted_and_batch_size_free(tok):
    torch.manual_seed(0)
    dec = ReportDecoder(CFG, tok)
    dec.train()
    texts = report_corpus(["", "  ", *REPORTS[:5]])
    assert len(texts) == 5  # blank reports are dropped
    one, five = report_lm_loss(dec, tok, texts, batch_size=1), report_lm_loss(dec, tok, texts, batch_size=5)
    assert one == pytest.approx(five, rel=1e-5) and 0 < one < 2 * math.log(len(tok))
    assert dec.training  # mode restored
    assert report_lm_loss(dec, tok, [], batch_size=2) == 0.0
    # what pretrain_reports reports as its LM loss on the same reports
    m = pretrain_reports(texts, tok, dec, steps=0, batch_size=2, eval_size=5)
    assert m["initial_lm_loss"] == pytest.approx(one, rel=1e-5)

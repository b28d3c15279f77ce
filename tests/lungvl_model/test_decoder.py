"""Report decoder: shapes, eager/sdpa switching, cross-attention, generation, save/load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lungvl_model.models.config import TextConfig
from lungvl_model.models.decoder import (
    ReportDecoder,
    attention_implementation,
    build_decoder,
    causal_lm_loss,
    no_repeat_ngram_bans,
    set_attention_implementation,
)
from lungvl_model.text.tokenizer import encode_reports, load_tokenizer, save_tokenizer, train_tokenizer

REPORTS = [
    "There is a 6 mm solid nodule in the right upper lobe. Lung-RADS 2.",
    "A 12 x 8 mm part-solid nodule in the left lower lobe. Lung-RADS 4A.",
    "No pulmonary nodule. Mild emphysema. Lung-RADS 1.",
] * 3
CFG = TextConfig(n_layer=2, n_head=4, n_embd=32, n_positions=64, dropout=0.0)
N_VIS = 6


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(REPORTS, vocab_size=300)


@pytest.fixture
def decoder(tok):
    torch.manual_seed(0)
    return ReportDecoder(CFG, tok).eval()


@pytest.fixture(scope="module")
def batch(tok):
    enc = encode_reports(tok, REPORTS[:2], max_length=64)
    return enc, torch.randn(2, N_VIS, CFG.n_embd, generator=torch.Generator().manual_seed(1))


def test_build_decoder_sizes(tok):
    lm = build_decoder(CFG, tok)
    assert lm.config.vocab_size == len(tok) and lm.config.n_embd == 32 and lm.config.n_layer == 2
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (1, 2, 0)
    assert all(hasattr(block, "crossattention") for block in lm.transformer.h)
    assert lm.config._attn_implementation == "sdpa"
    eager = build_decoder(replace(CFG, attn_implementation="eager"), tok)
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("with_visual", [False, True])
def test_forward_shapes_and_loss(decoder, batch, tok, with_visual):
    enc, vis = batch
    out = decoder(enc["input_ids"], enc["attention_mask"], vis if with_visual else None, labels=enc["labels"])
    b, t = enc["input_ids"].shape
    assert out.logits.shape == (b, t, len(tok)) and out.last_hidden.shape == (b, t, CFG.n_embd)
    assert out.cross_attentions is None and out.loss is not None and out.loss.ndim == 0
    ref = decoder.lm(
        enc["input_ids"], attention_mask=enc["attention_mask"],
        encoder_hidden_states=vis if with_visual else None, labels=enc["labels"],
    ).loss  # fmt: skip
    torch.testing.assert_close(out.loss, ref)


def test_text_only_skips_cross_attention(decoder, batch):
    enc, vis = batch
    text_only = decoder(enc["input_ids"], enc["attention_mask"]).logits
    with_vis = decoder(enc["input_ids"], enc["attention_mask"], vis).logits
    with torch.no_grad():
        for block in decoder.lm.transformer.h:
            block.crossattention.c_proj.weight.add_(1.0)
    torch.testing.assert_close(decoder(enc["input_ids"], enc["attention_mask"]).logits, text_only)
    assert not torch.allclose(decoder(enc["input_ids"], enc["attention_mask"], vis).logits, with_vis)


def test_eager_sdpa_switching(decoder, batch):
    enc, vis = batch
    args = (enc["input_ids"], enc["attention_mask"], vis)
    sdpa = decoder(*args, output_attentions=True)
    assert sdpa.cross_attentions is None
    assert set_attention_implementation(decoder, "eager") == "sdpa"
    eager = decoder(*args, output_attentions=True)
    assert eager.cross_attentions is not None and len(eager.cross_attentions) == CFG.n_layer
    b, t = enc["input_ids"].shape
    for att in eager.cross_attentions:
        assert att.shape == (b, CFG.n_head, t, N_VIS)
        torch.testing.assert_close(att.sum(-1), torch.ones(b, CFG.n_head, t))
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-4)
    assert decoder(*args).cross_attentions is None  # not asked for
    set_attention_implementation(decoder, "sdpa")
    assert decoder(*args, output_attentions=True).cross_attentions is None
    with attention_implementation(decoder, "eager"):
        assert decoder(*args, output_attentions=True).cross_attentions is not None
    assert decoder.lm.config._attn_implementation == "sdpa"


def test_text_embedding_ignores_padding(decoder, tok):
    one = encode_reports(tok, REPORTS[:1], 64)
    padded = encode_reports(tok, REPORTS[:1], 64, pad_to_max_length=True)
    for pooling in ("mean", "last"):
        e1 = decoder.text_embedding(one["input_ids"], one["attention_mask"], pooling)
        e2 = decoder.text_embedding(padded["input_ids"], padded["attention_mask"], pooling)
        assert e1.shape == (1, CFG.n_embd)
        torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-4)


def test_generate_greedy_consistent_with_forward(decoder, batch):
    _, vis = batch
    decoder.train()
    # loop protection off: every choice is then the argmax of the model's own distribution
    gen = decoder.generate(vis, max_new_tokens=12, no_repeat_ngram=0, stop_repeated_sentence=False)
    assert decoder.training and decoder.lm.config._attn_implementation == "sdpa"  # both restored
    b, t = gen.tokens.shape
    assert b == 2 and 1 <= t <= 12
    assert gen.token_probs.shape == gen.entropy.shape == gen.mask.shape == (b, t)
    assert gen.cross_attention.shape == (b, t, N_VIS) and gen.finished.shape == (b,)
    m = gen.mask
    torch.testing.assert_close(gen.cross_attention.sum(-1)[m], torch.ones(int(m.sum())))
    assert (gen.entropy >= 0).all() and (gen.token_probs > 0).all() and (gen.token_probs <= 1).all()
    # a teacher-forced eager pass over <bos> + tokens gives the same choices, probabilities and attention
    decoder.eval()
    ids = torch.cat([torch.full((b, 1), decoder.bos_id), gen.tokens], 1)
    with torch.no_grad(), attention_implementation(decoder, "eager"):
        out = decoder(ids, visual_tokens=vis, output_attentions=True)
    logp = out.logits[:, :-1].log_softmax(-1)
    assert torch.equal(logp.argmax(-1)[m], gen.tokens[m])
    torch.testing.assert_close(logp.gather(2, gen.tokens[..., None])[..., 0].exp()[m], gen.token_probs[m])
    entropy = -(logp.exp() * logp).sum(-1)  # the predictive entropy at each generated step
    torch.testing.assert_close(entropy[m], gen.entropy[m], atol=1e-4, rtol=1e-4)
    assert (gen.entropy[m] > 0.1).all()  # an untrained decoder is far from certain
    att = torch.stack(out.cross_attentions).mean(dim=(0, 2))[:, :-1]  # the query that chose each token
    torch.testing.assert_close(att[m], gen.cross_attention[m], atol=1e-5, rtol=1e-4)


def test_generate_sampling_and_eos(decoder, batch):
    _, vis = batch
    kw = {"max_new_tokens": 10, "temperature": 1.0, "top_k": 5}
    g1 = decoder.generate(vis, generator=torch.Generator().manual_seed(3), **kw)
    g2 = decoder.generate(vis, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(g1.tokens, g2.tokens)
    # call the first greedy token of row 0 <eos>: row 0 stops at once, the rest of it is padding
    first = int(decoder.generate(vis, max_new_tokens=1).tokens[0, 0])
    g3 = decoder.generate(vis, max_new_tokens=10, eos_id=first)
    assert bool(g3.finished[0]) and g3.mask[0, 0] and not g3.mask[0, 1:].any()
    assert g3.tokens.shape[1] == 10 or g3.finished.all()
    assert (g3.tokens[0, 1:] == decoder.pad_id).all() and (g3.entropy[0, 1:] == 0).all()
    assert (g3.token_probs[0, 1:] == 1).all() and (g3.cross_attention[0, 1:] == 0).all()
    text = decoder.generate(None, max_new_tokens=4, batch_size=3)
    assert text.tokens.shape[0] == 3 and text.cross_attention.shape == (3, text.tokens.shape[1], 0)


def test_save_load_identical_logits(decoder, tok, batch, tmp_path):
    enc, vis = batch
    save_tokenizer(tok, tmp_path)
    decoder.save_pretrained(tmp_path)
    loaded = ReportDecoder(replace(CFG, pretrained_dir=str(tmp_path)), load_tokenizer(tmp_path)).eval()
    for v in (None, vis):
        got = loaded(enc["input_ids"], enc["attention_mask"], v).logits
        want = decoder(enc["input_ids"], enc["attention_mask"], v).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="n_embd"):
        ReportDecoder(replace(CFG, n_embd=64, pretrained_dir=str(tmp_path)), tok)


def test_causal_lm_loss_reductions():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    per_tok = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                                ignore_index=-100, reduction="none").view(2, 3)  # fmt: skip
    torch.testing.assert_close(causal_lm_loss(logits, labels), per_tok.sum() / 3)
    torch.testing.assert_close(causal_lm_loss(logits, labels, "sum"), per_tok.sum())
    per_seq = torch.stack([per_tok[0, :2].mean(), per_tok[1, 0]])
    torch.testing.assert_close(causal_lm_loss(logits, labels, "none"), per_seq)


def test_invalid_args(decoder, batch):
    enc, vis = batch
    with pytest.raises(ValueError, match="attention implementation"):
        set_attention_implementation(decoder, "flash")
    with pytest.raises(ValueError, match="visual_tokens"):
        decoder(enc["input_ids"], enc["attention_mask"], vis[..., :8])
    with pytest.raises(ValueError, match="n_positions"):
        decoder(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(vis, max_new_tokens=64)
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), "max")


def test_no_repeat_ngram_bans():
    # trigram blocking: the last two ids (5, 6) were followed by 7 and by 9 before
    assert no_repeat_ngram_bans([5, 6, 7, 1, 5, 6, 9, 5, 6], 3) == [7, 9]
    assert no_repeat_ngram_bans([5, 6, 7], 3) == []  # (6, 7) never seen before
    assert no_repeat_ngram_bans([4], 3) == []  # too short for a trigram
    assert no_repeat_ngram_bans([3, 1, 3], 1) == [1, 3]
    assert no_repeat_ngram_bans([2, 2], 2) == [2]
    with pytest.raises(ValueError, match="n must be >= 1"):
        no_repeat_ngram_bans([1], 0)


def _biased(decoder, tok, text, values):
    """Add an LM-head bias that makes the tokens of ``text`` win whatever the context."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bias = torch.zeros(decoder.vocab_size)
    for i, v in zip(ids, values, strict=True):
        bias[i] = v
    decoder.lm.lm_head.bias = torch.nn.Parameter(bias)
    return ids


def test_generate_breaks_token_loops(decoder, tok, batch):
    _, vis = batch
    ids = _biased(decoder, tok, " 2.", (40.0, 39.0, 38.0))
    loop = decoder.generate(vis, max_new_tokens=20, no_repeat_ngram=0, stop_repeated_sentence=False)
    assert (loop.tokens == ids[0]).all()  # unprotected greedy decoding repeats one token for ever
    gen = decoder.generate(vis, max_new_tokens=20, stop_repeated_sentence=False)
    for r in range(gen.tokens.shape[0]):
        row = gen.tokens[r][gen.mask[r]].tolist()
        grams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams)), row  # no trigram twice
        assert len(set(row)) > 2


def test_generate_stops_on_repeated_sentence(decoder, tok, batch):
    _, vis = batch
    (dot,) = _biased(decoder, tok, ".", (40.0,))
    loop = decoder.generate(vis, max_new_tokens=10, no_repeat_ngram=0, stop_repeated_sentence=False)
    assert (loop.tokens == dot).all() and loop.mask.all()
    gen = decoder.generate(vis, max_new_tokens=10)
    # sentence "." then "." again: a sentence end is decided at the next token (it may be a decimal point), so
    # the row stops one token later; the repeat and that token are masked out
    assert gen.tokens.shape[1] == 3 and gen.repeat_stopped.all() and not gen.finished.any()
    assert gen.mask[:, 0].all() and not gen.mask[:, 1:].any()
    assert (gen.tokens[:, 0] == dot).all() and (gen.tokens[:, 1:] == decoder.pad_id).all()
    assert (gen.entropy[:, 1:] == 0).all() and (gen.cross_attention[:, 1:] == 0).all()


def test_a_list_number_before_a_decimal_size_is_no_repeated_sentence(decoder, tok, batch):
    _, vis = batch
    forced = tok("1. 1.4 cm. 2. 2.5 cm.", add_special_tokens=False)["input_ids"]
    n = len(forced)
    gen = decoder.generate(vis[:1], max_new_tokens=n + 2, forced=[forced])
    assert gen.tokens[0, :n].tolist() == forced and gen.mask[0, :n].all() and not gen.repeat_stopped.any()
    # a real repeat after a number is still caught: "1. 1." stops at the second "1."
    looped = tok("1. 1. 2", add_special_tokens=False)["input_ids"]
    gen = decoder.generate(vis[:1], max_new_tokens=len(looped) + 2, forced=[looped])
    assert gen.repeat_stopped.all() and gen.mask[0, :2].all() and not gen.mask[0, 2:].any()


def test_prefix_conditions_the_first_token_and_generation(decoder, batch):
    enc, vis = batch
    ids, am = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        plain = decoder(ids, am, vis).logits
        zero = decoder(ids, am, vis, prefix=torch.zeros(2, CFG.n_embd)).logits
        moved = decoder(ids, am, vis, prefix=torch.randn(2, CFG.n_embd, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(zero, plain)  # a zero prefix is no prefix (same positions, same embeddings)
    assert (moved.logits - plain).abs().amax(-1).gt(1e-4).all()  # every later position sees the prefix
    prefix = torch.randn(2, CFG.n_embd, generator=torch.Generator().manual_seed(6))
    gen = decoder.generate(vis, max_new_tokens=8, prefix=prefix, no_repeat_ngram=0, stop_repeated_sentence=False)
    full = torch.cat([torch.full((2, 1), decoder.bos_id), gen.tokens], 1)
    with torch.no_grad():
        logits = decoder(full, visual_tokens=vis, prefix=prefix).logits
    m = gen.mask
    assert torch.equal(logits[:, :-1].argmax(-1)[m], gen.tokens[m])  # generation used the same prefix
    with pytest.raises(ValueError, match="prefix must be"):
        decoder(ids, am, vis, prefix=torch.zeros(1, CFG.n_embd))


def test_generate_forced_ids_then_greedy_continuation(decoder, tok, batch):
    _, vis = batch
    start = tok("A 12 x 8 mm", add_special_tokens=False)["input_ids"]
    gen = decoder.generate(vis, max_new_tokens=12, forced=[start, start[:2]], no_repeat_ngram=0,
                           stop_repeated_sentence=False)  # fmt: skip
    assert gen.tokens[0, : len(start)].tolist() == start and gen.tokens[1, :2].tolist() == start[:2]
    # the forced tokens keep the model's own probabilities; after them every token is the argmax
    ids = torch.cat([torch.full((2, 1), decoder.bos_id), gen.tokens], 1)
    with torch.no_grad(), attention_implementation(decoder, "eager"):
        logp = decoder(ids, visual_tokens=vis).logits[:, :-1].log_softmax(-1)
    m = gen.mask
    torch.testing.assert_close(logp.gather(2, gen.tokens[..., None])[..., 0].exp()[m], gen.token_probs[m])
    free = torch.zeros_like(m)
    free[0, len(start) :], free[1, 2:] = True, True
    assert torch.equal(logp.argmax(-1)[m & free], gen.tokens[m & free])
    assert not torch.equal(logp.argmax(-1)[0, : len(start)], gen.tokens[0, : len(start)])  # really forced
    with pytest.raises(ValueError, match="one list of ids"):
        decoder.generate(vis, max_new_tokens=12, forced=[start])
    with pytest.raises(ValueError, match="one list of ids"):
        decoder.generate(vis, max_new_tokens=12, forced=[[10**6], []])
    with pytest.raises(ValueError, match="exceed max_new_tokens=2"):
        decoder.generate(vis, max_new_tokens=2, forced=[start, []])

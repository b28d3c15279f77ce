"""Report tokenizer: lossless round trip with numbers, LM encoding, radiology-aware sentences and spans."""

from __future__ import annotations

import pytest
import torch

from lungvl_model.text.tokenizer import (
    SPECIAL_TOKENS,
    encode_reports,
    load_tokenizer,
    save_tokenizer,
    sentence_offsets,
    sentence_spans_from_ids,
    sentence_token_spans,
    split_sentences,
    train_tokenizer,
)

CORPUS = [
    "There is a 6.5 mm solid nodule in the right upper lobe. Lung-RADS 4A.",
    "A 12 x 8 mm part-solid nodule, approx. 10 mm mean diameter, is new vs. 2023. Recommend PET/CT.",
    "IMPRESSION: 1. Spiculated 1.2 cm nodule in the RUL. 2. Mild centrilobular emphysema.",
    "FINDINGS:\nNo pulmonary nodule.\n\nIMPRESSION:\nLung-RADS 1. Annual screening in 12 months.",
    "Stable 4 mm calcified granuloma (e.g. prior infection), unchanged since 2019. Lung-RADS 2.",
] * 4
ROUND_TRIP = [
    "A 6.5 mm nodule measuring 12 x 8 mm. Lung-RADS 4A.",
    "Lung-RADS 4X: 23 mm spiculated mass, RUL; volume 1234.5 mm3 (±10%).",
    "IMPRESSION:\n  1. New 7 mm ground-glass nodule.\n\n2. No effusion.  ",
    "unseen words: bronchiectasis 0.75 cm, PI-RADS 3, 2025-01-31.",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_digits(tok):
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token, tok.sep_token) == SPECIAL_TOKENS
    pieces = tok.convert_ids_to_tokens(tok("nodule 12 x 8 mm, 4A", add_special_tokens=False)["input_ids"])
    assert pieces[-2:] == ["Ġ4", "A"]
    i = pieces.index("Ġ1")
    assert pieces[i : i + 4] == ["Ġ1", "2", "Ġx", "Ġ8"]  # one digit per token, the space goes with the first


def test_lowercase_option():
    tok = train_tokenizer(CORPUS, vocab_size=300, lowercase=True)
    text = "Lung-RADS 4A. RUL nodule."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text.lower()


def test_save_load(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    tok2 = load_tokenizer(tmp_path / "tok")
    for text in ROUND_TRIP:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]
        assert tok2.decode(tok2(text)["input_ids"], skip_special_tokens=True) == text
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (1, 2, 0)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_encode_reports_padding_and_truncation(tok):
    texts = ["Lung-RADS 2.", "A 6 mm solid nodule in the right upper lobe."]
    enc = encode_reports(tok, texts, max_length=64)
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    short = int(mask[0].sum())
    assert ids[0, 0] == tok.bos_token_id and ids[0, short - 1] == tok.eos_token_id
    assert (ids[0, short:] == tok.pad_token_id).all() and (labels[0, short:] == -100).all()
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert mask[1].all()  # the longest row is not padded
    cut = encode_reports(tok, texts, max_length=5)
    assert cut["input_ids"].shape == (2, 5) and tok.eos_token_id not in cut["input_ids"][1].tolist()
    assert encode_reports(tok, texts, 40, pad_to_max_length=True)["input_ids"].shape == (2, 40)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A 1.2 cm nodule. No effusion.", ["A 1.2 cm nodule.", "No effusion."]),
        ("Nodule approx. 5 mm in size. Stable.", ["Nodule approx. 5 mm in size.", "Stable."]),
        ("Likely benign, e.g. a granuloma. New vs. 2023 study.",
         ["Likely benign, e.g. a granuloma.", "New vs. 2023 study."]),
        ("IMPRESSION: 1. Nodule in the RUL. 2. Emphysema.",
         ["IMPRESSION: 1. Nodule in the RUL.", "2. Emphysema."]),
        ("Mass in the LUL. Lung-RADS 4B!  Biopsy?", ["Mass in the LUL.", "Lung-RADS 4B!", "Biopsy?"]),
        ("FINDINGS:\nClear lungs\n\nIMPRESSION: Normal", ["FINDINGS:\nClear lungs", "IMPRESSION: Normal"]),
        ("Nodules:\n- RUL 4 mm\n- LLL 3 mm", ["Nodules:", "- RUL 4 mm", "- LLL 3 mm"]),
        ("no nodule. lung-rads 1.", ["no nodule.", "lung-rads 1."]),
        ("", []),
    ],
)  # fmt: skip
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected
    assert [text[s:e] for s, e in sentence_offsets(text)] == expected


@pytest.mark.parametrize("text", [*ROUND_TRIP, CORPUS[3]])
def test_sentence_token_spans_cover_ids(tok, text):
    ids = tok(text)["input_ids"]
    spans = sentence_token_spans(tok, text)
    sentences = split_sentences(text)
    assert len(spans) == len(sentences)
    assert spans[0][0] == 1 and spans[-1][1] == len(ids) - 1  # everything between <bos> and <eos>
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    for (a, b), sentence in zip(spans, sentences, strict=True):
        assert tok.decode(ids[a:b]).strip() == sentence


def test_sentence_spans_from_ids_non_canonical(tok):
    text = "A 6.5 mm nodule ± 1 mm. Lung-RADS 3."
    canonical = tok(text)["input_ids"]
    got_text, sents, spans = sentence_spans_from_ids(tok, torch.tensor(canonical))
    assert got_text == text and spans == sentence_token_spans(tok, text)
    # one id per byte: not what encode gives, but a sequence a sampler may write
    chars = [c for t in tok.convert_ids_to_tokens(canonical[1:-1]) for c in t]
    ids = [tok.bos_token_id, *tok.convert_tokens_to_ids(chars), tok.eos_token_id, tok.pad_token_id]
    got_text, sents, spans = sentence_spans_from_ids(tok, ids)
    assert got_text == text and [got_text[s:e] for s, e in sents] == split_sentences(text)
    assert spans[0][0] == 1 and spans[-1][1] == len(ids) - 2
    assert [tok.decode(ids[a:b]).strip() for a, b in spans] == split_sentences(text)


def test_invalid_args(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer(["", "  "])
    with pytest.raises(ValueError, match="max_length"):
        encode_reports(tok, ["x"], max_length=1)

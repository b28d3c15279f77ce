"""Report tokenizer and radiology-aware sentence splitting.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the site's report corpus and wrapped in a
``transformers`` fast tokenizer. Byte-level BPE is lossless: ``decode(encode(text)) == text`` for any
text (spacing, "6.5", "12 x 8 mm", "4A", "Lung-RADS", "±" included) and no ``<unk>`` is ever produced.
Digits are split one by one (with their leading space: " 1", "2"), so that any measurement can be written
by the decoder and sizes generalise across numbers.

Sentences are the unit of per-sentence confidence: :func:`sentence_offsets` gives their character spans,
:func:`sentence_token_spans` and :func:`sentence_spans_from_ids` the token ranges that cover them.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, SEP)
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet + the special tokens


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 2000, min_frequency: int = 2, lowercase: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on report texts.

    Args:
        texts: the report corpus.
        vocab_size: target vocabulary size, special tokens included (the result may be smaller when the
            corpus has fewer merges to offer).
        min_frequency: minimal pair count for a merge.
        lowercase: lowercase before tokenizing. Off by default: case carries meaning in reports ("4A",
            "RUL", "Lung-RADS") and decoding is then an exact round trip.

    Returns:
        A fast tokenizer with ``<pad> <bos> <eos> <unk> <sep>`` (ids 0..4) whose ``__call__`` adds
        ``<bos> ... <eos>`` (``<bos> A <sep> B <eos>`` for pairs), right padding, no clean-up of spaces.

    Raises:
        ValueError: when ``vocab_size`` cannot hold the byte alphabet, or the corpus is empty.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    corpus = [t for t in texts if t and t.strip()]
    if not corpus:
        raise ValueError("train_tokenizer: got no non-empty text")
    tk = Tokenizer(models.BPE(unk_token=UNK))
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),  # one digit per pre-token
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    ids = {t: tk.token_to_id(t) for t in (BOS, EOS, SEP)}
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {SEP} $B {EOS}", special_tokens=list(ids.items())
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, sep_token=SEP,
        padding_side="right", clean_up_tokenization_spaces=False,
    )  # fmt: skip


def save_tokenizer(tok: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Save ``tok`` (``tokenizer.json`` + configs) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (local files only, never downloaded).

    Raises:
        FileNotFoundError: when ``directory`` has no ``tokenizer.json``.
    """
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return PreTrainedTokenizerFast.from_pretrained(
        str(directory), local_files_only=True, clean_up_tokenization_spaces=False
    )


def encode_reports(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, *, pad_to_max_length: bool = False
) -> dict[str, torch.Tensor]:
    """Tokenize reports for causal LM training.

    Each row is ``<bos> tokens <eos> <pad>...``; a report longer than ``max_length`` is cut and then has
    no ``<eos>`` (the model is not taught to stop where the report does not).

    Args:
        tok: the tokenizer (needs bos/eos/pad tokens).
        texts: B report texts.
        max_length: longest row (the decoder's ``n_positions`` at most).
        pad_to_max_length: pad to ``max_length`` instead of the longest row.

    Returns:
        ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long, ``labels`` (B, L) long: the input ids
        with -100 at pad positions (the model shifts them).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    if None in (bos, eos, pad):
        raise ValueError(f"tokenizer lacks bos/eos/pad ids: {bos}, {eos}, {pad}")
    content = tok(list(texts), add_special_tokens=False)["input_ids"]
    rows = [([bos, *ids, eos])[:max_length] for ids in content]
    width = max_length if pad_to_max_length else max((len(r) for r in rows), default=1)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------
#: Words whose trailing period does not end a sentence (compared lowercased, without the final ".").
ABBREVIATIONS: frozenset[str] = frozenset({
    "approx", "appr", "e.g", "i.e", "vs", "cf", "incl", "no", "nos", "nr", "fig", "figs", "dr", "ca", "c.a",
    "diam", "max", "resp", "img", "im", "ser", "sl", "hx", "pt", "pts", "yr", "yrs", "mo", "mos", "wk",
    "wks", "st", "ant", "post", "sup", "inf", "lat", "med", "ax", "sag", "cor", "w", "w/", "u.s", "a.k.a",
})  # fmt: skip
_TERMINATOR = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_NEWLINE_CUT = re.compile(
    r"\n[ \t]*\n"  # a blank line
    r"|\n(?=[ \t]*(?:\(?\d{1,2}[.)]\s|[-*\u2022]\s|[A-Z][A-Za-z /&-]{1,40}:))"  # before a list item / header
)
_ENUMERATOR = re.compile(r"\(?(?:\d{1,2}|[a-hA-H])")


def _is_boundary(text: str, m: re.Match[str], sent_start: int, mixed_case: bool) -> bool:
    """Whether the terminator ``m`` ends a sentence that began at ``sent_start``."""
    if m.end() >= len(text.rstrip()):
        return True
    word_start = max(text.rfind(c, 0, m.start()) for c in " \t\n") + 1
    word = text[word_start : m.start()]
    if m.group().startswith(".") and not m.group().startswith(".."):
        if word.lower().lstrip("([") in ABBREVIATIONS:  # "approx. 5 mm", "e.g. a granuloma"
            return False
        # "1. Nodule ..." / "IMPRESSION: 2. ...": a list enumerator opens a sentence, it does not end one.
        before = text[sent_start:word_start].strip()
        if _ENUMERATOR.fullmatch(word) and (not before or before.endswith(":")):
            return False
    nxt = text[m.end() :].lstrip()
    # In mixed-case text a lowercase continuation means an abbreviation we do not know ("ca. three").
    return not (mixed_case and nxt[:1].islower())


def sentence_offsets(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of a report, surrounding whitespace excluded.

    Radiology-aware: "1.2 cm", "6.5", "approx. 5 mm", "e.g. a granuloma", "vs. 4 mm" and list enumerators
    ("1. ...") do not end a sentence; blank lines, list items and section headers on a new line start one.
    ``text[start:end]`` is the sentence.
    """
    mixed_case = any(c.isupper() for c in text) and any(c.islower() for c in text)
    events = [(m.start(), m.start(), "nl") for m in _NEWLINE_CUT.finditer(text)]
    events += [(m.end(), m.start(), "t") for m in _TERMINATOR.finditer(text)]
    events.sort()
    cuts, start = [0], 0
    for cut, at, kind in events:
        if cut < start:
            continue
        sent_start = start + len(text[start:]) - len(text[start:].lstrip())
        m = _TERMINATOR.match(text, at) if kind == "t" else None
        if kind == "nl" or (m is not None and _is_boundary(text, m, sent_start, mixed_case)):
            cuts.append(cut)
            start = cut
    cuts.append(len(text))
    spans = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        chunk = text[a:b]
        if chunk.strip():
            s = a + len(chunk) - len(chunk.lstrip())
            spans.append((s, s + len(chunk.strip())))
    return spans


def split_sentences(text: str) -> list[str]:
    """The sentences of a report (see :func:`sentence_offsets` for the rules and the char offsets)."""
    return [text[s:e] for s, e in sentence_offsets(text)]


def _assign(token_ends: Sequence[int | None], sentences: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges of ``sentences`` from each token's end char (None for special tokens).

    A token belongs to the sentence its last character falls in; whitespace between two sentences goes to
    the earlier one. The ranges are contiguous and cover every non-special token.
    """
    if not sentences:
        return []
    starts = [s for s, _ in sentences[1:]]
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for k, end in enumerate(token_ends):
        if end is None:
            continue
        i = bisect.bisect_right(starts, end - 1)
        first.setdefault(i, k)
        last[i] = k + 1
    spans, prev = [], min(first.values(), default=0)
    for i in range(len(sentences)):
        a = first.get(i, prev)
        b = last.get(i, a)
        spans.append((a, b))
        prev = b
    return spans


def sentence_token_spans(tok: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    """Token index range ``[a, b)`` of each sentence of ``text`` in ``tok(text)["input_ids"]``.

    Index 0 is ``<bos>``; the ranges are contiguous and cover every id between ``<bos>`` and ``<eos>``.
    """
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    pairs = zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
    ends = [None if special else e for (_, e), special in pairs]
    return _assign(ends, sentence_offsets(text))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable unicode table used by the byte-level pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def sentence_spans_from_ids(
    tok: PreTrainedTokenizerBase, ids: Sequence[int] | torch.Tensor
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """Decode generated ids and find which of them make up each sentence.

    Unlike :func:`sentence_token_spans` it does not re-encode the text (a generated id sequence need not be
    the canonical BPE encoding of its text), so the spans index ``ids`` itself.

    Args:
        tok: a byte-level tokenizer from :func:`train_tokenizer`.
        ids: (T,) token ids, special tokens (bos/eos/pad) allowed and skipped.

    Returns:
        ``(text, sentence char offsets, token spans)``: the decoded text, ``(start, end)`` of each sentence
        in it and the range ``[a, b)`` of ``ids`` that writes each sentence.
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    special = set(tok.all_special_ids)
    table = _byte_decoder()
    data, byte_ends = b"", []
    for i, t in zip(ids, tok.convert_ids_to_tokens(ids), strict=True):
        if i in special or t is None:
            byte_ends.append(None)
            continue
        data += bytes(table[c] for c in t if c in table)
        byte_ends.append(len(data))
    text = data.decode("utf-8", errors="replace")
    # chars started before byte b (a token that ends inside a multi-byte char counts it, as offsets do)
    started = [0]
    for x in data:
        started.append(started[-1] + (x & 0xC0 != 0x80))
    ends = [None if b is None else started[b] for b in byte_ends]
    sentences = sentence_offsets(text)
    return text, sentences, _assign(ends, sentences)

"""Report-generation metrics: corpus BLEU-4 and ROUGE-L (pure Python, no nltk / sacrebleu).

Both use :func:`tokenize_words`, so scores are comparable between the two metrics but not
digit-for-digit with tools that tokenise differently (sacrebleu's ``13a`` splits decimals, for
instance). Report them as "lungvl BLEU-4" and compare models only under the same tokeniser.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu4", "rouge_l", "rouge_l_corpus", "tokenize_words"]

# A decimal number ("5.2"), a run of word characters ("nodule", "4b"), or one punctuation mark.
_TOKEN_RE = re.compile(r"\d+\.\d+|\w+|[^\w\s]")

ROUGE_L_BETA = 1.2


def tokenize_words(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words and single punctuation marks.

    Decimal numbers stay whole so that ``"5.2 mm"`` and ``"5.8 mm"`` differ in one token, not in
    a fragment of one. Hyphenated words are split (``"ground-glass"`` → ``ground``, ``-``,
    ``glass``).

    Args:
        text: any string.

    Returns:
        The tokens, e.g. ``tokenize_words("A 5.2 mm nodule, RUL.")`` →
        ``["a", "5.2", "mm", "nodule", ",", "rul", "."]``.

    Raises:
        ValueError: if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r}")
    return _TOKEN_RE.findall(text.lower())


def _check_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(seq, str):
            raise ValueError(f"{name} must be a list of strings, got a single str {seq[:40]!r}")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references must have the same length, got {len(hypotheses)} and {len(references)}"
        )
    if len(hypotheses) == 0:
        raise ValueError("hypotheses and references must not be empty")


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (Papineni et al., 2002) with one reference per hypothesis.

    ``BLEU = BP * exp(mean_{n=1..4} log p_n)`` with uniform weights. ``p_n`` pools the clipped
    n-gram matches and the hypothesis n-gram counts over the whole corpus (not an average of
    sentence scores). Add-one smoothing is applied for ``n > 1`` (Lin & Och, 2004):
    ``p_n = (matches_n + 1) / (total_n + 1)``, so a corpus without any 4-gram match does not score
    exactly 0; ``p_1`` is not smoothed, so a corpus with no word in common with its references does
    score 0. A consequence of the smoothing is that an n-gram order the hypotheses are too short to
    contain gets ``p_n = 1``; the brevity penalty then carries the cost of such short outputs.
    ``BP = 1`` if the total hypothesis length ``c`` exceeds the total reference length ``r``, else
    ``exp(1 - r / c)``.

    Args:
        hypotheses: generated reports (or sentences), one per item.
        references: reference reports, aligned with ``hypotheses``.

    Returns:
        BLEU-4 in ``[0, 1]``; ``0.0`` when every hypothesis is empty.

    Raises:
        ValueError: on a length mismatch, empty corpora, or a bare ``str`` instead of a list.
    """
    _check_corpus(hypotheses, references)
    matches = [0] * 4
    totals = [0] * 4
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = tokenize_words(hyp), tokenize_words(ref)
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, 5):
            h_counts, r_counts = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, r_counts[g]) for g, c in h_counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_p = math.log(matches[0] / totals[0])
    log_p += sum(math.log((matches[k] + 1) / (totals[k] + 1)) for k in range(1, 4))
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p / 4.0)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, ``O(len(a) * len(b))`` time, ``O(len(b))`` memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str) -> float:
    """Sentence-level ROUGE-L F-measure (Lin, 2004) from the longest common subsequence.

    ``P = LCS / len(hyp)``, ``R = LCS / len(ref)`` and ``F = (1 + β²) P R / (R + β² P)`` with
    ``β = 1.2``, the value fixed by the COCO caption evaluation code (``pycocoevalcap``) that
    report-generation papers use; ``β > 1`` weighs recall more than precision.

    Args:
        hyp: generated text.
        ref: reference text.

    Returns:
        ROUGE-L in ``[0, 1]``: ``1.0`` when both texts have no token, ``0.0`` when only one has none
        or the LCS is empty.

    Raises:
        ValueError: if either argument is not a ``str``.
    """
    h, r = tokenize_words(hyp), tokenize_words(ref)
    if not h and not r:
        return 1.0
    lcs = _lcs_length(h, r) if h and r else 0
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    b2 = ROUGE_L_BETA**2
    return (1.0 + b2) * p * rec / (rec + b2 * p)


def rouge_l_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean of :func:`rouge_l` over aligned ``(hypothesis, reference)`` pairs.

    Args:
        hypotheses: generated texts.
        references: reference texts, aligned with ``hypotheses``.

    Returns:
        The average sentence-level ROUGE-L.

    Raises:
        ValueError: on a length mismatch, empty corpora, or a bare ``str`` instead of a list.
    """
    _check_corpus(hypotheses, references)
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, references, strict=True)) / len(hypotheses)

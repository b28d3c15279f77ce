"""Report-generation metrics from the reference libraries: corpus BLEU-4 (sacrebleu) and ROUGE-L (rouge-score).

Scores are those of the libraries papers publish with, so they can be compared with published
numbers when the settings match:

* BLEU-4: ``sacrebleu.corpus_bleu`` with its defaults, one reference per hypothesis: the ``13a``
  tokeniser (mteval-v13a: punctuation split off, decimals such as ``5.2`` split too), case kept
  (``case:mixed``), ``exp`` smoothing, uniform 1- to 4-gram weights, corpus-level counts and brevity
  penalty. The signature is :func:`bleu_signature` (e.g.
  ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``); report it beside the score.
  sacrebleu gives 0-100; :func:`bleu4` returns it divided by 100.
* ROUGE-L: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``, the F-measure
  (balanced, ``β = 1``) of the sentence-level longest common subsequence. Its tokeniser lowercases
  and keeps ``[a-z0-9]`` runs (``5.2`` becomes ``5`` and ``2``); the Porter stemmer is on so that
  ``nodule``/``nodules`` and ``measure``/``measuring`` match, as in the ROUGE-1.5.5 ``-m`` runs
  summarisation papers quote. :func:`rouge_l_corpus` is the mean over report pairs.

The clinical-concept F1 (``lungvl_model.text.report_labels.concept_f1``) is this project's own and
lives there. :func:`tokenize_words` is the word splitter lungvl's earlier hand-written scores used; it
is kept for callers that count tokens, and no score here depends on it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["ROUGE_L_SETTINGS", "bleu4", "bleu_signature", "rouge_l", "rouge_l_corpus", "tokenize_words"]

#: how :func:`rouge_l` calls rouge-score (for reports and results tables)
ROUGE_L_SETTINGS = "rouge-score rougeL, use_stemmer=True, F-measure (beta=1), mean over reports"

# A decimal number ("5.2"), a run of word characters ("nodule", "4b"), or one punctuation mark.
_TOKEN_RE = re.compile(r"\d+\.\d+|\w+|[^\w\s]")


def tokenize_words(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words and single punctuation marks.

    Decimal numbers stay whole (``"5.2"``); hyphenated words are split (``"ground-glass"`` →
    ``ground``, ``-``, ``glass``). Not used by :func:`bleu4` or :func:`rouge_l`.

    Args:
        text: any string.

    Returns:
        The tokens, e.g. ``tokenize_words("A 5.2 mm nodule, RUL.")`` →
        ``["a", "5.2", "mm", "nodule", ",", "rul", "."]``.

    Raises:
        ValueError: if ``text`` is not a ``str``.
    """
    _check_str("text", text)
    return _TOKEN_RE.findall(text.lower())


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}: {value!r}")


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
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        for i, item in enumerate(seq):
            if not isinstance(item, str):
                raise ValueError(f"{name}[{i}] must be a str, got {type(item).__name__}: {item!r}")


@functools.cache
def _bleu() -> Any:
    from sacrebleu.metrics.bleu import BLEU

    return BLEU()  # defaults: tokenize="13a", lowercase=False, smooth_method="exp", max_ngram_order=4


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.cache
def bleu_signature() -> str:
    """The sacrebleu signature of the BLEU settings :func:`bleu4` uses (``nrefs:1|case:mixed|...|tok:13a|...``)."""
    from sacrebleu.metrics.bleu import BLEU

    metric = BLEU()  # the settings of _bleu(); sacrebleu knows nrefs only after a first score
    metric.corpus_score(["a"], [["a"]])
    return str(metric.get_signature())


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 by ``sacrebleu.corpus_bleu`` (defaults: ``13a`` tokens, mixed case, ``exp`` smoothing).

    n-gram matches and lengths are pooled over the corpus (not an average of sentence scores), one
    reference per hypothesis.

    Args:
        hypotheses: generated reports (or sentences), one per item.
        references: reference reports, aligned with ``hypotheses``.

    Returns:
        BLEU-4 in ``[0, 1]`` (sacrebleu's 0-100 score / 100; ``0.0`` when every hypothesis is empty).

    Raises:
        ValueError: on a length mismatch, empty corpora, a bare ``str`` instead of a list, or an item
            that is not a ``str``.
    """
    _check_corpus(hypotheses, references)
    score = _bleu().corpus_score(list(hypotheses), [list(references)]).score
    return min(max(float(score) / 100.0, 0.0), 1.0)  # 100.00000000000004 for identical corpora


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F-measure of one pair by rouge-score (``rougeL``, Porter stemmer on).

    Args:
        hyp: generated text.
        ref: reference text.

    Returns:
        ROUGE-L in ``[0, 1]``: ``1.0`` for texts with the same tokens, ``0.0`` when either text has no
        ``[a-z0-9]`` token (rouge-score's convention, an empty pair included) or nothing in common.

    Raises:
        ValueError: if either argument is not a ``str``.
    """
    _check_str("hyp", hyp)
    _check_str("ref", ref)
    return float(_rouge_scorer().score(ref, hyp)["rougeL"].fmeasure)  # score(target, prediction)


def rouge_l_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean of :func:`rouge_l` over aligned ``(hypothesis, reference)`` pairs.

    Args:
        hypotheses: generated texts.
        references: reference texts, aligned with ``hypotheses``.

    Returns:
        The average ROUGE-L F-measure.

    Raises:
        ValueError: on a length mismatch, empty corpora, a bare ``str`` instead of a list, or an item
            that is not a ``str``.
    """
    _check_corpus(hypotheses, references)
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, references, strict=True)) / len(hypotheses)

"""BLEU-4 (sacrebleu) and ROUGE-L (rouge-score) against values worked out by hand."""

from __future__ import annotations

import pytest

from lungvl_model.evaluation.text_metrics import (
    ROUGE_L_SETTINGS,
    bleu4,
    bleu_signature,
    rouge_l,
    rouge_l_corpus,
    tokenize_words,
)

# sacrebleu's README example, with its first reference stream only (one reference per hypothesis)
README_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REF = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]


@pytest.mark.parametrize(
    "hyps, refs, expected",
    [
        # 13a tokens: "." split off, "wasn't" whole. Pooled matches/totals: 1-grams 12/17 (6 + 2 + 4), 2-grams
        # 6/14 (5 + 0 + 1), 3-grams 4/11, 4-grams 3/8; lengths 17 vs 17, so BP = 1 (sacrebleu prints 45.07)
        (README_SYS, README_REF, (12 / 17 * 6 / 14 * 4 / 11 * 3 / 8) ** 0.25),
        # p1 3/4, p2 2/3, p3 1/2; no 4-gram match: exp smoothing gives p4 = 1 / (2 * 1)
        (["the nodule is stable"], ["the nodule is unchanged"], (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25),
        (["The nodule is stable.", "No new nodules."], ["The nodule is stable.", "No new nodules."], 1.0),
        (["alpha beta gamma delta"], ["one two three four"], 0.0),
        (["", ""], ["a nodule", "no nodule"], 0.0),
    ],
)
def test_bleu4_hand_checked(hyps, refs, expected):
    assert bleu4(hyps, refs) == pytest.approx(expected, abs=1e-12)


def test_bleu4_is_case_sensitive_and_splits_decimals_like_13a():
    # case:mixed: "The" and "the" differ; 13a splits "5.2" into "5", ".", "2"
    assert bleu4(["The nodule"], ["the nodule"]) < 1.0
    assert bleu4(["a 5.2 mm nodule"], ["a 5.8 mm nodule"]) > 0.0  # "5" and "." still match


def test_bleu_signature_names_the_settings():
    sig = bleu_signature()
    for part in ("nrefs:1", "case:mixed", "tok:13a", "smooth:exp"):
        assert part in sig


@pytest.mark.parametrize(
    "hyp, ref, expected",
    [
        ("Solid nodule in the RUL.", "solid nodule in the rul", 1.0),  # lowercased, punctuation dropped
        # stemmer on: nodules/nodule and stable match, are/is do not: LCS 3 of 4 and 4 -> F = 0.75
        ("the nodules are stable", "the nodule is stable", 0.75),
        # LCS "solid nodule right lobe" = 4; P = 4/8, R = 4/5; F1 = 2PR / (P + R)
        ("a solid nodule in the right upper lobe", "solid nodule right lower lobe", 2 * 0.5 * 0.8 / 1.3),
        ("alpha beta", "gamma", 0.0),
        ("", "nodule", 0.0),
        ("", "", 0.0),  # rouge-score's convention: no token, no score
    ],
)
def test_rouge_l_hand_checked(hyp, ref, expected):
    assert rouge_l(hyp, ref) == pytest.approx(expected)


def test_rouge_l_corpus_averages_pairs():
    assert rouge_l_corpus(["no nodule", "alpha"], ["no nodule", "beta"]) == pytest.approx(0.5)
    assert "use_stemmer=True" in ROUGE_L_SETTINGS


def test_tokenize_words_kept_for_counting():
    assert tokenize_words("A 5.2 mm nodule, RUL.") == ["a", "5.2", "mm", "nodule", ",", "rul", "."]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bleu4(["a"], ["a", "b"]), r"1 and 2"),
        (lambda: bleu4("a b", "a b"), r"single str"),
        (lambda: bleu4([], []), r"must not be empty"),
        (lambda: bleu4(["a", None], ["a", "b"]), r"hypotheses\[1\] must be a str, got NoneType"),
        (lambda: rouge_l_corpus(["a"], [3]), r"references\[0\] must be a str, got int: 3"),
        (lambda: rouge_l(None, "a"), r"hyp must be a str, got NoneType"),
        (lambda: rouge_l("a", b"a"), r"ref must be a str, got bytes"),
    ],
)
def test_invalid_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""The public report corpus: the federation's tokenizer is trained on the synthetic generator, not on sites."""

from __future__ import annotations

import numpy as np
import pytest

from lungvl_model.data.preprocess import PreprocessConfig
from lungvl_model.data.synth import PROFILES, nodule_states, public_report_corpus, sample_patients, write_report
from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig
from lungvl_model.text.tokenizer import train_tokenizer
from lungvl_model.training.stages import PUBLIC_TOKENIZER_CORPUS, build_public_model, public_model_meta

# what an LIDC-derived site writes (lungvl_model.data.lidc.report_text) and a radiologist's sentence
LIDC_SENTENCES = (
    "A 12.4 x 9.8 mm (mean 11.1 mm) part-solid spiculated nodule at z = -143.5 mm "
    "(3 of 4 readers, mean malignancy rating 4.2 of 5).",
    "There is a 6 mm ground-glass nodule in the left lower lobe (image 112), stable since the prior CT.",
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return public_report_corpus(300, seed=0)


def test_corpus_is_deterministic_varied_and_report_shaped(corpus: list[str]) -> None:
    assert len(corpus) == 300 and all(t.strip() for t in corpus)
    assert public_report_corpus(300, seed=0) == corpus  # same seed, same reports
    assert public_report_corpus(50, seed=1) != corpus[:50]
    assert len(set(corpus)) > 250  # not one template repeated
    joined = "\n".join(corpus)
    for word in ("FINDINGS:", "IMPRESSION:", "Lung-RADS", "ground-glass", "part-solid", "(image ", "COMPARISON: CT"):
        assert word in joined, word
    assert any("screening" in t.lower() for t in corpus) and any("referred" in t.lower() for t in corpus)
    with pytest.raises(ValueError, match="n >= 1"):
        public_report_corpus(0)
    with pytest.raises(ValueError, match="unknown cohort"):
        public_report_corpus(5, cohorts=["hospital-a"])


def test_corpus_does_not_reproduce_a_generated_sites_reports(corpus: list[str]) -> None:
    site = set()
    for profile in PROFILES.values():  # what generate_site(seed=0) writes for its first patients
        for case in sample_patients(profile, 40, seed=0):
            for prior in (True, False) if case.has_prior else (False,):
                rng = np.random.default_rng([case.streams[1 if prior else 0], 7])
                site.add(write_report(case, nodule_states(case, prior=prior), profile, rng, prior=prior))
    assert not site & set(corpus)


def test_tokenizer_trained_on_the_corpus_encodes_lidc_style_text(corpus: list[str]) -> None:
    tok = train_tokenizer(corpus, vocab_size=600)
    for sentence in LIDC_SENTENCES:
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == sentence  # byte-level: lossless
        assert len(ids) < len(sentence) / 1.5, (len(ids), len(sentence))  # digits are one token each
        pieces = tok.convert_ids_to_tokens(ids)
        assert "Ġnodule" in pieces and "Ġmm" in pieces  # radiology words are merged tokens
    pieces = tok.convert_ids_to_tokens(tok(" nodule lobe malignancy", add_special_tokens=False)["input_ids"])
    assert pieces == ["Ġnodule", "Ġlobe", "Ġmalignancy"]


def test_public_model_needs_no_site() -> None:
    cfg = LungVLConfig(
        preset="test",
        vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
        text=TextConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, n_positions=48, visual_scales=(2, 3)),
        heads=HeadsConfig(hidden=16),
        input=PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), size=(32, 32, 32)),
    )
    a, b = build_public_model(cfg, seed=0, n_reports=200), build_public_model(cfg, seed=1, n_reports=200)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()  # one vocabulary whatever the weights' seed
    assert public_model_meta()["tokenizer_corpus"] == PUBLIC_TOKENIZER_CORPUS
    assert PUBLIC_TOKENIZER_CORPUS == "lungvl synthetic report generator (public)"

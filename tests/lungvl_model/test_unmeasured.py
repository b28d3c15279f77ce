"""Margins the decoder writes are taken out with their clause; every other fact of the sentence stays."""

from __future__ import annotations

import numpy as np
import pytest

from lungvl_model.data.synth.cohorts import PROFILES
from lungvl_model.data.synth.patients import nodule_states, sample_patient
from lungvl_model.data.synth.reports import nodule_sentence
from lungvl_model.inference.unmeasured import without_margin
from lungvl_model.text.labeler import label_report

CASES = [
    ("8 mm nonsolid ground-glass nodule in the right upper lobe with smooth margins.",
     "8 mm nonsolid ground-glass nodule in the right upper lobe."),
    ("There is a ground-glass nodule in the left upper lobe measuring 9 mm, well-circumscribed.",
     "There is a ground-glass nodule in the left upper lobe measuring 9 mm."),
    ("1. 12 mm spiculated solid nodule in the LUL, suspicious for malignancy.",
     "1. 12 mm solid nodule in the LUL, suspicious for malignancy."),
    ("Spiculated 12 mm nodule in the RUL.", "12 mm nodule in the RUL."),
    ("A 9 mm solid nodule in the LLL, with spiculated margins, increased from 7 mm.",
     "A 9 mm solid nodule in the LLL, increased from 7 mm."),
    ("A 0.8 cm part-solid nodule in the RML smoothly marginated.", "A 0.8 cm part-solid nodule in the RML."),
    ("A 9 mm solid nodule in the LLL with lobulated contours.", "A 9 mm solid nodule in the LLL."),
    ("A 9 mm solid nodule in the LLL with spiculation.", "A 9 mm solid nodule in the LLL."),
    ("Well-circumscribed.", ""),
    # nothing about a margin: unchanged, character for character
    ("2. Lung-RADS 3: probably benign.", "2. Lung-RADS 3: probably benign."),
    ("No pulmonary nodules.", "No pulmonary nodules."),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:30] for c in CASES])
def test_margin_clause_taken_out(text: str, expected: str) -> None:
    assert without_margin(text) == expected
    assert all(n.margin is None for n in label_report(f"FINDINGS:\n{expected}").nodules)


def test_every_synthetic_nodule_sentence_keeps_its_other_facts() -> None:
    """The decoder's vocabulary is the synthetic reports': no margin survives, size, lobe, type and comparison do."""
    seen = 0
    for i in range(60):
        profile = PROFILES[sorted(PROFILES)[i % len(PROFILES)]]
        case = sample_patient(profile, 92_000, i)
        for s in nodule_states(case, prior=False):
            for seed in range(3):
                text = nodule_sentence(s, np.random.default_rng([i, seed]), "2023-05-01")
                before, after = label_report(f"FINDINGS:\n{text}"), label_report(f"FINDINGS:\n{without_margin(text)}")
                assert len(after.nodules) == len(before.nodules) == 1, (text, without_margin(text))
                a, b = after.nodules[0], before.nodules[0]
                assert a.margin is None, (text, without_margin(text))
                assert (a.size_mm, a.lobe, a.type, a.calcified) == (b.size_mm, b.lobe, b.type, b.calcified), text
                assert after.comparison == before.comparison, text
                seen += b.margin is not None
    assert seen > 100  # most synthetic sentences name a margin

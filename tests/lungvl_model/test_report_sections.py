"""Decoder targets: FINDINGS + IMPRESSION only, and each nodule sentence assigned to its nodule."""

from __future__ import annotations

import pytest

from lungvl_model.text.report_sections import (
    decoder_target,
    finding_targets,
    section_blocks,
    strip_image_refs,
)

REPORT = """EXAMINATION: CT Low Dose Lung Screening.
CLINICAL INDICATION: 70-year-old female. Lung cancer screening. 20.8 pack-year smoking history.
TECHNIQUE: Axial CT images of the chest without intravenous contrast, reconstructed at 1.25 mm with a sharp kernel.
COMPARISON: None.
FINDINGS:
2 pulmonary nodules are identified. A 3 mm solid nodule in the RLL well-circumscribed (image 69). \
A solid nodule in the left lower lobe measuring 8 mm, with smooth margins (image 72). No pleural effusion.
IMPRESSION:
1. 8 mm solid nodule in the left lower lobe.
2. Lung-RADS 3: probably benign.
RECOMMENDATION: LDCT in 6 months."""


def test_decoder_target_keeps_findings_and_impression_only() -> None:
    assert decoder_target(REPORT) == (
        "FINDINGS:\n2 pulmonary nodules are identified. A 3 mm solid nodule in the RLL well-circumscribed (image 69). "
        "A solid nodule in the left lower lobe measuring 8 mm, with smooth margins (image 72). No pleural effusion.\n"
        "IMPRESSION:\n1. 8 mm solid nodule in the left lower lobe.\n2. Lung-RADS 3: probably benign."
    )
    for gone in ("70-year-old", "pack-year", "kernel", "COMPARISON", "RECOMMENDATION", "EXAMINATION"):
        assert gone not in decoder_target(REPORT)


def test_reports_without_headers_are_kept_whole_and_inline_headers_split() -> None:
    plain = "  A 6 mm solid nodule in the right upper lobe. Lung-RADS 2.  "
    assert decoder_target(plain) == plain.strip()
    assert decoder_target("") == ""
    inline = "History: smoker. Findings: A 6 mm nodule in the RUL. IMPRESSION: Lung-RADS 2."
    assert decoder_target(inline) == "Findings:\nA 6 mm nodule in the RUL.\nIMPRESSION:\nLung-RADS 2."
    assert decoder_target("TECHNIQUE: thin slices.\nRECOMMENDATION: none.") == ""  # headed, nothing kept


def test_section_blocks_names_each_section() -> None:
    names = [sec for sec, _, _ in section_blocks(REPORT)]
    assert names == ["technique", "history", "technique", "comparison", "findings", "impression", "recommendation"]
    assert section_blocks("Lead text.\nIMPRESSION: ok.")[0] == ("findings", "", "Lead text.")


def test_finding_sentences_go_to_their_nodule_by_size_and_lobe() -> None:
    # slot order is largest first (8 mm LLL, 3 mm RLL); the report describes the 3 mm one first
    t = finding_targets(REPORT, [8.2, 3.1], ["LLL", "RLL"])
    assert t.sentences == (
        "A solid nodule in the left lower lobe measuring 8 mm, with smooth margins.",
        "A 3 mm solid nodule in the RLL well-circumscribed.",
    )
    assert t.negative is None
    assert t.impression == "1. 8 mm solid nodule in the left lower lobe.\n2. Lung-RADS 3: probably benign."
    # a nodule the report does not describe gets no sentence; the count sentence is never a nodule sentence
    t3 = finding_targets(REPORT, [8.2, 3.1, 5.0], ["LLL", "RLL", "RUL"])
    assert t3.sentences[2] is None and t3.sentences[:2] == t.sentences


def test_order_fallback_and_negative_sentence() -> None:
    # sizes that match nothing: with as many nodule sentences as nodules, the sentences go by rank
    t = finding_targets(REPORT, [30.0, 25.0], ["", ""])
    assert t.sentences == (
        "A 3 mm solid nodule in the RLL well-circumscribed.",
        "A solid nodule in the left lower lobe measuring 8 mm, with smooth margins.",
    )
    neg = finding_targets("FINDINGS: The lungs are clear. No pulmonary nodules.\nIMPRESSION: Negative.", [], [])
    assert neg.negative == "No pulmonary nodules." and neg.sentences == () and neg.impression == "Negative."
    with pytest.raises(ValueError, match="diameters_mm has 1"):
        finding_targets(REPORT, [1.0], [])


def test_strip_image_refs() -> None:
    assert strip_image_refs("A 4 mm nodule (image 72).") == "A 4 mm nodule."
    assert strip_image_refs("Nodule (series 3, image 101) in the RUL.") == "Nodule in the RUL."
    assert strip_image_refs("Nodule (stable).") == "Nodule (stable)."

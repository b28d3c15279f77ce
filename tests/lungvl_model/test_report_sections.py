"""Decoder targets: FINDINGS + IMPRESSION only, and each nodule sentence assigned to its nodule."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lungvl_model.data.synth import PROFILES, nodule_states, sample_patients, write_report
from lungvl_model.text.report_sections import (
    decoder_target,
    finding_targets,
    section_blocks,
    strip_comparison_dates,
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


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        # the synthetic generator's comparison clauses (reports.py ``_comparison``)
        ("A 6 mm solid nodule in the RUL, stable since 2022-01-13.",
         "A 6 mm solid nodule in the RUL, stable compared with the prior."),
        ("A 5 mm solid nodule in the LUL, new since 2023-11-17.",
         "A 5 mm solid nodule in the LUL, new since the prior."),
        ("A 5 mm nodule, new compared with the prior CT.", "A 5 mm nodule, new compared with the prior CT."),
        ("A 5 mm nodule, not present on the prior study.", "A 5 mm nodule, not present on the prior study."),
        ("An 8 mm nodule, increased from 5.6 mm to 8 mm.", "An 8 mm nodule, increased from 5.6 mm to 8 mm."),
        ("A 7 mm nodule, enlarged from 5.6 mm on the prior study.",
         "A 7 mm nodule, enlarged from 5.6 mm on the prior study."),
        ("A 6 mm nodule, minimally larger than before (previously 5.4 mm), not meeting growth criteria.",
         "A 6 mm nodule, minimally larger than before (previously 5.4 mm), not meeting growth criteria."),
        # other phrasings and date formats
        ("Nodule unchanged from CT chest 2021-05-02.", "Nodule unchanged from the prior."),
        ("Stable since the prior CT dated 01/13/2022.", "Stable compared with the prior."),
        ("Unchanged since January 13, 2022.", "Unchanged compared with the prior."),
        ("Compared with the 2022-01-13 CT, it has grown.", "Compared with the prior, it has grown."),
        ("Stable compared with prior (2021-05-02).", "Stable compared with prior."),
        ("Measured 4 mm on 13 Jan 2022.", "Measured 4 mm on the prior."),
        ("No change from the prior study of 2021-05-02.", "No change from the prior."),
        ("Nodule, prior 2022-01-13, stable.", "Nodule, the prior, stable."),
    ],
)  # fmt: skip
def test_strip_comparison_dates(sentence: str, expected: str) -> None:
    assert strip_comparison_dates(sentence) == expected


def test_finding_targets_state_comparisons_without_the_date() -> None:
    report = (
        "COMPARISON: CT chest 2022-01-13.\nFINDINGS:\n2 pulmonary nodules are identified. A solid nodule in the RML "
        "measuring 6 mm, smoothly marginated, stable since 2022-01-13 (image 40). A 4 mm solid nodule in the left "
        "upper lobe, new since 2022-01-13.\nIMPRESSION:\n1. 6 mm solid nodule in the RML, stable since 2022-01-13."
    )
    t = finding_targets(report, [6.1, 4.2], ["RML", "LUL"])
    assert t.sentences == (
        "A solid nodule in the RML measuring 6 mm, smoothly marginated, stable compared with the prior.",
        "A 4 mm solid nodule in the left upper lobe, new since the prior.",
    )
    assert t.impression == "1. 6 mm solid nodule in the RML, stable compared with the prior."


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def test_synthetic_follow_up_reports_give_date_free_targets() -> None:
    """Current reports of cases with a prior: every kept target is date-free, comparisons are kept."""
    profile = PROFILES["screening"]
    dated = kept = 0
    for case in sample_patients(profile, 80, seed=5):
        if not case.has_prior:
            continue
        states = nodule_states(case, prior=False)
        text = write_report(case, states, profile, np.random.default_rng(case.streams[2]), prior=False)
        t = finding_targets(text, [s.mean_diameter_mm for s in states], [s.spec.lobe for s in states])
        findings = text[text.index("FINDINGS:") : text.index("IMPRESSION:")]
        dated += len(_ISO_DATE.findall(findings))
        for target in [*t.sentences, t.negative, t.impression]:
            assert target is None or not _ISO_DATE.search(target), target
        kept += sum("since the prior" in s or "compared with the prior" in s for s in t.sentences if s)
    assert dated > 0 and kept >= dated  # the sample has dated comparisons, and each became a date-free one

"""Fact-constrained decoding: finding a contradicted size, lobe or category in a text and restating it as measured."""

from __future__ import annotations

import pytest

from lungvl_model.inference.fact_constraint import (
    comparison_words,
    find_stated_size,
    format_like,
    restate_comparison,
    restate_descriptor,
    restate_lobe,
    restate_lung_rads,
    restate_size,
    restate_type,
    restated_start,
)
from lungvl_model.inference.findings import Finding


def test_find_stated_size_by_value_and_unit() -> None:
    text = "1. A 6 mm nodule in the RUL. 2. A 2.3 cm solid nodule in the LLL measuring 12 x 9 mm."
    s = find_stated_size(text, (23.0,))
    assert s is not None and text[s.start : s.end] == "2.3 cm" and s.values == ("2.3",) and s.unit == "cm"
    s = find_stated_size(text, (9.0, 12.0))  # dims in any order
    assert s is not None and text[s.start : s.end] == "12 x 9 mm" and s.mm == (12.0, 9.0)
    assert find_stated_size(text, (7.0,)) is None and find_stated_size(text, (6.0, 6.0)) is None
    assert find_stated_size("Lung-RADS 4B. CTDIvol 2.3 mGy.", (2.3,)) is None  # not a size


@pytest.mark.parametrize(
    ("written", "unit", "mm", "expected"),
    [
        ("23", "mm", 28.4, "28"),
        ("5.5", "mm", 6.26, "6.3"),
        ("2.3", "cm", 28.4, "2.8"),
        ("2", "cm", 28.4, "2.8"),  # cm keeps a decimal
        ("3", "mm", 0.3, "1"),  # never below what the precision writes
        ("1.25", "mm", 1.234, "1.23"),
    ],
)
def test_format_like_keeps_unit_and_precision(written: str, unit: str, mm: float, expected: str) -> None:
    assert format_like(written, unit, mm) == expected


def test_format_like_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="value_mm must be a finite number > 0, got nan"):
        format_like("2", "mm", float("nan"))
    with pytest.raises(ValueError, match="unit must be 'mm' or 'cm', got 'in'"):
        format_like("2", "in", 3.0)


def test_restate_size_cuts_after_the_rewritten_size() -> None:
    text = "1. A 23 mm solid nodule in the left lower lobe, Lung-RADS 4B. 2. Emphysema."
    assert restate_size(text, (23.0,), (28.4,)) == "1. A 28 mm"
    assert restate_size("A 2.3 cm nodule.", (23.0,), (28.4,)) == "A 2.8 cm"
    assert restate_size("measuring 2.3cm.", (23.0,), (28.4,)) == "measuring 2.8cm"
    # long and short axes: the larger written number gets the larger measurement
    assert restate_size("Nodule of 9 x 12 mm in the RUL.", (9.0, 12.0), (15.2, 10.6)) == "Nodule of 11 x 15 mm"
    assert restate_size(text, (7.0,), (28.4,)) is None  # not in the text
    assert restate_size(text, (23.0,), (15.0, 10.0)) is None  # one number written, two measured
    assert restate_size(text, (23.0,), (23.3,)) is None  # rewriting changes nothing


def test_restate_lobe_keeps_the_written_form() -> None:
    text = "1. 11 mm solid nodule in the LUL, concerning for malignancy. 2. Lung-RADS 4A."
    assert restate_lobe(text, "LUL", "RLL") == "1. 11 mm solid nodule in the RLL"
    assert restate_lobe("A nodule in the left upper lobe measuring 9 mm.", "LUL", "RML") == (
        "A nodule in the right middle lobe"
    )
    assert restate_lobe("Left upper lobe: 9 mm nodule.", "LUL", "RUL") == "Right upper lobe"
    assert restate_lobe("A nodule in the lt. upper lobe.", "LUL", "LLL") == "A nodule in the left lower lobe"
    # the first mention of the contradicted lobe, whichever form
    assert restate_lobe("RUL and left upper lobe nodules; the LUL one grew.", "LUL", "LLL") == (
        "RUL and left lower lobe"
    )
    assert restate_lobe(text, "RUL", "RLL") is None  # not stated
    assert restate_lobe("A nodule in the lingula.", "LUL", "RLL") is None  # no one-to-one rewrite
    assert restate_lobe(text, "LUL", "LUL") is None  # nothing to change
    assert restate_lobe(text, "LUL", "") is None and restate_lobe(text, "XYZ", "RLL") is None


def test_restate_lung_rads_rewrites_the_category_and_its_descriptor() -> None:
    assert restate_lung_rads("3. Lung-RADS 4A.", "4A", "3") == "3. Lung-RADS 3"
    # a descriptor written after the category is the target's own: left to the decoder it went on with the old one
    assert restate_lung_rads("3. Lung-RADS 4A: suspicious.", "4A", "3") == "3. Lung-RADS 3: probably benign"
    assert restate_lung_rads("2. Lung-RADS 2: benign appearance or behavior.", "2", "3") == (
        "2. Lung-RADS 3: probably benign"
    )
    assert restate_lung_rads("Lung-RADS category 4B, very suspicious.", "4B", "4X") == (
        "Lung-RADS category 4X, very suspicious, with additional features of malignancy"
    )
    assert restate_lung_rads("Lung-RADS 4A S (Suspicious).", "4A", "2") == (
        "Lung-RADS 2 S (Benign appearance or behavior"  # the modifier and separator as written, the capital kept
    )
    assert restate_lung_rads("Lung-RADS 2: benign.", "2", "0") == "Lung-RADS 0"  # no v2022 words for 0 here
    assert restate_lung_rads("Lung-RADS v2022 category 2.", "2", "4a") == "Lung-RADS v2022 category 4A"
    assert restate_lung_rads("Lung-RADS 4A.", "4A", "4A") is None
    assert restate_lung_rads("Lung-RADS 3.", "4A", "2") is None  # not the stated category
    assert restate_lung_rads("A 4 mm nodule.", "4A", "2") is None


def test_restate_descriptor_names_the_written_category() -> None:
    text = "1. 8 mm nodule in the RUL. 2. Lung-RADS 3: benign appearance or behavior."
    assert restate_descriptor(text, "3") == "1. 8 mm nodule in the RUL. 2. Lung-RADS 3: probably benign"
    assert restate_descriptor("Lung-RADS 4A - Negative.", "4A") == "Lung-RADS 4A - Suspicious"
    assert restate_descriptor("Lung-RADS 3: probably benign.", "3") is None  # consistent
    assert restate_descriptor("Lung-RADS 4A: negative.", "3") is None  # not the category written
    assert restate_descriptor("Lung-RADS 0: negative.", "0") is None  # no words for the category


def _compared(context: str, prior_mm: float | None, growth_mm: float | None) -> Finding:
    from tests.lungvl_model.test_fact_check import finding

    return finding(1, 12.0, 10.0, "RLL", context=context, prior_mean_diameter_mm=prior_mm, growth_mm=growth_mm)


def test_comparison_words_follow_the_lung_rads_growth_threshold() -> None:
    text = "11 mm solid nodule in the RLL, enlarged from 1.2 cm on the prior study."
    assert comparison_words(_compared("stable", 10.7, 0.3), text) == "stable"
    assert comparison_words(_compared("stable", 9.6, 1.4), text) == "stable"  # <= 1.5 mm is not growth
    assert comparison_words(_compared("growing", 8.6, 2.4), text) == "increased from 9 mm"
    assert comparison_words(_compared("growing", 8.6, 2.4), "A 1.1 cm nodule, stable.") == "increased from 0.9 cm"
    assert comparison_words(_compared("growing", 8.6, 2.4), "A nodule, stable.") == "increased from 9 mm"
    assert comparison_words(_compared("new", None, None), text) == "new"
    assert comparison_words(_compared("baseline", None, None), text) is None  # not compared


def test_restate_comparison_cuts_at_the_first_comparison() -> None:
    stable, growing, new = _compared("stable", 10.7, 0.3), _compared("growing", 8.6, 2.4), _compared("new", None, None)
    text = "11 mm solid nodule in the RLL, enlarged from 1.2 cm on the prior study."
    assert restate_comparison(text, stable) == "11 mm solid nodule in the RLL, stable"
    assert restate_comparison("11 mm nodule in the RLL, previously 8 mm, now larger.", stable) == (
        "11 mm nodule in the RLL, stable"
    )
    assert restate_comparison("11 mm solid nodule in the RLL, stable since 2023-05-01.", growing) == (
        "11 mm solid nodule in the RLL, increased from 9 mm"
    )
    assert restate_comparison("New 11 mm solid nodule in the RLL.", stable) == "Stable"
    # the verb goes with the words: "is stable", "has increased", "are new"
    assert restate_comparison("The RLL nodule has been stable.", growing) == "The RLL nodule has increased from 9 mm"
    assert restate_comparison("The nodules have increased in size.", new) == "The nodules are new"
    assert restate_comparison("11 mm nodule, unchanged from the prior study.", new) == "11 mm nodule, new"
    assert restate_comparison("11 mm nodule in the RLL, stable.", stable) is None  # nothing to change
    assert restate_comparison("11 mm nodule in the RLL.", stable) is None  # no comparison written
    assert restate_comparison(text, _compared("baseline", None, None)) is None


def test_restate_type_keeps_the_written_form() -> None:
    assert restate_type("1. 8 mm solid nodule in the LUL.", "solid", "non_solid") == "1. 8 mm ground-glass"
    assert restate_type("Solid nodule, 8 mm.", "solid", "part_solid") == "Part-solid"
    # a part-solid or non-solid word is not the solid one
    text = "A part-solid nodule and a nonsolid ground-glass nodule, then a solid one."
    assert (
        restate_type(text, "solid", "non_solid")
        == "A part-solid nodule and a nonsolid ground-glass nodule, then a ground-glass"
    )
    assert restate_type(text, "non_solid", "solid") == "A part-solid nodule and a solid"
    assert restate_type(text, "part_solid", "solid") == "A solid"
    assert restate_type("A 9 mm subsolid nodule.", "subsolid", "solid") == "A 9 mm solid"
    assert restate_type("A pure ground-glass nodule.", "non_solid", "part_solid") == "A part-solid"
    assert restate_type("A 9 mm nodule.", "solid", "non_solid") is None  # no type written
    assert restate_type(text, "solid", "solid") is None and restate_type(text, "solid", "calcified") is None


def test_restated_start_from_the_fact_check() -> None:
    from lungvl_model.inference.exam_facts import ExamFacts
    from lungvl_model.inference.fact_check import check_report
    from tests.lungvl_model.test_fact_check import FINDINGS, RULE

    def start(texts: list[str], nodule: int | None = None) -> str | None:
        check = check_report(texts, FINDINGS, ExamFacts(), rule_lung_rads=RULE, has_prior=False)
        return restated_start(texts, check, FINDINGS)

    # finding 4: RLL solid 24 x 20 mm, mean 22 mm; "15 mm" is a contradicted size, restated as the mean
    assert start(["A 15 mm solid nodule in the right lower lobe, Lung-RADS 4B."]) == "A 22 mm"
    texts = ["1. A 9 x 7 mm solid nodule in the right upper lobe.", "2. A 3.1 cm solid nodule in the RLL."]
    assert start(texts) == "1. A 9 x 7 mm solid nodule in the right upper lobe. 2. A 2.2 cm"
    assert start(["A 24 x 10 mm solid nodule in the right lower lobe."]) == "A 24 x 20 mm"
    assert start(["A 22 mm solid nodule in the right lower lobe."]) is None  # nothing contradicted
    # the first contradicted fact of a sentence, whichever kind; a lobe as the grounded finding's
    assert start(["A 22 mm solid nodule in the LUL, Lung-RADS 4B."]) == "A 22 mm solid nodule in the RLL"
    assert start(["A 15 mm solid nodule in the left upper lobe."]) == "A 4 mm"  # grounded to finding 3 (LUL, 4 mm)
    assert start(["1. A 22 mm solid nodule in the right lower lobe.", "2. Lung-RADS 3."]) == (
        "1. A 22 mm solid nodule in the right lower lobe. 2. Lung-RADS 4B"  # the rule engine's category
    )
    # finding 2: LLL non-solid 5 x 4 mm; a stated "solid" is restated as ground glass
    assert start(["A 5 mm solid nodule in the left lower lobe."]) == "A 5 mm ground-glass"
    assert start(["Lung-RADS 4B."]) is None
    # a descriptor of another category than the one written
    assert start(["1. A 22 mm solid nodule in the right lower lobe.", "2. Lung-RADS 4B: probably benign."]) == (
        "1. A 22 mm solid nodule in the right lower lobe. 2. Lung-RADS 4B: very suspicious"
    )


def test_restated_start_rewrites_a_contradicted_comparison() -> None:
    import datetime as dt

    from lungvl_model.inference.exam_facts import ExamFacts
    from lungvl_model.inference.fact_check import check_report
    from tests.lungvl_model.test_fact_check import finding

    # 1: RUL 9 x 7 mm (mean 8), 7.8 mm a year ago (stable); 2: LLL 5 x 4 mm ground glass, new; 3: RLL 14 x 12 mm
    # (mean 13) from 10 mm (growing)
    findings = [
        finding(1, 9.0, 7.0, "RUL", lung_rads="4A", context="stable", prior_mean_diameter_mm=7.8, growth_mm=0.2),
        finding(2, 5.0, 4.0, "LLL", "non_solid", lung_rads="2", context="new"),
        finding(3, 14.0, 12.0, "RLL", lung_rads="4A", context="growing", prior_mean_diameter_mm=10.0, growth_mm=3.0),
    ]
    exam = ExamFacts(study_date=dt.date(2024, 5, 2), prior_study_date=dt.date(2023, 5, 1))

    def start(texts: list[str]) -> str | None:
        return restated_start(texts, check_report(texts, findings, exam, rule_lung_rads="4A", has_prior=True), findings)

    assert (
        start(["The 8 mm right upper lobe nodule has increased in size."])
        == "The 8 mm right upper lobe nodule is stable"
    )
    assert start(["A 13 mm solid nodule in the right lower lobe, stable since 2023-05-01."]) == (
        "A 13 mm solid nodule in the right lower lobe, increased from 10 mm"
    )
    assert start(["5 mm ground-glass nodule in the left lower lobe, unchanged from the prior study."]) == (
        "5 mm ground-glass nodule in the left lower lobe, new"
    )
    assert start(["The 8 mm right upper lobe nodule is stable since 2023-05-01."]) is None  # supported


def test_decoding_fact_counts_reads_the_impression_across_findings() -> None:
    from lungvl_model.inference.exam_facts import ExamFacts
    from lungvl_model.inference.explain import decoding_fact_counts
    from lungvl_model.inference.fact_check import check_report
    from tests.lungvl_model.test_fact_check import FINDINGS, RULE

    def counts(texts: list[str], nodule: int | None) -> tuple[int, int, int, int]:
        check = check_report(texts, FINDINGS, ExamFacts(), rule_lung_rads=RULE, has_prior=False)
        return decoding_fact_counts(check, nodule, has_findings=True)

    # an IMPRESSION stating finding 4's size, lobe and type (grounded to it) misses nothing
    assert counts(["1. 22 mm solid nodule in the right lower lobe."], None) == (0, 0, 0, 3)
    assert counts(["1. Pulmonary nodules as described."], None)[2] == 1  # no fact of any finding
    # a finding sentence must state its own finding's size and lobe
    assert counts(["A solid nodule in the right lower lobe measuring 22 mm."], 4) == (0, 0, 0, 3)
    assert counts(["A solid nodule in the right lower lobe."], 4)[2] == 1
    assert counts(["A solid nodule in the left upper lobe measuring 4 mm."], 4)[2] == 2  # finding 3's facts
    check = check_report(["No pulmonary nodules."], [], ExamFacts(), rule_lung_rads="1", has_prior=False)
    assert decoding_fact_counts(check, None, has_findings=False)[2] == 0

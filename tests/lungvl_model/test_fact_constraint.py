"""Fact-constrained decoding: finding a contradicted size, lobe or category in a text and restating it as measured."""

from __future__ import annotations

import pytest

from lungvl_model.inference.fact_constraint import (
    find_stated_size,
    format_like,
    restate_lobe,
    restate_lung_rads,
    restate_size,
    restate_type,
    restated_start,
)


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


def test_restate_lung_rads_rewrites_the_category_only() -> None:
    assert restate_lung_rads("3. Lung-RADS 4A: suspicious.", "4A", "3") == "3. Lung-RADS 3"
    assert restate_lung_rads("Lung-RADS category 4B, very suspicious.", "4B", "4X") == "Lung-RADS category 4X"
    assert restate_lung_rads("Lung-RADS v2022 category 2.", "2", "4a") == "Lung-RADS v2022 category 4A"
    assert restate_lung_rads("Lung-RADS 4A.", "4A", "4A") is None
    assert restate_lung_rads("Lung-RADS 3.", "4A", "2") is None  # not the stated category
    assert restate_lung_rads("A 4 mm nodule.", "4A", "2") is None


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

"""Size-constrained decoding: finding a contradicted size in a text and restating it as measured."""

from __future__ import annotations

import pytest

from lungvl_model.inference.size_constraint import find_stated_size, format_like, restate_size, restated_start


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
    assert start(["Lung-RADS 3."]) is None

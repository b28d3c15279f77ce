"""Brock (PanCan) full model 2b (anchor: /work/shared/clinical/brock_model.md)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lungvl_model.clinical.brock import (
    LEFT_OUT,
    UPPER_LOBES,
    BrockInputs,
    brock_logit,
    brock_probability,
    is_upper_lobe,
)
from lungvl_model.clinical.lung_rads import InvalidFieldError

# The five test vectors of the anchor document, section 1.
VECTORS = [
    (62, 0, 0, 0, 4, "solid", 0, 4, 0, -6.7892, 0.00112),
    (62, 1, 0, 0, 10, "solid", 1, 1, 1, -1.3802, 0.20097),
    (70, 0, 1, 1, 15, "part_solid", 1, 2, 0, -0.6504, 0.34290),
    (55, 1, 0, 0, 6, "non_solid", 0, 3, 0, -4.8717, 0.00760),
    (65, 0, 0, 1, 25, "solid", 1, 1, 1, 0.3794, 0.59374),
]


def _inputs(
    age: float, fem: int, fam: int, emph: int, size: float, ntype: str, upper: int, count: int, spic: int
) -> BrockInputs:
    return BrockInputs(
        age=age,
        female=bool(fem),
        family_history=bool(fam),
        emphysema=bool(emph),
        longest_diameter_mm=size,
        type=ntype,
        upper_lobe=bool(upper),
        nodule_count=count,
        spiculation=bool(spic),
    )


BASE = _inputs(62, 0, 0, 0, 4.0, "solid", 0, 4, 0)


@pytest.mark.parametrize("row", VECTORS)
def test_document_vectors(row: tuple[Any, ...]) -> None:
    *args, logit, p = row
    inputs = _inputs(*args)
    assert brock_logit(inputs) == pytest.approx(logit, abs=1e-4)
    assert brock_probability(inputs) == pytest.approx(p, abs=1e-5)


def test_size_term_centred_at_4mm() -> None:
    assert brock_logit(BASE) == pytest.approx(-6.7892, abs=1e-8)


@given(st.floats(min_value=0.5, max_value=300.0), st.floats(min_value=0.5, max_value=300.0))
def test_monotonic_in_size(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    p_lo = brock_probability(replace(BASE, longest_diameter_mm=lo))
    p_hi = brock_probability(replace(BASE, longest_diameter_mm=hi))
    assert 0.0 < p_lo <= p_hi < 1.0


def test_directions_of_predictors() -> None:
    p0 = brock_probability(BASE)
    for field, value in [
        ("female", True),
        ("family_history", True),
        ("emphysema", True),
        ("upper_lobe", True),
        ("spiculation", True),
        ("type", "part_solid"),
        ("age", 70),
    ]:
        assert brock_probability(replace(BASE, **{field: value})) > p0, field
    assert brock_probability(replace(BASE, type="non_solid")) < p0
    assert brock_probability(replace(BASE, nodule_count=1)) > p0  # a solitary nodule carries more risk


def test_extreme_sizes_stay_finite() -> None:
    tiny = brock_probability(replace(BASE, longest_diameter_mm=1e-300))
    assert tiny == 0.0 or 0.0 < tiny < 1e-100
    assert brock_probability(replace(BASE, longest_diameter_mm=300.0)) < 1.0


@pytest.mark.parametrize("size", [300.01, 1e6, 1e300])
def test_implausible_sizes_refused(size: float) -> None:
    with pytest.raises(InvalidFieldError, match="at most 300"):
        brock_probability(replace(BASE, longest_diameter_mm=size))


def test_upper_lobes() -> None:
    assert UPPER_LOBES == {"RUL", "LUL"}
    assert is_upper_lobe("RUL") and is_upper_lobe("lul")
    assert not any(is_upper_lobe(code) for code in ("RML", "RLL", "LLL"))
    with pytest.raises(InvalidFieldError, match="lingula"):
        is_upper_lobe("lingula")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("longest_diameter_mm", 0.0),
        ("longest_diameter_mm", -3.0),
        ("longest_diameter_mm", math.nan),
        ("longest_diameter_mm", math.inf),
        ("type", "cavitary"),
        ("nodule_count", 0),
        ("nodule_count", 2.5),
        ("age", -1),
        ("age", 121),
        ("age", math.nan),
        ("female", 1),
        ("spiculation", "yes"),
    ],
)
def test_invalid_args(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        replace(BASE, **{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_left_out() -> None:
    text = " ".join(LEFT_OUT)
    assert "Parsimonious" in text and "2a" in text
    with pytest.raises(ImportError):
        from lungvl_model.clinical.brock import brock_model_2a  # noqa: F401

"""Lung-RADS v2022 rule table (anchor: /work/shared/clinical/lung_rads_v2022.md)."""

from __future__ import annotations

import math

import pytest

from lungvl_model.clinical.lung_rads import (
    CATEGORIES,
    LEFT_OUT,
    InvalidFieldError,
    NoduleFinding,
    UncoveredFindingError,
    categorize_exam,
    categorize_nodule,
    category_rank,
    context_from_prior,
    is_growing,
    management,
    max_category,
)

S, P, N = "solid", "part_solid", "non_solid"

# (type, mean diameter, solid component, context, expected)
TABLE = [
    # solid, baseline: <6 -> 2, 6-<8 -> 3, 8-<15 -> 4A, >=15 -> 4B
    (S, 1.0, None, "baseline", "2"),
    (S, 5.9, None, "baseline", "2"),
    (S, 6.0, None, "baseline", "3"),
    (S, 7.9, None, "baseline", "3"),
    (S, 8.0, None, "baseline", "4A"),
    (S, 14.9, None, "baseline", "4A"),
    (S, 15.0, None, "baseline", "4B"),
    (S, 40.0, None, "baseline", "4B"),
    # solid, new: <4 -> 2, 4-<6 -> 3, 6-<8 -> 4A, >=8 -> 4B
    (S, 3.9, None, "new", "2"),
    (S, 4.0, None, "new", "3"),
    (S, 5.9, None, "new", "3"),
    (S, 6.0, None, "new", "4A"),
    (S, 7.9, None, "new", "4A"),
    (S, 8.0, None, "new", "4B"),
    # solid, growing: <8 -> 4A, >=8 -> 4B
    (S, 3.0, None, "growing", "4A"),
    (S, 7.9, None, "growing", "4A"),
    (S, 8.0, None, "growing", "4B"),
    # solid, slow growing -> 4B
    (S, 5.0, None, "slow_growing", "4B"),
    # solid, stable without prior category: baseline size rules (documented choice)
    (S, 5.9, None, "stable", "2"),
    (S, 6.0, None, "stable", "3"),
    (S, 8.0, None, "stable", "4A"),
    (S, 15.0, None, "stable", "4B"),
    # part-solid, baseline: total <6 -> 2; else solid component <6 -> 3, 6-<8 -> 4A, >=8 -> 4B
    (P, 5.9, 5.0, "baseline", "2"),
    (P, 6.0, 1.0, "baseline", "3"),
    (P, 10.0, 5.9, "baseline", "3"),
    (P, 10.0, 6.0, "baseline", "4A"),
    (P, 10.0, 7.9, "baseline", "4A"),
    (P, 10.0, 8.0, "baseline", "4B"),
    # part-solid, new: total <6 -> 3; else solid component <4 -> 4A, >=4 -> 4B
    (P, 5.9, 2.0, "new", "3"),
    (P, 5.9, 5.0, "new", "3"),
    (P, 6.0, 3.9, "new", "4A"),
    (P, 6.0, 4.0, "new", "4B"),
    # part-solid, growing solid component: <4 -> 4A, >=4 -> 4B
    (P, 12.0, 3.9, "growing", "4A"),
    (P, 12.0, 4.0, "growing", "4B"),
    (P, 5.0, 4.0, "growing", "4B"),
    (P, 8.0, 2.0, "slow_growing", "4B"),
    (P, 10.0, 6.0, "stable", "4A"),
    # non-solid: <30 -> 2 at baseline/new/growing; >=30 -> 3 at baseline/new, 2 when stable/slow growing
    (N, 29.9, None, "baseline", "2"),
    (N, 30.0, None, "baseline", "3"),
    (N, 29.9, None, "new", "2"),
    (N, 30.0, None, "new", "3"),
    (N, 29.9, None, "growing", "2"),
    (N, 10.0, None, "stable", "2"),
    (N, 30.0, None, "stable", "2"),
    (N, 29.9, None, "slow_growing", "2"),
    (N, 45.0, None, "slow_growing", "2"),
]


@pytest.mark.parametrize(("ntype", "d", "comp", "ctx", "expected"), TABLE)
def test_category_table(ntype: str, d: float, comp: float | None, ctx: str, expected: str) -> None:
    finding = NoduleFinding(type=ntype, mean_diameter_mm=d, solid_component_mm=comp, context=ctx)
    assert categorize_nodule(finding) == expected


@pytest.mark.parametrize(
    ("d", "ctx", "expected"),
    [
        (9.9, "baseline", "2"),
        (10.0, "baseline", "4A"),  # < 10, not <= 10; then the solid baseline rule
        (9.9, "new", "2"),
        (10.0, "new", "4B"),
        (5.0, "growing", "4A"),  # not baseline/new: ordinary solid rule
        (9.0, "stable", "4A"),
    ],
)
def test_juxtapleural(d: float, ctx: str, expected: str) -> None:
    finding = NoduleFinding(type=S, mean_diameter_mm=d, context=ctx, juxtapleural=True)
    assert categorize_nodule(finding) == expected


@pytest.mark.parametrize(
    ("ntype", "d", "comp", "ctx"),
    [(S, 20.0, None, "baseline"), (S, 9.0, None, "growing"), (P, 12.0, 9.0, "new"), (N, 35.0, None, "new")],
)
def test_benign_pattern_is_category_1(ntype: str, d: float, comp: float | None, ctx: str) -> None:
    finding = NoduleFinding(
        type=ntype,
        mean_diameter_mm=d,
        solid_component_mm=comp,
        context=ctx,
        benign_pattern=True,
        suspicious_features=True,
    )
    assert categorize_nodule(finding) == "1"


@pytest.mark.parametrize(
    ("ntype", "d", "comp", "ctx", "expected"),
    [
        (S, 5.0, None, "baseline", "2"),  # 2 is never upgraded
        (S, 6.0, None, "baseline", "4X"),  # 3
        (S, 8.0, None, "baseline", "4X"),  # 4A
        (S, 15.0, None, "baseline", "4X"),  # 4B
        (P, 10.0, 8.0, "new", "4X"),
        (N, 31.0, None, "baseline", "4X"),
        (N, 20.0, None, "baseline", "2"),
        (S, 8.0, None, "stable", "4X"),
    ],
)
def test_4x_upgrade_only_from_3_4a_4b(ntype: str, d: float, comp: float | None, ctx: str, expected: str) -> None:
    finding = NoduleFinding(
        type=ntype, mean_diameter_mm=d, solid_component_mm=comp, context=ctx, suspicious_features=True
    )
    assert categorize_nodule(finding) == expected


@pytest.mark.parametrize(
    ("ntype", "d", "comp", "prior", "expected"),
    [
        (S, 7.0, None, "3", "2"),  # stable 3 -> 2
        (S, 5.0, None, "3", "2"),  # smaller and stable
        (S, 10.0, None, "4A", "3"),  # stable 4A -> 3
        (S, 4.0, None, "2", "2"),  # a category 2 stays 2
        (S, 6.5, None, "2", "3"),  # enlarged into a higher size category (not meeting growth)
        (S, 8.5, None, "3", "4A"),
        (S, 20.0, None, "4B", "4B"),  # no step-down from 4B in the sources
        (S, 9.0, None, "4X", "4X"),
        (S, 7.0, None, "1", "3"),  # prior 1/0: baseline size rules
        (P, 10.0, 5.0, "3", "2"),
        (P, 10.0, 7.0, "4A", "3"),
        (P, 10.0, 7.0, "3", "4A"),
        (N, 35.0, None, "3", "2"),
    ],
)
def test_stable_step_down(ntype: str, d: float, comp: float | None, prior: str, expected: str) -> None:
    finding = NoduleFinding(
        type=ntype, mean_diameter_mm=d, solid_component_mm=comp, context="stable", prior_category=prior
    )
    assert categorize_nodule(finding) == expected


def test_growing_large_non_solid_is_left_out() -> None:
    with pytest.raises(UncoveredFindingError, match="context"):
        categorize_nodule(NoduleFinding(type=N, mean_diameter_mm=30.0, context="growing"))
    assert any("30 mm" in item for item in LEFT_OUT)


def test_exam_is_max_over_nodules() -> None:
    assert categorize_exam([]) == "1"
    small = NoduleFinding(type=S, mean_diameter_mm=4.0)
    mid = NoduleFinding(type=S, mean_diameter_mm=9.0)
    calc = NoduleFinding(type=S, mean_diameter_mm=20.0, benign_pattern=True)
    spic = NoduleFinding(type=S, mean_diameter_mm=6.5, suspicious_features=True)
    big = NoduleFinding(type=S, mean_diameter_mm=16.0)
    assert categorize_exam([small]) == "2"
    assert categorize_exam([calc]) == "1"
    assert categorize_exam([small, calc, mid]) == "4A"
    assert categorize_exam([big, spic]) == "4X"


def test_category_order_and_max() -> None:
    assert [category_rank(c) for c in CATEGORIES] == list(range(7))
    assert category_rank("4X") > category_rank("4B") > category_rank("4A") > category_rank("3")
    assert max_category(["2", "4B", "4X", "3"]) == "4X"
    assert max_category(("1", "0")) == "1"
    with pytest.raises(ValueError):
        max_category([])
    with pytest.raises(ValueError, match="'5'"):
        category_rank("5")


def test_management() -> None:
    assert "12 months" in management("1") and management("1") == management("2")
    assert "6 months" in management("3")
    assert "3 months" in management("4A") and "PET/CT" in management("4A")
    assert "tissue sampling" in management("4B")
    assert management("4X") == management("4B")
    assert "1-3 months" in management("0")
    with pytest.raises(ValueError):
        management("4C")


@pytest.mark.parametrize(
    ("prior", "current", "months", "expected"),
    [
        (5.0, 6.5, 12.0, False),
        (5.0, 6.6, 12.0, True),
        (5.0, 7.0, 6.0, True),
        (5.0, 9.0, 13.0, False),
        (8.0, 7.0, 12.0, False),
    ],
)
def test_is_growing(prior: float, current: float, months: float, expected: bool) -> None:
    assert is_growing(prior, current, months) is expected


def test_context_from_prior() -> None:
    assert context_from_prior(None, 5.0, has_prior_exam=False) == "baseline"
    assert context_from_prior(None, 5.0, has_prior_exam=True) == "new"
    assert context_from_prior(4.0, 5.6, has_prior_exam=True) == "growing"
    assert context_from_prior(4.0, 5.5, has_prior_exam=True) == "stable"
    with pytest.raises(InvalidFieldError, match="prior_mean_mm"):
        context_from_prior(4.0, 5.0, has_prior_exam=False)


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"type": "cyst", "mean_diameter_mm": 5.0}, "type", "'cyst'"),
        ({"type": S, "mean_diameter_mm": -1.0}, "mean_diameter_mm", "-1.0"),
        ({"type": S, "mean_diameter_mm": 0.0}, "mean_diameter_mm", "0.0"),
        ({"type": S, "mean_diameter_mm": math.nan}, "mean_diameter_mm", "nan"),
        ({"type": S, "mean_diameter_mm": math.inf}, "mean_diameter_mm", "inf"),
        ({"type": S, "mean_diameter_mm": "5"}, "mean_diameter_mm", "'5'"),
        ({"type": P, "mean_diameter_mm": 8.0}, "solid_component_mm", "None"),
        ({"type": P, "mean_diameter_mm": 8.0, "solid_component_mm": 9.0}, "solid_component_mm", "9.0"),
        ({"type": P, "mean_diameter_mm": 8.0, "solid_component_mm": -2.0}, "solid_component_mm", "-2.0"),
        ({"type": S, "mean_diameter_mm": 5.0, "context": "old"}, "context", "'old'"),
        ({"type": N, "mean_diameter_mm": 5.0, "juxtapleural": True}, "juxtapleural", "True"),
        ({"type": S, "mean_diameter_mm": 5.0, "benign_pattern": 1}, "benign_pattern", "1"),
        ({"type": S, "mean_diameter_mm": 5.0, "prior_category": "5"}, "prior_category", "'5'"),
    ],
)
def test_invalid_args(kwargs: dict[str, object], field: str, value: str) -> None:
    with pytest.raises(InvalidFieldError) as info:
        NoduleFinding(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value) and value in str(info.value)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((-1.0, 5.0, 12.0), "prior_mean_mm"),
        ((5.0, math.nan, 12.0), "current_mean_mm"),
        ((5.0, 6.0, 0.0), "interval_months"),
    ],
)
def test_is_growing_invalid(args: tuple[float, float, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        is_growing(*args)


def test_left_out_is_documented() -> None:
    assert isinstance(LEFT_OUT, tuple) and all(isinstance(s, str) and s for s in LEFT_OUT)

"""How close a nodule's size is to a Lung-RADS v2022 size threshold that would change its category.

A measurement error of a millimetre or two moves a nodule across a threshold of the v2022 table
(``/work/shared/clinical/lung_rads_v2022.md`` section 2), so a report whose findings sit near one is more
likely to carry the wrong category. :func:`borderline_size_mm` gives that distance. The candidate
thresholds below are those of :mod:`lungvl_model.clinical.lung_rads`; a threshold counts for a finding only
when :func:`~lungvl_model.clinical.lung_rads.categorize_nodule` really changes across it, so context, prior
category and the juxtapleural, benign and suspicious flags are all decided by the rule engine itself
(the tests scan sizes to check that every category change lies at a listed threshold).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from lungvl_model.clinical.lung_rads import NoduleFinding, UncoveredFindingError, categorize_nodule

__all__ = [
    "NON_SOLID_THRESHOLDS_MM",
    "PART_SOLID_COMPONENT_THRESHOLDS_MM",
    "PART_SOLID_TOTAL_THRESHOLDS_MM",
    "SOLID_THRESHOLDS_MM",
    "borderline_size_mm",
]

# Every size threshold of the v2022 table, mm (mean diameter; part-solid: total and solid component).
SOLID_THRESHOLDS_MM: tuple[float, ...] = (4.0, 6.0, 8.0, 10.0, 15.0)  # 10: juxtapleural rule
PART_SOLID_TOTAL_THRESHOLDS_MM: tuple[float, ...] = (6.0,)
PART_SOLID_COMPONENT_THRESHOLDS_MM: tuple[float, ...] = (4.0, 6.0, 8.0)
NON_SOLID_THRESHOLDS_MM: tuple[float, ...] = (30.0,)
_PROBE_MM = 1e-6  # the thresholds are "< t": t - _PROBE_MM is on the lower side


def _category(f: NoduleFinding) -> str:
    try:
        return categorize_nodule(f)
    except UncoveredFindingError:
        return "uncovered"


def _total_changes(f: NoduleFinding, t: float) -> bool:
    def at(d: float) -> str:
        comp = None if f.solid_component_mm is None else min(f.solid_component_mm, d)
        return _category(dataclasses.replace(f, mean_diameter_mm=d, solid_component_mm=comp))

    return at(t - _PROBE_MM) != at(t)


def _component_changes(f: NoduleFinding, t: float) -> bool:
    if t > f.mean_diameter_mm:  # the component cannot outgrow the total: not reachable by this finding
        return False
    below = _category(dataclasses.replace(f, solid_component_mm=t - _PROBE_MM))
    return below != _category(dataclasses.replace(f, solid_component_mm=t))


def borderline_size_mm(findings: Sequence[NoduleFinding]) -> float:
    """Smallest distance of any finding's size to a Lung-RADS v2022 size threshold that changes its category.

    For each finding, the candidate thresholds of its type (solid: 4, 6, 8, 10, 15 mm; part-solid: total
    6 mm and solid component 4, 6, 8 mm; non-solid: 30 mm) are kept when the rule engine gives a
    different category just below and at the threshold for that finding; the distance is
    ``|size - threshold|`` of the measured dimension (mean diameter, or solid component).

    Args:
        findings: the report's nodules as given to the rule engine.

    Returns:
        The distance in mm (>= 0); ``inf`` when there is no finding or no threshold applies (benign pattern,
        slowly growing, stable with a 4B/4X prior...).
    """
    best = math.inf
    for f in findings:
        d = f.mean_diameter_mm
        if f.type == "solid":
            totals: tuple[float, ...] = SOLID_THRESHOLDS_MM
        elif f.type == "part_solid":
            totals = PART_SOLID_TOTAL_THRESHOLDS_MM
        else:
            totals = NON_SOLID_THRESHOLDS_MM
        for t in totals:
            if _total_changes(f, t):
                best = min(best, abs(d - t))
        if f.type == "part_solid" and f.solid_component_mm is not None:
            for t in PART_SOLID_COMPONENT_THRESHOLDS_MM:
                if _component_changes(f, t):
                    best = min(best, abs(f.solid_component_mm - t))
    return best

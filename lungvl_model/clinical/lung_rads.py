"""ACR Lung-RADS v2022 categorisation of screening-CT lung nodules (rule subset).

Implements only the rows of ``/work/shared/clinical/lung_rads_v2022.md`` that the anchor document
marks reliable, following its section-3 pseudocode. Rows that the document marks [UNSURE] follow the
document's own recommendation (growth on mean diameter only; juxtapleural rule uses ``< 10 mm``) or are
left out; :data:`LEFT_OUT` lists them.

Interpretations (not rules of the sources, choices of this module):
    * Stable nodule with ``prior_category`` 2, 3 or 4A: stepped down (3 -> 2, 4A -> 3, 2 stays 2),
      unless its current size puts it in a higher category than the prior one by the baseline size
      rules (the document: size thresholds apply "when a nodule enlarges into a higher size category").
      Applied to solid and part-solid nodules (the stepped-down rows are not type specific).
    * Stable nodule with no ``prior_category`` (or prior 0 or 1): baseline size rules.
    * Stable nodule with prior 4B or 4X: the sources give no step-down, so the prior category is kept.
    * New part-solid nodule with total < 6 mm: category 3 whatever the solid component (pseudocode order).
    * A ``juxtapleural`` flag asserts "solid, smooth margins, oval/lentiform/triangular shape"; it is
      refused for part-solid or non-solid nodules.

Lung-RADS is a registered ACR trademark; see the anchor document's licensing note before release.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CATEGORIES: tuple[str, ...] = ("0", "1", "2", "3", "4A", "4B", "4X")
"""Lung-RADS categories from least to most suspicious (4X ranks above 4B)."""

NODULE_TYPES: tuple[str, ...] = ("solid", "part_solid", "non_solid")
CONTEXTS: tuple[str, ...] = ("baseline", "new", "growing", "stable", "slow_growing")

GROWTH_THRESHOLD_MM = 1.5
"""Growth = mean diameter increase strictly greater than this within a 12-month interval."""
GROWTH_INTERVAL_MONTHS = 12.0

LEFT_OUT: tuple[str, ...] = (
    "Category 0 (incomplete exam, prior CT being located, infection/inflammation findings and their "
    "4B/size-criteria exceptions): exam-level findings, no inputs here",
    "Airway nodules (2 / 4A / 4B): no inputs; 'at baseline' vs 'at baseline or new' for 4A is [UNSURE]",
    "Atypical pulmonary cysts (3 / 4A / 4B): no inputs for cyst wall, loculation or cystic component",
    "Step-down of a category 4B lesion proven benign after work-up (-> 2): needs the work-up outcome",
    "Stable category 4B/4X nodule: no step-down in the sources, so the prior category is kept",
    "Non-solid nodule >= 30 mm that is growing (not slowly): not specified in the sources [UNSURE]; "
    "categorize_nodule raises UncoveredFindingError",
    "Growth by volume ('> 2 mm3', probably a transcription error [UNSURE]): growth on mean diameter only",
    "Juxtapleural '<= 10 mm' variant [UNSURE]: the rule uses '< 10 mm'; which pleural surfaces count "
    "[UNSURE] is left to whoever sets the juxtapleural flag",
    "4X example features (spiculation, GGN doubling in a year, enlarged nodes) [UNSURE for v2022]: the "
    "caller decides suspicious_features",
    "Modifier S (findings unrelated to lung cancer): independent flag, not modelled",
    "LIDC texture -> nodule type mapping [UNSURE]: a convention, not an ACR rule",
    "Cysts: thin-walled unilocular cysts are not classified; the caller must not pass them as nodules",
)

_MANAGEMENT: dict[str, str] = {
    "0": "Comparison to prior chest CT and/or additional screening CT images; for findings suggesting "
    "infection or inflammation, LDCT in 1-3 months, then a new category based on the most suspicious "
    "nodule.",
    "1": "Continue annual screening with LDCT in 12 months.",
    "2": "Continue annual screening with LDCT in 12 months.",
    "3": "LDCT in 6 months.",
    "4A": "LDCT in 3 months; PET/CT may be considered if there is a >= 8 mm solid nodule or solid component.",
    "4B": "Referral for further clinical evaluation: diagnostic chest CT with or without contrast; PET/CT "
    "may be considered if there is a >= 8 mm solid nodule or solid component; tissue sampling; and/or "
    "referral. The choice depends on clinical evaluation, comorbidities, patient preference and "
    "probability of malignancy.",
}
_MANAGEMENT["4X"] = _MANAGEMENT["4B"]

_STEP_DOWN: dict[str, str] = {"2": "2", "3": "2", "4A": "3"}


class InvalidFieldError(ValueError):
    """A field of a clinical input has a bad value.

    Attributes:
        field: the field (and CSV column) name.
        value: the offending value.
        reason: what was expected, e.g. ``"must be > 0"``.
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason}, got {value!r}")


class UncoveredFindingError(InvalidFieldError):
    """A finding whose category the implemented sources do not specify (see :data:`LEFT_OUT`)."""


#: Largest size accepted, mm: a lesion cannot be wider than a chest (~300 mm); a bigger value is a units
#: or typing error (e.g. 1e6, or micrometres), never a nodule, and Lung-RADS would silently call it 4B.
MAX_LESION_MM = 300.0
#: Longest interval between two exams accepted, months (20 years).
MAX_INTERVAL_MONTHS = 240.0


def check_positive_size(field: str, value: Any, *, maximum: float = MAX_LESION_MM) -> float:
    """Check that a size is a finite number in (0, maximum].

    Args:
        field: field name used in the error.
        value: the value to check.
        maximum: the largest plausible value (default :data:`MAX_LESION_MM`).

    Returns:
        The value as a float.

    Raises:
        InvalidFieldError: if the value is not a finite real number in (0, maximum].
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFieldError(field, value, "must be a number")
    if not math.isfinite(value) or value <= 0:
        raise InvalidFieldError(field, value, "must be a finite number > 0")
    if value > maximum:
        raise InvalidFieldError(
            field, value, f"must be at most {maximum:g} (larger is not a lung lesion: check the units)"
        )
    return float(value)


def check_bool(field: str, value: Any) -> None:
    """Check that a flag is a real ``bool``.

    Args:
        field: field name used in the error.
        value: the value to check.

    Raises:
        InvalidFieldError: if the value is not a bool.
    """
    if not isinstance(value, bool):
        raise InvalidFieldError(field, value, "must be True or False")


def category_rank(cat: str) -> int:
    """Return the rank of a category in :data:`CATEGORIES` (0 for "0" ... 6 for "4X").

    Args:
        cat: a Lung-RADS category string.

    Returns:
        Its index in :data:`CATEGORIES`.

    Raises:
        ValueError: if ``cat`` is not a known category.
    """
    if cat not in CATEGORIES:
        raise ValueError(f"category: expected one of {CATEGORIES}, got {cat!r}")
    return CATEGORIES.index(cat)


def max_category(cats: Iterable[str]) -> str:
    """Return the most suspicious category (4X above 4B; "0" ranks lowest here).

    Args:
        cats: one or more categories.

    Returns:
        The category of highest rank.

    Raises:
        ValueError: if ``cats`` is empty or holds an unknown category.
    """
    items = list(cats)
    if not items:
        raise ValueError("cats: expected at least one category, got an empty sequence")
    return max(items, key=category_rank)


@dataclass(frozen=True)
class NoduleFinding:
    """One nodule as read on a screening CT.

    Attributes:
        type: "solid", "part_solid" or "non_solid".
        mean_diameter_mm: mean of long and short axes (total size for part-solid), mm, > 0.
        solid_component_mm: mean diameter of the solid component; required (> 0) for part-solid,
            ignored otherwise; must not exceed ``mean_diameter_mm``.
        context: "baseline", "new", "growing", "stable" or "slow_growing".
        juxtapleural: juxtapleural nodule that is solid, smooth and oval/lentiform/triangular.
        benign_pattern: benign calcification (complete, central, popcorn, concentric) or fat.
        suspicious_features: extra features raising suspicion (4X upgrade of 3/4A/4B).
        prior_category: category at the previous exam; used only when ``context`` is "stable".
    """

    type: str
    mean_diameter_mm: float
    solid_component_mm: float | None = None
    context: str = "baseline"
    juxtapleural: bool = False
    benign_pattern: bool = False
    suspicious_features: bool = False
    prior_category: str | None = None

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            InvalidFieldError: naming the bad field and its value.
        """
        if self.type not in NODULE_TYPES:
            raise InvalidFieldError("type", self.type, f"expected one of {NODULE_TYPES}")
        total = check_positive_size("mean_diameter_mm", self.mean_diameter_mm)
        if self.type == "part_solid" and self.solid_component_mm is None:
            raise InvalidFieldError("solid_component_mm", None, "required for a part_solid nodule")
        if self.solid_component_mm is not None:
            comp = check_positive_size("solid_component_mm", self.solid_component_mm)
            if comp > total:
                raise InvalidFieldError(
                    "solid_component_mm", self.solid_component_mm, f"must not exceed mean_diameter_mm {total}"
                )
        if self.context not in CONTEXTS:
            raise InvalidFieldError("context", self.context, f"expected one of {CONTEXTS}")
        for name in ("juxtapleural", "benign_pattern", "suspicious_features"):
            check_bool(name, getattr(self, name))
        if self.juxtapleural and self.type != "solid":
            raise InvalidFieldError(
                "juxtapleural", self.juxtapleural, f"applies to solid nodules only, not type {self.type!r}"
            )
        if self.prior_category is not None and self.prior_category not in CATEGORIES:
            raise InvalidFieldError("prior_category", self.prior_category, f"expected one of {CATEGORIES}")


def _solid_by_size(d: float, ctx: str) -> str:
    if ctx == "new":
        return "2" if d < 4 else "3" if d < 6 else "4A" if d < 8 else "4B"
    if ctx == "growing":
        return "4A" if d < 8 else "4B"
    if ctx == "slow_growing":
        return "4B"
    return "2" if d < 6 else "3" if d < 8 else "4A" if d < 15 else "4B"  # baseline size rules


def _part_solid_by_size(total: float, comp: float, ctx: str) -> str:
    if ctx == "new":
        if total < 6:
            return "3"
        return "4A" if comp < 4 else "4B"
    if ctx == "growing":
        return "4A" if comp < 4 else "4B"
    if ctx == "slow_growing":
        return "4B"
    if total < 6:  # baseline size rules
        return "2"
    return "3" if comp < 6 else "4A" if comp < 8 else "4B"


def _stable(size_category: str, prior: str | None) -> str:
    if prior is None or prior in ("0", "1"):
        return size_category  # no usable prior category: baseline size rules
    if prior in ("4B", "4X"):
        return prior  # no step-down from 4B/4X in the sources
    if category_rank(size_category) > category_rank(prior):
        return size_category  # enlarged into a higher size category
    return _STEP_DOWN[prior]


def categorize_nodule(finding: NoduleFinding) -> str:
    """Return the Lung-RADS v2022 category of one nodule.

    Args:
        finding: the nodule.

    Returns:
        One of "1", "2", "3", "4A", "4B", "4X".

    Raises:
        UncoveredFindingError: for a growing non-solid nodule >= 30 mm (not specified by the sources).
    """
    if finding.benign_pattern:
        return "1"
    d, ctx = finding.mean_diameter_mm, finding.context
    if finding.type == "non_solid":
        if d < 30 or ctx in ("stable", "slow_growing"):
            cat = "2"
        elif ctx in ("baseline", "new"):
            cat = "3"
        else:
            raise UncoveredFindingError(
                "context",
                ctx,
                f"not covered by the Lung-RADS v2022 sources for a non_solid nodule >= 30 mm "
                f"({d} mm); no category given",
            )
    elif finding.type == "part_solid":
        comp = float(finding.solid_component_mm or 0.0)
        cat = _part_solid_by_size(d, comp, ctx)
        if ctx == "stable":
            cat = _stable(cat, finding.prior_category)
    elif finding.juxtapleural and ctx in ("baseline", "new") and d < 10:
        cat = "2"
    else:
        cat = _solid_by_size(d, ctx)
        if ctx == "stable":
            cat = _stable(cat, finding.prior_category)
    if finding.suspicious_features and cat in ("3", "4A", "4B"):
        return "4X"
    return cat


def categorize_exam(findings: Sequence[NoduleFinding]) -> str:
    """Return the exam category: the most suspicious nodule, or "1" when there are none.

    Args:
        findings: all nodules of the exam.

    Returns:
        The exam-level category.

    Raises:
        UncoveredFindingError: if one of the nodules is not covered (see :func:`categorize_nodule`).
    """
    if not findings:
        return "1"
    return max_category(categorize_nodule(f) for f in findings)


def management(category: str) -> str:
    """Return the management recommendation for a category.

    Args:
        category: a Lung-RADS category.

    Returns:
        The management text of the anchor document's table.

    Raises:
        ValueError: if the category is unknown.
    """
    category_rank(category)
    return _MANAGEMENT[category]


def is_growing(prior_mean_mm: float, current_mean_mm: float, interval_months: float = 12.0) -> bool:
    """Apply the v2022 growth definition: mean diameter up by > 1.5 mm within <= 12 months.

    Intervals longer than 12 months return False: the definition is per 12-month interval and cannot be
    checked from two measurements further apart (compare consecutive annual exams instead).

    Args:
        prior_mean_mm: mean diameter at the prior exam, mm (> 0).
        current_mean_mm: mean diameter now, mm (> 0).
        interval_months: time between the exams, months (> 0).

    Returns:
        True when the nodule meets the growth definition.

    Raises:
        InvalidFieldError: if a size or the interval is not a finite number > 0.
    """
    prior = check_positive_size("prior_mean_mm", prior_mean_mm)
    current = check_positive_size("current_mean_mm", current_mean_mm)
    interval = check_positive_size("interval_months", interval_months, maximum=MAX_INTERVAL_MONTHS)
    return interval <= GROWTH_INTERVAL_MONTHS and current - prior > GROWTH_THRESHOLD_MM


def context_from_prior(
    prior_mean_mm: float | None,
    current_mean_mm: float,
    has_prior_exam: bool,
    interval_months: float = 12.0,
) -> str:
    """Derive a nodule's context from the prior screening exam.

    Args:
        prior_mean_mm: the nodule's mean diameter on the prior exam, or None if it was absent.
        current_mean_mm: its mean diameter now, mm.
        has_prior_exam: whether the patient has a prior screening CT.
        interval_months: time since the prior exam, months.

    Returns:
        "baseline" (no prior exam), "new" (prior exam without the nodule), else "growing" or "stable".

    Raises:
        InvalidFieldError: for a bad size or interval, or a prior size without a prior exam.
    """
    check_positive_size("current_mean_mm", current_mean_mm)
    if not has_prior_exam:
        if prior_mean_mm is not None:
            raise InvalidFieldError("prior_mean_mm", prior_mean_mm, "given but has_prior_exam is False")
        return "baseline"
    if prior_mean_mm is None:
        return "new"
    return "growing" if is_growing(prior_mean_mm, current_mean_mm, interval_months) else "stable"

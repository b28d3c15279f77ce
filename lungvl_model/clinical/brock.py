"""Brock (PanCan) malignancy probability for a baseline screen-detected lung nodule.

Implements only the full model with spiculation ("model 2b", McWilliams et al., N Engl J Med
2013;369:910-919), section 1 of ``/work/shared/clinical/brock_model.md`` (HIGH confidence). The
parsimonious models and model 2a are not implemented; :data:`LEFT_OUT` says why.

The model is for nodules on the **baseline** screen and takes the **longest** diameter in mm
(Lung-RADS uses the mean diameter; keep the two apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .lung_rads import NODULE_TYPES, InvalidFieldError, check_bool, check_positive_size

UPPER_LOBES: frozenset[str] = frozenset({"RUL", "LUL"})
"""Lobe codes counted as upper lobe by the model."""
LOBES: frozenset[str] = frozenset({"RUL", "RML", "RLL", "LUL", "LLL"})

LEFT_OUT: tuple[str, ...] = (
    "Parsimonious models 1a/1b: no trusted intercept or coefficients (NEJM Table 3 not checked)",
    "Full model without spiculation (2a): LOW confidence, one self-contradicting secondary source [UNVERIFIED]",
    "Eur Radiol 2019 intercept/offset 0.2761: probably a different centring or a typo; -6.7892 is used",
    "Ordinal nodule-type coding (coefficient -0.1466) of one public file: does not match the paper's "
    "indicator coding; one-hot solid/part_solid/non_solid is used",
    "Lingula coded as upper lobe [UNSURE]: is_upper_lobe accepts lobe codes only; a lingular nodule "
    "must be given upper_lobe explicitly",
    "BTS size cut-offs for using the model [U]: no size gate beyond size > 0",
)

INTERCEPT = -6.7892
AGE_CENTRE = 62.0
COUNT_CENTRE = 4.0
SIZE_CENTRE = (4.0 / 10.0) ** -0.5
"""Size-term centre, 1.58113883...: the size term is zero for a 4 mm nodule."""

_COEF_AGE = 0.0287
_COEF_FEMALE = 0.6011
_COEF_FAMILY_HISTORY = 0.2961
_COEF_EMPHYSEMA = 0.2953
_COEF_SIZE = -5.3854
_COEF_TYPE: dict[str, float] = {"solid": 0.0, "part_solid": 0.3770, "non_solid": -0.1276}
_COEF_UPPER_LOBE = 0.6581
_COEF_COUNT = -0.0824
_COEF_SPICULATION = 0.7729

_MIN_AGE, _MAX_AGE = 0.0, 120.0


@dataclass(frozen=True)
class BrockInputs:
    """Predictors of the Brock full model 2b.

    Attributes:
        age: age in years (0-120).
        female: female sex.
        family_history: family history of lung cancer.
        emphysema: emphysema on CT.
        longest_diameter_mm: longest nodule diameter, mm (> 0).
        type: "solid", "part_solid" or "non_solid".
        upper_lobe: nodule in an upper lobe (see :data:`UPPER_LOBES`).
        nodule_count: number of nodules reported on the baseline scan (>= 1).
        spiculation: spiculated margin.
    """

    age: float
    female: bool
    family_history: bool
    emphysema: bool
    longest_diameter_mm: float
    type: str
    upper_lobe: bool
    nodule_count: int
    spiculation: bool

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            InvalidFieldError: naming the bad field and its value.
        """
        if isinstance(self.age, bool) or not isinstance(self.age, int | float):
            raise InvalidFieldError("age", self.age, "must be a number")
        if not (math.isfinite(self.age) and _MIN_AGE <= self.age <= _MAX_AGE):
            raise InvalidFieldError("age", self.age, f"must be between {_MIN_AGE:g} and {_MAX_AGE:g} years")
        for name in ("female", "family_history", "emphysema", "upper_lobe", "spiculation"):
            check_bool(name, getattr(self, name))
        check_positive_size("longest_diameter_mm", self.longest_diameter_mm)
        if self.type not in NODULE_TYPES:
            raise InvalidFieldError("type", self.type, f"expected one of {NODULE_TYPES}")
        if isinstance(self.nodule_count, bool) or not isinstance(self.nodule_count, int):
            raise InvalidFieldError("nodule_count", self.nodule_count, "must be a whole number")
        if self.nodule_count < 1:
            raise InvalidFieldError("nodule_count", self.nodule_count, "must be >= 1")


def is_upper_lobe(lobe: str) -> bool:
    """Map a lobe code to the model's upper-lobe predictor.

    Args:
        lobe: one of "RUL", "RML", "RLL", "LUL", "LLL" (case-insensitive).

    Returns:
        True for RUL and LUL.

    Raises:
        InvalidFieldError: for any other code (the lingula's coding is unsure; pass upper_lobe directly).
    """
    code = lobe.strip().upper()
    if code not in LOBES:
        raise InvalidFieldError("lobe", lobe, f"expected one of {sorted(LOBES)}")
    return code in UPPER_LOBES


def brock_logit(inputs: BrockInputs) -> float:
    """Return the log-odds of malignancy under the Brock full model 2b.

    Args:
        inputs: validated predictors.

    Returns:
        The logit of the malignancy probability.
    """
    size_term = math.sqrt(10.0 / inputs.longest_diameter_mm) - SIZE_CENTRE  # (size_cm) ** -0.5 - centre
    return (
        INTERCEPT
        + _COEF_AGE * (inputs.age - AGE_CENTRE)
        + _COEF_FEMALE * inputs.female
        + _COEF_FAMILY_HISTORY * inputs.family_history
        + _COEF_EMPHYSEMA * inputs.emphysema
        + _COEF_SIZE * size_term
        + _COEF_TYPE[inputs.type]
        + _COEF_UPPER_LOBE * inputs.upper_lobe
        + _COEF_COUNT * (inputs.nodule_count - COUNT_CENTRE)
        + _COEF_SPICULATION * inputs.spiculation
    )


def brock_probability(inputs: BrockInputs) -> float:
    """Return the probability that the nodule is malignant (Brock full model 2b).

    Args:
        inputs: validated predictors.

    Returns:
        Probability in (0, 1).
    """
    logit = brock_logit(inputs)
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    odds = math.exp(logit)
    return odds / (1.0 + odds)

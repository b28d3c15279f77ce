"""Rule-based clinical scores: ACR Lung-RADS v2022 (subset) and the Brock (PanCan) model 2b."""

from .batch import (
    BROCK_COLUMN,
    LUNG_RADS_COLUMN,
    brock_csv,
    lung_rads_csv,
    read_csv_rows,
    write_csv_rows,
)
from .brock import LEFT_OUT as BROCK_LEFT_OUT
from .brock import UPPER_LOBES, BrockInputs, brock_logit, brock_probability, is_upper_lobe
from .lung_rads import (
    CATEGORIES,
    CONTEXTS,
    NODULE_TYPES,
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
from .lung_rads import LEFT_OUT as LUNG_RADS_LEFT_OUT

__all__ = [
    "BROCK_COLUMN",
    "BROCK_LEFT_OUT",
    "CATEGORIES",
    "CONTEXTS",
    "LUNG_RADS_COLUMN",
    "LUNG_RADS_LEFT_OUT",
    "NODULE_TYPES",
    "UPPER_LOBES",
    "BrockInputs",
    "InvalidFieldError",
    "NoduleFinding",
    "UncoveredFindingError",
    "brock_csv",
    "brock_logit",
    "brock_probability",
    "categorize_exam",
    "categorize_nodule",
    "category_rank",
    "context_from_prior",
    "is_growing",
    "is_upper_lobe",
    "lung_rads_csv",
    "management",
    "max_category",
    "read_csv_rows",
    "write_csv_rows",
]

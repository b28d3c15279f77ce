"""Evaluation metrics for segmentation, detection, classification, calibration, deferral and report text.

Everything is re-exported from :mod:`lungvl_model.evaluation.metrics` (its ``__all__`` is the list).
"""

from lungvl_model.evaluation.metrics import *  # noqa: F403
from lungvl_model.evaluation.metrics import __all__  # noqa: F401

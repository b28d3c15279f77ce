"""All evaluation metrics in one namespace.

The implementations live in one module per concept (STYLE.md habit 10):
:mod:`.segmentation_metrics` (Dice, HD95, detection matching), :mod:`.classification_metrics`
(AUC, calibration, bootstrap, deferral) and :mod:`.text_metrics` (BLEU-4, ROUGE-L). Import from
here (``from lungvl_model.evaluation.metrics import dice``) or from the package.
"""

from __future__ import annotations

from lungvl_model.evaluation.classification_metrics import (
    accuracy,
    bootstrap_ci,
    brier,
    calibrate_entropy_threshold,
    confusion_matrix,
    deferral_summary,
    expected_calibration_error,
    roc_auc,
    sensitivity_specificity,
)
from lungvl_model.evaluation.segmentation_metrics import DetectionMatch, detection_summary, dice, hd95, match_detections
from lungvl_model.evaluation.text_metrics import bleu4, rouge_l, rouge_l_corpus, tokenize_words

__all__ = [
    "DetectionMatch",
    "accuracy",
    "bleu4",
    "bootstrap_ci",
    "brier",
    "calibrate_entropy_threshold",
    "confusion_matrix",
    "deferral_summary",
    "detection_summary",
    "dice",
    "expected_calibration_error",
    "hd95",
    "match_detections",
    "roc_auc",
    "rouge_l",
    "rouge_l_corpus",
    "sensitivity_specificity",
    "tokenize_words",
]

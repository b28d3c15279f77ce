"""Evaluation metrics for segmentation, detection, classification, calibration, deferral and report text.

Everything is re-exported from :mod:`lungvl_model.evaluation.metrics`.
"""

from lungvl_model.evaluation.metrics import (
    DetectionMatch,
    accuracy,
    bleu4,
    bootstrap_ci,
    brier,
    calibrate_entropy_threshold,
    confusion_matrix,
    deferral_summary,
    detection_summary,
    dice,
    expected_calibration_error,
    hd95,
    match_detections,
    roc_auc,
    rouge_l,
    rouge_l_corpus,
    sensitivity_specificity,
    tokenize_words,
)

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

"""Report text tools: the rule-based chest CT report labeler and its clinical-concept metric."""

from lungvl_model.text.labeler import label_report, label_reports_jsonl
from lungvl_model.text.report_labels import (
    CONCEPT_KEYS,
    LabeledNodule,
    ReportLabels,
    concept_counts,
    concept_f1,
    concept_vector,
    dominant_nodule,
    size_bucket,
)

__all__ = [
    "CONCEPT_KEYS",
    "LabeledNodule",
    "ReportLabels",
    "concept_counts",
    "concept_f1",
    "concept_vector",
    "dominant_nodule",
    "label_report",
    "label_reports_jsonl",
    "size_bucket",
]

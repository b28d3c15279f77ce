"""Synthetic chest-CT cohorts: site datasets in the layout of DESIGN.md section 2.

Public API::

    from lungvl_model.data.synth import SynthConfig, generate_site
    summary = generate_site(SynthConfig(cohort="screening", n_studies=20, out_dir=Path("sites/a"), seed=0))

Cohort differences live in :mod:`.cohorts` only; :func:`sample_patients` draws patients, nodules,
malignancy, growth and Lung-RADS without rendering (cheap cohort statistics).
"""

from .cohorts import PROFILES, CohortProfile, ScannerModel, get_profile
from .generator import GENERATOR, SynthConfig, SynthSummary, generate_site
from .nodules import NoduleShape, design_shape
from .patients import (
    NoduleSpec,
    NoduleState,
    PatientCase,
    exam_category,
    nodule_states,
    sample_patient,
    sample_patients,
)
from .reports import public_report_corpus, write_report
from .scanner import ScanParams

__all__ = [
    "GENERATOR",
    "PROFILES",
    "CohortProfile",
    "NoduleShape",
    "NoduleSpec",
    "NoduleState",
    "PatientCase",
    "ScanParams",
    "ScannerModel",
    "SynthConfig",
    "SynthSummary",
    "design_shape",
    "exam_category",
    "generate_site",
    "get_profile",
    "nodule_states",
    "public_report_corpus",
    "sample_patient",
    "sample_patients",
    "write_report",
]

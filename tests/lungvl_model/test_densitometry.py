"""The emphysema sentence written from the measured LAA-950: threshold, wording, and what the checks read back."""

from __future__ import annotations

import math

import pytest

from lungvl_model.inference.anatomy import EMPHYSEMA_LAA
from lungvl_model.inference.densitometry import emphysema_sentence
from lungvl_model.inference.exam_facts import ExamFacts
from lungvl_model.inference.fact_check import check_report
from lungvl_model.text.labeler import label_report
from lungvl_model.text.report_labels import concept_vector


def test_states_the_measurement_on_either_side_of_the_rule_engine_threshold() -> None:
    assert EMPHYSEMA_LAA == 0.06  # the numbers below are worked for this threshold
    assert emphysema_sentence(0.0763) == "Emphysema by densitometry: 7.6 % of the lung volume below -950 HU (LAA-950)."
    assert emphysema_sentence(0.0303) == (
        "No emphysema by densitometry: 3.0 % of the lung volume below -950 HU (LAA-950)."
    )
    assert emphysema_sentence(0.06).startswith("No emphysema")  # at the threshold: not above it
    assert emphysema_sentence(0.0601).startswith("Emphysema")
    assert emphysema_sentence(0.0) is not None and emphysema_sentence(1.0) is not None


def test_no_measurement_no_sentence_and_bad_fractions_refused() -> None:
    assert emphysema_sentence(None) is None
    assert emphysema_sentence(math.nan) is None
    for bad in (-0.01, 1.5, 7.6, math.inf):
        with pytest.raises(ValueError, match=r"laa950 must be a fraction in \[0, 1\], got"):
            emphysema_sentence(bad)


@pytest.mark.parametrize("laa950", [0.0025, 0.0599, 0.0601, 0.1383])
def test_labeler_and_fact_check_read_it_back_as_measured(laa950: float) -> None:
    text = emphysema_sentence(laa950)
    assert text is not None
    present = laa950 > EMPHYSEMA_LAA
    labels = label_report(f"FINDINGS:\n{text}")
    assert labels.emphysema is present and concept_vector(labels)["emphysema"] is present
    assert labels.nodules == [] and labels.lung_rads is None  # no nodule, size or category read from it
    fc = check_report([text], [], ExamFacts(), rule_lung_rads="1", has_prior=False, emphysema_index=laa950)
    assert [(v.fact, v.verdict) for v in fc.verdicts] == [("emphysema", "supported")]
    # read against the other side of the threshold: "no emphysema" is contradicted, emphysema unsupported
    other = 0.03 if present else 0.09
    fc = check_report([text], [], ExamFacts(), rule_lung_rads="1", has_prior=False, emphysema_index=other)
    assert [(v.fact, v.verdict) for v in fc.verdicts] == [("emphysema", "unsupported" if present else "contradiction")]

"""Report text of the synthetic generator: content follows the true findings and a labeler can read it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lungvl_model.data.synth import PROFILES, exam_category, nodule_states, sample_patients, write_report
from lungvl_model.data.synth.reports import LOBE_NAMES

SIZE_RE = re.compile(r"\b\d+(?:\.\d)?(?: x \d+)? ?(?:mm|cm)\b")


@pytest.fixture(scope="module")
def reports() -> list[tuple[object, list, bool, str]]:
    out = []
    for profile in PROFILES.values():
        for case in sample_patients(profile, 120, seed=21):
            for prior in (True, False) if case.has_prior else (False,):
                states = nodule_states(case, prior=prior)
                rng = np.random.default_rng([case.streams[2], int(prior)])
                text = write_report(case, states, profile, rng, prior=prior, images={1: 17})
                out.append((case, states, prior, text))
    return out


def test_sections_and_category(reports) -> None:
    for case, states, prior, text in reports:
        assert text.index("FINDINGS:") < text.index("IMPRESSION:") < text.index("RECOMMENDATION:")
        cat = exam_category(states)
        assert re.search(rf"Lung-RADS (category )?{cat}:", text), text
        assert ("COMPARISON: None." in text) == (prior or not case.has_prior)
        if not states:
            assert re.search(r"No (suspicious )?pulmonary nodules", text), text


def test_nodule_sentences_carry_size_lobe_attenuation_and_comparison(reports) -> None:
    for case, states, prior, text in reports:
        findings = text.split("FINDINGS:")[1].split("IMPRESSION:")[0]
        for s in states:
            spec = s.spec
            lobe_words = (LOBE_NAMES[spec.lobe], spec.lobe)
            sentences = re.split(r"(?<=\.) ", findings)
            sentence = next((x for x in sentences if any(w in x for w in lobe_words) and SIZE_RE.search(x)), None)
            assert sentence is not None, (spec, findings)
        kinds = {s.spec.kind for s in states}
        if "part_solid" in kinds:
            assert "part-solid" in findings and "solid component" in findings
        if "non_solid" in kinds:
            assert "ground-glass" in findings
        if "calcified" in kinds:
            assert "calcifi" in findings
        if any(s.spec.margin == "spiculated" for s in states):
            assert "spicul" in findings
        contexts = {s.context for s in states}
        if "new" in contexts:
            assert re.search(r"new since|new compared|not present on the prior", findings)
        if "growing" in contexts:
            assert re.search(r"increased from|enlarged from|now larger", findings)
        if not prior and case.emphysema.kind != "none":
            assert "emphysema" in findings.lower() and "No emphysema" not in findings


def test_phrasing_varies() -> None:
    texts = [r[3] for r in _sample_texts()]
    assert any(re.search(r"\d+ x \d+ mm", t) for t in texts)
    assert any(re.search(r"\d\.\d cm", t) for t in texts)
    assert any(re.search(r"\b(RUL|RML|RLL|LUL|LLL)\b", t) for t in texts)
    assert any("right upper lobe" in t or "left upper lobe" in t for t in texts)
    assert len({t.split("FINDINGS:")[1].split(" ")[1] for t in texts}) > 3


def _sample_texts() -> list[tuple[object, object, object, str]]:
    profile = PROFILES["referral"]
    out = []
    for case in sample_patients(profile, 60, seed=3):
        states = nodule_states(case)
        text = write_report(case, states, profile, np.random.default_rng(case.streams[2]))
        out.append((case, states, False, text))
    return out


def test_same_stream_same_text() -> None:
    profile = PROFILES["screening"]
    case = sample_patients(profile, 3, seed=1)[2]
    states = nodule_states(case)
    a = write_report(case, states, profile, np.random.default_rng(5))
    b = write_report(case, states, profile, np.random.default_rng(5))
    assert a == b


def test_report_labeler_reads_the_reports(reports) -> None:
    labeler = pytest.importorskip("lungvl_model.text.labeler")
    from lungvl_model.text.report_labels import dominant_nodule

    n = cat_ok = present_ok = emph_ok = lobe_ok = dom_n = 0
    for case, states, _, text in reports:
        lab = labeler.label_report(text)
        n += 1
        cat_ok += lab.lung_rads == exam_category(states)
        present_ok += lab.nodule_present == bool(states)
        emph_ok += bool(lab.emphysema) == (case.emphysema.kind != "none")
        if states:
            dom = dominant_nodule(lab)
            dom_n += 1
            lobe_ok += dom is not None and dom.lobe in {s.spec.lobe for s in states}
    assert cat_ok / n >= 0.95 and present_ok / n >= 0.95 and emph_ok / n >= 0.95
    assert lobe_ok / dom_n >= 0.9

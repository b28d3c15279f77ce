"""Fact check of generated report sentences against measured findings and exam facts.

Hand-written sentences with known verdicts, in the style of ``test_labeler_real_phrasing.py``: supported
statements in US/UK/telegraphic phrasing, tolerance edges, wrong lobe/type/category, "no nodules" with findings,
hallucinated patient and technique facts, technique facts that match the header, prior comparisons without a
prior; and the synthetic report generator's reports checked against their own ground truth.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import pytest

from lungvl_model.data.synth.cohorts import PROFILES
from lungvl_model.data.synth.patients import exam_category, nodule_states, sample_patient
from lungvl_model.data.synth.reports import LOBE_NAMES, write_report
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference import fact_patterns as FP
from lungvl_model.inference.exam_facts import ExamFacts
from lungvl_model.inference.fact_check import (
    FactCheck,
    FactCheckConfig,
    check_report,
    fact_count_metrics,
    fact_metrics,
    split_report,
)
from lungvl_model.inference.findings import Finding
from lungvl_model.inference.unmeasured import without_margin


def finding(index, longest, short, lobe, type_="solid", calcified=False, lung_rads="", **kw) -> Finding:
    mean = (longest + short) / 2
    return Finding(
        centroid_zyx=(0.0, 0.0, 0.0), centroid_lps=(0.0, 0.0, 0.0), longest_diameter_mm=longest,
        short_axis_mm=short, mean_diameter_mm=mean, volume_mm3=math.pi * mean**3 / 6, solid_component_mm=0.0,
        type=type_, calcified=calcified, lobe=lobe, index=index, lung_rads=lung_rads, **kw,
    )  # fmt: skip


#: 1: RUL solid 9 x 7 (mean 8, 4A); 2: LLL ground glass 5 x 4 (2); 3: LUL (lingula) calcified 4 x 4 (1);
#: 4: RLL solid 24 x 20 (4B). Exam category 4B.
FINDINGS = [
    finding(1, 9.0, 7.0, "RUL", lung_rads="4A"),
    finding(2, 5.0, 4.0, "LLL", "non_solid", lung_rads="2"),
    finding(3, 4.0, 4.0, "LUL", calcified=True, lung_rads="1"),
    finding(4, 24.0, 20.0, "RLL", lung_rads="4B"),
]
RULE = "4B"
EXAM = ExamFacts(
    patient_age_years=64, patient_sex="F", slice_thickness_mm=2.5, slice_thickness_source="SliceThickness",
    kernel="STANDARD", contrast=False, kvp=120.0, study_date=dt.date(2024, 5, 2),
)  # fmt: skip
BARE = ExamFacts()

S, U, C = "supported", "unsupported", "contradiction"

# (sentence, {fact: verdict} expected exactly, finding index grounded or None)
CASES: list[tuple[str, dict[str, str], int | None]] = [
    # supported nodule statements, several phrasings
    ("There is an 8 mm solid nodule in the right upper lobe.", {"size": S, "lobe": S, "type": S}, 1),
    ("8 x 6 mm solid nodule in the right upper lobe.", {"size": S, "lobe": S, "type": S}, 1),
    ("A 0.8 cm nodule is seen in the RUL.", {"size": S, "lobe": S}, 1),
    ("8-mm solid nodule, right upper lobe.", {"size": S, "lobe": S, "type": S}, 1),
    ("Right upper lobe: 8 millimetre solid nodule.", {"size": S, "lobe": S, "type": S}, 1),
    ("A pure ground-glass nodule in the left lower lobe measuring 5 mm.", {"size": S, "lobe": S, "type": S}, 2),
    ("5 mm subsolid nodule in the left lower lobe.", {"size": S, "lobe": S, "type": S}, 2),
    ("A 4 mm calcified granuloma in the lingula.", {"size": S, "lobe": S, "calcified": S}, 3),
    ("A 9 mm solid nodule at the right apex.", {"size": S, "lobe": S, "type": S}, 1),
    ("2.4 x 2.0 cm solid mass in the right lower lobe.", {"size": S, "lobe": S, "type": S}, 4),
    # tolerance edges: max(1.5 mm, 15 %) of a measured diameter
    ("A 10.5 mm nodule in the right upper lobe.", {"size": S, "lobe": S}, 1),  # |10.5 - 9| = 1.5
    ("A 10.6 mm nodule in the right upper lobe.", {"size": C, "lobe": S}, 1),  # 1.6 > 1.5 from 9; 2.6 from 8
    ("A 27.6 mm nodule in the right lower lobe.", {"size": S, "lobe": S}, 4),  # 15 % of 24 = 3.6
    ("A 27.7 mm nodule in the right lower lobe.", {"size": C, "lobe": S}, 4),
    ("9 x 3 mm solid nodule in the right upper lobe.", {"size": C, "lobe": S, "type": S}, 1),  # short axis 7
    # one number is the mean or longest diameter, never the short axis alone (24 x 20, mean 22)
    ("An 18 mm solid nodule in the right lower lobe.", {"size": C, "lobe": S, "type": S}, 4),
    ("A 19 mm solid nodule in the right lower lobe.", {"size": S, "lobe": S, "type": S}, 4),  # 15 % of 22 = 3.3
    # wrong lobe, type, calcification, category
    ("8 mm solid nodule in the left lower lobe.", {"size": S, "lobe": C, "type": S}, 1),
    ("A 9 mm ground-glass nodule in the right upper lobe.", {"size": S, "lobe": S, "type": C}, 1),
    ("A 24 mm part-solid nodule in the right lower lobe.", {"size": S, "lobe": S, "type": C}, 4),
    ("A 9 mm calcified nodule in the right upper lobe.", {"size": S, "lobe": S, "calcified": C}, 1),
    ("Lung-RADS 4B.", {"lung_rads": S}, None),
    ("Lung-RADS category 2: benign appearance or behavior.", {"lung_rads": C, "lung_rads_descriptor": S}, None),
    # the category and the descriptor written with it must name the same category
    ("Lung-RADS category 4B: negative.", {"lung_rads": S, "lung_rads_descriptor": C}, None),
    ("Lung-RADS 4B - very suspicious.", {"lung_rads": S, "lung_rads_descriptor": S}, None),
    ("Lung-RADS 4B: probably benign appearance.", {"lung_rads": S, "lung_rads_descriptor": C}, None),
    ("9 mm solid nodule in the right upper lobe, Lung-RADS 4A.", {"size": S, "lobe": S, "type": S, "lung_rads": S}, 1),
    # presence and counts
    ("No pulmonary nodules.", {"nodule_present": C}, None),
    ("The lungs are clear.", {"nodule_present": C}, None),
    ("No suspicious pulmonary nodules.", {"nodule_present": C}, None),  # nodule 4 is 4B
    ("The lungs are otherwise clear.", {}, None),
    ("Four pulmonary nodules are identified.", {"nodule": S, "nodule_count": S}, None),
    ("Two pulmonary nodules are identified.", {"nodule": S, "nodule_count": C}, None),
    # a nodule that matches no finding
    ("A 15 mm spiculated nodule in the right middle lobe.", {"nodule": U}, None),
    # patient facts: the exam gives age 64 and sex F, no smoking history
    ("64-year-old woman.", {"age": S, "sex": S}, None),
    ("72 yo M.", {"age": C, "sex": C}, None),
    ("Former smoker with a 30 pack-year history.", {"smoking": U, "pack_years": U}, None),
    # technique facts
    ("CT of the chest without intravenous contrast, reconstructed at 2.5 mm with a soft tissue kernel.",
     {"contrast": S, "slice_thickness": S, "kernel": S}, None),
    ("Non-contrast CT, 120 kVp.", {"contrast": S, "kvp": S}, None),
    ("Contrast-enhanced CT with 1.25 mm slices and a bone algorithm.",
     {"contrast": C, "slice_thickness": C, "kernel": C}, None),
    ("Low-dose technique, CTDIvol 1.8 mGy.", {"low_dose": U, "ctdi": U}, None),
    ("Coronal and sagittal reformats were obtained.", {"reconstruction": U}, None),
    # comparison with a prior when there is none
    ("The 9 mm right upper lobe nodule is stable.", {"size": S, "lobe": S, "prior": U}, 1),
    ("A new 5 mm ground-glass nodule in the left lower lobe.", {"size": S, "lobe": S, "type": S, "prior": U}, 2),
    ("Compared with the prior CT of March 3, 2023, no change.", {"prior": U, "prior_date": U}, None),
    ("No new or enlarging nodules.", {"prior": U}, None),
    ("No prior studies are available for comparison.", {"prior": S}, None),
]  # fmt: skip


def verdicts(fc: FactCheck) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in fc.verdicts:
        assert v.fact not in out, f"two verdicts for {v.fact}: {fc.verdicts}"
        out[v.fact] = v.verdict
    return out


@pytest.mark.parametrize(("text", "expected", "grounded"), CASES, ids=[c[0][:40] for c in CASES])
def test_sentence_verdicts(text, expected, grounded):
    fc = check_report([text], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)
    assert verdicts(fc) == expected
    found = {v.finding for v in fc.verdicts if v.fact in ("size", "lobe", "type", "calcified")}
    assert found == ({grounded} if grounded is not None else set())


@dataclass
class Generated:
    text: str
    nodule: int | None = None
    section: str = ""  # narrative.Sentence: "findings", "impression" or "" (free text)


@pytest.mark.parametrize("section", ["", "findings", "impression"])
def test_sections_of_generated_sentences(section):
    fc = check_report([Generated("Two pulmonary nodules.", section=section)], FINDINGS, EXAM, rule_lung_rads=RULE,
                      has_prior=False)  # fmt: skip
    assert verdicts(fc) == {"nodule": S, "nodule_count": C}
    # a recommendation speaks of a future exam: its technique is not this exam's, its nodules are not read
    text = "LDCT in 3 months; PET/CT may be considered if there is a >= 8 mm solid nodule."
    rec = check_report(
        [Generated(text, section="recommendation")], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False
    )
    assert rec.verdicts == ()


def test_grounding_index_and_ordinal_win_over_the_best_match():
    # the attention grounding says nodule 2: the RUL/9 mm/solid statement contradicts it on every attribute
    fc = check_report(
        [Generated("A 9 mm solid nodule in the right upper lobe.", nodule=2)], FINDINGS, EXAM,
        rule_lung_rads=RULE, has_prior=False,
    )  # fmt: skip
    assert verdicts(fc) == {"size": C, "lobe": C, "type": C}
    assert {v.finding for v in fc.verdicts} == {2}
    assert fc.defer and len(fc.defer_reasons) == 3 and "nodule 2" in fc.defer_reasons[0]
    named = check_report(["Nodule 2 is solid."], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)
    assert verdicts(named) == {"type": C} and named.verdicts[0].measured == "non_solid"


def test_no_findings():
    fc = check_report(
        ["A 6 mm nodule in the right upper lobe.", "No pulmonary nodules.", "Lung-RADS 1."], [], BARE,
        rule_lung_rads="1", has_prior=False,
    )  # fmt: skip
    assert [verdicts(FactCheck((s,))) for s in fc.sentences] == [{"nodule": U}, {"nodule_present": S}, {"lung_rads": S}]


def test_prior_comparisons_with_a_prior():
    prior_findings = [
        finding(1, 9.0, 7.0, "RUL", lung_rads="4A", context="stable", prior_mean_diameter_mm=7.8, growth_mm=0.2),
        finding(2, 5.0, 4.0, "LLL", "non_solid", lung_rads="2", context="new"),
    ]
    exam = ExamFacts(study_date=dt.date(2024, 5, 2), prior_study_date=dt.date(2023, 5, 1))
    cases = [
        ("The 8 mm right upper lobe nodule is stable since 2023-05-01.",
         {"size": S, "lobe": S, "comparison": S, "prior": S, "prior_date": S}),
        ("The right upper lobe nodule has increased in size.", {"lobe": S, "comparison": C, "prior": S}),
        ("New 5 mm ground-glass nodule in the left lower lobe.",
         {"size": S, "lobe": S, "type": S, "comparison": S, "prior": S}),
        ("Compared with the CT of 2022-01-01.", {"prior": S, "prior_date": C}),
        ("No prior studies for comparison.", {"prior": C}),
    ]  # fmt: skip
    for text, expected in cases:
        fc = check_report([text], prior_findings, exam, rule_lung_rads="4A", has_prior=True)
        assert verdicts(fc) == expected, text


def test_cleaned_text_drops_exactly_the_unsupported_sentences():
    sentences = [
        "64-year-old woman with a 40 pack-year smoking history.",  # pack-years: unsupported -> dropped
        "There is an 8 mm solid nodule in the right upper lobe.",  # supported
        "8 mm solid nodule in the left lower lobe.",  # contradiction: kept, defers
        "Reconstructed at 1.25 mm with a LUNG kernel.",  # contradictions only: kept
        "Stable since the prior examination.",  # no prior: dropped
        "The heart is normal in size.",  # no fact: kept
    ]
    fc = check_report(sentences, FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)
    assert fc.kept_sentences == [sentences[i] for i in (1, 2, 3, 5)]
    assert fc.cleaned_text == " ".join(sentences[i] for i in (1, 2, 3, 5))
    assert [s.status for s in fc.sentences] == [U, S, C, C, U, "no_fact"]
    assert (fc.n_unsupported, fc.n_contradictions) == (3, 3)  # pack-years + smoking + prior; lobe, thickness, kernel
    assert fc.defer and len(fc.defer_reasons) == 3
    assert "'LLL'" in fc.defer_reasons[0] and "'RUL'" in fc.defer_reasons[0]
    json.dumps(fc.to_dict())


def test_fact_metrics_hand_computed():
    a = check_report(["72 yo M."], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)  # 2 contradictions
    b = check_report(["Low-dose CT.", "No new nodules."], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)
    c = check_report(["Lung-RADS 4B."], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)
    assert (a.n_contradictions, a.n_unsupported, b.n_contradictions, b.n_unsupported) == (2, 0, 0, 2)
    m = fact_metrics([a, b, c])
    assert m == {
        "n_reports": 3.0,
        "unsupported_per_report": 2 / 3,
        "contradictions_per_report": 2 / 3,
        "share_with_unsupported": 1 / 3,
        "share_with_contradiction": 1 / 3,
    }
    empty = fact_metrics([])
    assert empty["n_reports"] == 0.0 and math.isnan(empty["unsupported_per_report"])
    # evaluate's per-study columns: NaN for a study without generated text
    counts = fact_count_metrics([0, 3, math.nan, 1], [1, 0, math.nan, 0])
    assert counts == {
        "n_reports": 3.0,
        "unsupported_per_report": 4 / 3,
        "contradictions_per_report": 1 / 3,
        "share_with_unsupported": 2 / 3,
        "share_with_contradiction": 1 / 3,
    }
    with pytest.raises(ValueError, match="2 unsupported counts vs 1"):
        fact_count_metrics([0, 1], [0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size_abs_mm": -1.0}, "size_abs_mm"), ({"size_rel": 1.0}, "size_rel"), ({"kvp_abs": float("inf")}, "kvp_abs")],
)
def test_invalid_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactCheckConfig(**kwargs)


def test_config_round_trip():
    cfg = FactCheckConfig(size_abs_mm=1.0, age_years=1)
    assert FactCheckConfig(**cfg.to_dict()) == cfg


def test_tolerance_config_changes_the_verdict():
    strict = FactCheckConfig(size_abs_mm=0.5, size_rel=0.0)
    fc = check_report(["A 10 mm nodule in the right upper lobe."], FINDINGS, EXAM, rule_lung_rads=RULE,
                      has_prior=False, tolerance=strict)  # fmt: skip
    assert verdicts(fc) == {"size": C, "lobe": S}


def test_one_string_is_refused():
    with pytest.raises(TypeError, match="split_report"):
        check_report("No nodules.", [], BARE, rule_lung_rads=None, has_prior=False)


@pytest.mark.parametrize(
    "text",
    ["1" * 200_000, " " * 200_000, "no " * 60_000, "12 mm " * 30_000, "a" * 200_000 + " kernel", "-" * 200_000,
     "Jan 1 " * 30_000, "two " * 50_000 + "nodules", "smoking " * 25_000],
)  # fmt: skip
def test_patterns_are_linear(text):
    t0 = time.perf_counter()
    for fn in (FP.patient_facts, FP.technique_facts, FP.prior_facts, FP.count_facts, FP.date_facts):
        fn(text)
    assert time.perf_counter() - t0 < 5.0  # a quadratic pattern takes minutes on 200 000 characters


def _synthetic_reports(n: int):
    """``n`` synthetic reports with their true findings and exam facts (header + site metadata)."""
    names = sorted(PROFILES)
    out = []
    i = 0
    while len(out) < n:
        profile = PROFILES[names[i % len(names)]]
        case = sample_patient(profile, 91_000, i)
        i += 1
        for prior in (True, False) if case.has_prior else (False,):
            states = nodule_states(case, prior=prior)
            text = write_report(case, states, profile, np.random.default_rng([case.streams[1 if prior else 0], 7]),
                                prior=prior)  # fmt: skip
            scan = case.prior_scan if prior else case.scan
            date = case.prior_date if prior else case.study_date
            meta = {"PatientAge": f"{case.age - prior:03d}Y", "PatientSex": case.sex,
                    "StudyDate": date.strftime("%Y%m%d"), "StudyDescription": profile.study_description,
                    **scan.dicom_tags()}  # fmt: skip
            has_prior = case.has_prior and not prior
            # the synthetic protocols are non-contrast; the site's protocol (not the header) says so
            site = {"smoking_pack_years": case.pack_years, "contrast": False,
                    "prior_study_date": case.prior_date.isoformat() if has_prior else ""}  # fmt: skip
            volume = CTVolume(np.zeros((2, 2, 2), np.float32), (scan.slice_thickness_mm, 0.7, 0.7), meta=meta)
            exam = ExamFacts.from_volume(volume, site)
            findings = [
                finding(k, s.longest_diameter_mm, s.short_axis_mm, s.spec.lobe, s.spec.type,
                        s.spec.kind == "calcified", s.lung_rads, context=s.context,
                        prior_mean_diameter_mm=s.prior_mean_mm, growth_mm=s.growth_mm)
                for k, s in enumerate(states, start=1)
            ]  # fmt: skip
            laa950 = 0.10 if case.emphysema.kind != "none" else 0.01  # an LAA-950 either side of EMPHYSEMA_LAA
            out.append((text, findings, exam, exam_category(states), has_prior, laa950))
    return out[:n]


def test_synthetic_reports_agree_with_their_own_truth():
    reports = _synthetic_reports(120)
    checks = [
        check_report(split_report(t), f, e, rule_lung_rads=r, has_prior=p, emphysema_index=laa)
        for t, f, e, r, p, laa in reports
    ]
    m = fact_metrics(checks)
    assert m["contradictions_per_report"] == 0.0, [c.defer_reasons for c in checks if c.defer]
    # a finding holds no margin (nothing measures one), so the reports' margins are the only unsupported facts
    unsupported = [v for c in checks for v in c.verdicts if v.verdict == "unsupported"]
    assert {v.fact for v in unsupported} == {"margin"} and all(v.finding is not None for v in unsupported)
    checks = [
        check_report([dataclasses.replace(x, text=without_margin(x.text)) for x in split_report(t)], f, e,
                     rule_lung_rads=r, has_prior=p, emphysema_index=laa)
        for t, f, e, r, p, laa in reports
    ]  # fmt: skip
    m = fact_metrics(checks)
    assert m["contradictions_per_report"] == 0.0 and m["unsupported_per_report"] == 0.0  # margins taken out
    facts = {v.fact for c in checks for v in c.verdicts}
    assert facts >= {
        "size",
        "lobe",
        "type",
        "lung_rads",
        "age",
        "sex",
        "slice_thickness",
        "kernel",
        "contrast",
        "prior",
        "emphysema",
    }
    # the same reports with every lobe named as another one: the check must see it (a nodule moved onto another
    # finding of similar size and type in that lobe may go unseen, so not every report need be caught)
    swap = {"RUL": "LLL", "RML": "LUL", "RLL": "LUL", "LUL": "RLL", "LLL": "RUL"}
    names = {v: k for k, v in LOBE_NAMES.items()}
    lobe_re = re.compile("|".join([*LOBE_NAMES.values(), *LOBE_NAMES]))
    caught = with_nodules = 0
    for text, findings, exam, rule, has_prior, laa in reports:
        if not findings:
            continue
        with_nodules += 1
        wrong = lobe_re.sub(lambda m: LOBE_NAMES[swap[names.get(m.group(), m.group())]], text)
        fc = check_report(
            split_report(wrong), findings, exam, rule_lung_rads=rule, has_prior=has_prior, emphysema_index=laa
        )
        caught += fc.n_contradictions + fc.n_unsupported > 0
    assert with_nodules >= 20 and caught >= 0.9 * with_nodules, (caught, with_nodules)


def test_descriptor_contradiction_names_the_category_it_belongs_to() -> None:
    fc = check_report(["2. Lung-RADS category 4B: negative."], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False)
    assert fc.defer and fc.defer_reasons == [
        "sentence 1 '2. Lung-RADS category 4B: negative.' writes Lung-RADS '4B: negative': that descriptor is "
        "category 1's"
    ]


@pytest.mark.parametrize(
    ("text", "laa950", "verdict"),
    [
        ("Centrilobular emphysema.", 0.12, "supported"),
        ("Mild paraseptal emphysema in the upper lobes.", 0.03, "unsupported"),  # nothing measured backs it
        ("Centrilobular emphysema.", None, "unsupported"),
        ("No emphysema.", 0.03, "supported"),
        ("No emphysema.", 0.12, "contradiction"),
    ],
)
def test_emphysema_statements_against_the_measured_index(text: str, laa950: float | None, verdict: str) -> None:
    fc = check_report([text], FINDINGS, EXAM, rule_lung_rads=RULE, has_prior=False, emphysema_index=laa950)
    got = [v for v in fc.verdicts if v.fact == "emphysema"]
    assert [v.verdict for v in got] == [verdict]
    assert fc.kept_sentences == ([] if verdict == "unsupported" else [text])
    # the impression's numbered item is read the same way (a synthetic report's "2. Paraseptal emphysema.")
    item = check_report(
        [Generated("2. Paraseptal emphysema.", section="impression")], FINDINGS, EXAM, rule_lung_rads=RULE,
        has_prior=False, emphysema_index=0.02,
    )  # fmt: skip
    assert [v.verdict for v in item.verdicts if v.fact == "emphysema"] == ["unsupported"]

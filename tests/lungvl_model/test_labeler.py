"""Rule-based chest CT report labeler: realistic phrasings, negation, extrapulmonary findings, batch, F1."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungvl_model.text import (
    CONCEPT_KEYS,
    LabeledNodule,
    ReportLabels,
    concept_counts,
    concept_f1,
    concept_vector,
    label_report,
    label_reports_jsonl,
    size_bucket,
)

NODULE_KEYS = ("size_mm", "lobe", "type", "margin", "calcified")


def only_nodule(text: str) -> dict:
    labels = label_report(text)
    assert labels.nodule_present is True, text
    assert len(labels.nodules) == 1, (text, labels.nodules)
    return labels.nodules[0].to_dict()


def nod(size, lobe, type=None, margin=None, calcified=None) -> dict:
    return {"size_mm": size, "lobe": lobe, "type": type, "margin": margin, "calcified": calcified}


# (text, expected nodule) -- exactly one nodule per text
SINGLE_NODULE_CASES = [
    ("There is a 6 x 4 mm solid nodule in the right upper lobe.", nod(6.0, "RUL", type="solid")),
    (
        "A 1.2 cm spiculated mass in the left upper lobe apicoposterior segment.",
        nod(12.0, "LUL", margin="spiculated"),
    ),
    (
        "0.8 x 0.6 cm ground-glass opacity in the superior segment of the right lower lobe.",
        nod(8.0, "RLL", type="non_solid"),
    ),
    (
        "12mm part-solid nodule in the lingula with a 4 mm solid component.",
        nod(12.0, "LUL", type="part_solid"),
    ),
    ("6-mm well-circumscribed nodule in the middle lobe.", nod(6.0, "RML", margin="smooth")),
    ("4 millimeter noncalcified nodule, left lower lobe.", nod(4.0, "LLL", calcified=False)),
    ("Right upper lobe nodule measuring up to 7 mm.", nod(7.0, "RUL")),
    ("Calcified granuloma in the RLL.", nod(None, "RLL", calcified=True)),
    ("Subcentimeter nodule in the RUL.", nod(None, "RUL")),
    ("Sub-centimetre nodule in the lingula.", nod(None, "LUL")),
    ("There is a 6 x 4 x 5 mm nodule in the LLL.", nod(6.0, "LLL")),
    ("1.2 x 0.8 cm lobulated nodule, right middle lobe.", nod(12.0, "RML", margin="lobulated")),
    ("A pure ground-glass nodule in the left upper lobe measures 9 mm.", nod(9.0, "LUL", type="non_solid")),
    ("8 mm GGN in the RUL.", nod(8.0, "RUL", type="non_solid")),
    ("Semi-solid nodule in the RLL, 14 mm.", nod(14.0, "RLL", type="part_solid")),
    (
        "Mixed attenuation nodule in the left lower lobe measuring 11 x 9 mm.",
        nod(11.0, "LLL", type="part_solid"),
    ),
    (
        "Subsolid nodule in the left upper lobe with a 3 mm solid component, total size 11 mm.",
        nod(11.0, "LUL", type="part_solid"),
    ),
    ("8 mm ground glass nodule in the RUL with no solid component.", nod(8.0, "RUL", type="non_solid")),
    (
        "There is a 2.3cm spiculated soft tissue mass in the left upper lobe.",
        nod(23.0, "LUL", type="solid", margin="spiculated"),
    ),
    (
        "Well-defined 5 mm solid nodule in the posterior segment of the right upper lobe.",
        nod(5.0, "RUL", type="solid", margin="smooth"),
    ),
    (
        "Sharply marginated 7 mm nodule in the anterior basal segment of the right lower lobe, without calcification.",
        nod(7.0, "RLL", margin="smooth", calcified=False),
    ),
    (
        "Nodule in the RUL with popcorn calcification, consistent with a hamartoma.",
        nod(None, "RUL", calcified=True),
    ),
    ("Nodular opacity in the right middle lobe measuring 7 mm.", nod(7.0, "RML")),
    ("Focal ground glass opacity in the left upper lobe, 9 x 7 mm.", nod(9.0, "LUL", type="non_solid")),
    ("There is a nodule measuring approx. 6 mm in the RUL.", nod(6.0, "RUL")),
    ("Tiny 2-3 mm nodules in the right lower lobe.", nod(3.0, "RLL")),
    ("A 5 mm nodule in the RUL, likely a granuloma.", nod(5.0, "RUL")),
    (
        "Irregular spiculated margins are seen in the 15 mm lt upper lobe nodule.",
        nod(15.0, "LUL", margin="spiculated"),
    ),
    (
        "6mm soft tissue attenuation nodule in the upper lobe of the right lung.",
        nod(6.0, "RUL", type="solid"),
    ),
    ("A partly solid nodule in the lingular segment measures 1.6 cm.", nod(16.0, "LUL", type="part_solid")),
    ("Non-calcified, non-spiculated 5 mm nodule in the RML.", nod(5.0, "RML", calcified=False)),
    ("The 7 mm RLL nodule (series 4, image 88) is partially calcified.", nod(7.0, "RLL", calcified=True)),
]


@pytest.mark.parametrize(("text", "expected"), SINGLE_NODULE_CASES)
def test_single_nodule_fields(text: str, expected: dict) -> None:
    assert only_nodule(text) == expected


def test_dims_are_kept_in_mm() -> None:
    (n,) = label_report("1.2 x 0.8 x 1.0 cm solid nodule in the right lower lobe.").nodules
    assert n.dims_mm == (12.0, 8.0, 10.0) and n.size_mm == 12.0
    (n,) = label_report("Left lower lobe nodule 12 mm x 8 mm.").nodules
    assert n.dims_mm == (12.0, 8.0)


# (text, nodule_present)
PRESENCE_CASES = [
    ("No pulmonary nodules.", False),
    ("The previously described nodule is not seen.", False),
    ("No suspicious pulmonary nodules or masses.", False),
    ("Lungs are clear without focal consolidation or nodule.", False),
    ("No suspicious nodule.", False),
    ("Negative for pulmonary nodules.", False),
    ("The lungs are free of nodules and masses.", False),
    ("Previously noted left lower lobe nodule is no longer visualized.", False),
    ("The previously seen 5 mm RLL nodule has resolved.", False),
    ("Lungs: Clear.", False),
    ("No new or enlarging nodules.", None),
    ("No new pulmonary nodules.", None),
    ("No additional nodules identified.", None),
    ("A small nodule in the RLL cannot be excluded.", None),
    ("Mild bibasilar atelectasis.", None),
    ("Linear opacity in the lingula compatible with scarring.", None),
    ("Patchy ground-glass opacities in both lower lobes, likely infectious.", None),
    ("No nodule is seen in the RUL, but there is a 4 mm nodule in the LLL.", True),
    ("Stable 4 mm RUL nodule. No new or enlarging nodules.", True),
    ("Lungs are clear apart from a 3 mm perifissural nodule along the right major fissure.", True),
    ("Scattered calcified granulomas.", True),
    ("Status post right upper lobectomy. No suspicious nodules.", False),
]


@pytest.mark.parametrize(("text", "present"), PRESENCE_CASES)
def test_nodule_presence_and_negation(text: str, present) -> None:
    labels = label_report(text)
    assert labels.nodule_present is present, labels
    if present is not True:
        assert labels.nodules == []


EMPHYSEMA_CASES = [
    ("Mild centrilobular emphysema.", True),
    ("Paraseptal emphysematous changes in both upper lobes.", True),
    ("Moderate centrilobular and paraseptal emphysema, upper lobe predominant.", True),
    ("No emphysema.", False),
    ("No evidence of emphysema.", False),
    ("No emphysematous change.", False),
    ("Emphysema is not seen.", False),
    ("No pleural effusion, mild centrilobular emphysema.", True),
    ("Mild emphysema without suspicious nodules.", True),
    ("No suspicious nodules and mild emphysema.", True),
    ("No pulmonary nodules, masses or emphysema.", False),
    ("There is a 4 mm nodule in the RUL.", None),
]


@pytest.mark.parametrize(("text", "emphysema"), EMPHYSEMA_CASES)
def test_emphysema(text: str, emphysema) -> None:
    assert label_report(text).emphysema is emphysema


COMPARISON_CASES = [
    ("Stable 4 mm RUL nodule.", "stable"),
    ("The 5 mm right upper lobe nodule is unchanged since 2019.", "stable"),
    ("No significant change in the 5 mm nodule in the lingula.", "stable"),
    ("6 mm nodule RUL (previously 6 mm).", "stable"),
    ("Left upper lobe nodule measures 5 mm, stable since March 2021.", "stable"),
    (
        "Interval increase in size of the LUL part-solid nodule, now 14 x 10 mm (previously 10 x 8 mm).",
        "growing",
    ),
    ("The RML nodule has increased in size from 6 mm to 9 mm.", "growing"),
    ("Enlarging 7 mm right upper lobe solid nodule.", "growing"),
    ("There is interval growth of the 9 mm RLL nodule.", "growing"),
    ("The LLL nodule has grown and now measures 12 mm.", "growing"),
    ("RUL nodule now 8 mm, previously 5 mm.", "growing"),
    ("New 7 mm ground glass nodule in the left lower lobe.", "new"),
    ("A 6 mm nodule in the RML, not present on the prior study.", "new"),
    ("Newly developed 5 mm solid nodule in the lingula.", "new"),
    ("11 mm solid LLL nodule, new since the previous CT of 2021.", "new"),
    ("There is a 6 mm nodule in the right upper lobe.", None),
    ("No new or enlarging nodules.", None),
    (
        "Pulmonary nodule in the RUL measures 8 mm. It has increased in size compared to the prior exam.",
        "growing",
    ),
    ("New 4 mm RLL nodule. Stable 6 mm LUL nodule.", "new"),
    ("Enlarged mediastinal lymph nodes. 5 mm RUL nodule.", None),
]


@pytest.mark.parametrize(("text", "comparison"), COMPARISON_CASES)
def test_comparison(text: str, comparison) -> None:
    assert label_report(text).comparison == comparison


def test_per_nodule_comparison() -> None:
    labels = label_report(
        "Right lower lobe: 6 mm part solid nodule, new since prior.\nLeft upper lobe: 4 mm nodule, stable."
    )
    assert [(n.lobe, n.type, n.comparison) for n in labels.nodules] == [
        ("RLL", "part_solid", "new"),
        ("LUL", None, "stable"),
    ]
    assert labels.comparison == "new"


LUNG_RADS_CASES = [
    ("Lung-RADS 4A.", "4A", False),
    ("Lung-RADS category 2.", "2", False),
    ("LungRADS: 3", "3", False),
    ("Lung RADS v2022 category 4B", "4B", False),
    ("Lung-RADS 4X", "4X", False),
    ("Lung-RADS category 2S. Incidental coronary artery calcification.", "2", True),
    ("LUNG-RADS CATEGORY: 1", "1", False),
    ("Lung-RADS v1.1 Category 2 - Benign appearance or behavior.", "2", False),
    ("ACR Lung-RADS assessment: 0 (incomplete).", "0", False),
    ("Lung-RADS 3, S modifier for moderate coronary calcification.", "3", True),
    ("Previously Lung-RADS 3. Now Lung-RADS 2.", "2", False),
    ("No Lung-RADS category assigned.", None, False),
]


@pytest.mark.parametrize(("text", "category", "s_mod"), LUNG_RADS_CASES)
def test_lung_rads(text: str, category, s_mod: bool) -> None:
    labels = label_report(text)
    assert (labels.lung_rads, labels.s_modifier) == (category, s_mod)


@pytest.mark.parametrize(
    "text",
    [
        "1.5 cm nodule in the left lobe of the thyroid gland.",
        "There is a 2 cm right thyroid nodule.",
        "Left adrenal nodule measuring 1.5 cm, likely adenoma.",
        "1.2 cm hypodense lesion in the liver, too small to characterize.",
        "A 2 cm right breast mass is partially imaged.",
        "Right paratracheal lymph node measures 12 mm.",
        "Prominent mediastinal lymph nodes up to 9 mm.",
        "Sclerotic lesion in the T8 vertebral body.",
        "Upper abdomen: 1.1 cm hypoattenuating lesion, likely a cyst.",
        "Thyroid: 1.5 cm nodule in the right lobe.",
        "Subcutaneous nodule in the left chest wall, 8 mm.",
    ],
)
def test_extrapulmonary_findings_are_not_nodules(text: str) -> None:
    labels = label_report(text)
    assert labels.nodules == []
    assert labels.nodule_present is None


def test_thyroid_nodule_with_negated_lung_nodules() -> None:
    labels = label_report("Thyroid: 1.5 cm nodule in the right lobe. Lungs: no suspicious nodules. Mild emphysema.")
    assert (labels.nodule_present, labels.nodules, labels.emphysema) == (False, [], True)


def test_pulmonary_and_adrenal_nodule_in_one_sentence() -> None:
    labels = label_report("There is a 4 mm nodule in the right lower lobe and a 1 cm left adrenal nodule.")
    assert [n.to_dict() for n in labels.nodules] == [
        {"size_mm": 4.0, "lobe": "RLL", "type": None, "margin": None, "calcified": None}
    ]


MULTI_CASES = [
    ("A 5 mm nodule in the RUL and a 7 mm nodule in the LLL.", [(5.0, "RUL"), (7.0, "LLL")]),
    (
        "There are two nodules: a 4 mm nodule in the RML and a 6 mm nodule in the LUL.",
        [(4.0, "RML"), (6.0, "LUL")],
    ),
    ("Small nodules in the RUL and LLL measuring 3 mm and 5 mm respectively.", [(3.0, "RUL"), (5.0, "LLL")]),
    (
        "In the RUL there is a 5 mm nodule and in the left lower lobe a 9 mm nodule.",
        [(5.0, "RUL"), (9.0, "LLL")],
    ),
    (
        "6 mm solid nodule in the right upper lobe, previously 5 mm, and a 3 mm calcified nodule in the LLL.",
        [(6.0, "RUL"), (3.0, "LLL")],
    ),
    (
        "Multiple bilateral pulmonary nodules, the largest measuring 9 mm in the left lower lobe.",
        [(9.0, "LLL")],
    ),
]


@pytest.mark.parametrize(("text", "expected"), MULTI_CASES)
def test_multi_nodule_sentences(text: str, expected) -> None:
    assert [(n.size_mm, n.lobe) for n in label_report(text).nodules] == expected


def test_attributes_stay_with_their_nodule() -> None:
    labels = label_report(
        "There is a 6 mm spiculated solid nodule in the RUL and a 4 mm ground-glass nodule in the left lower lobe."
    )
    assert [(n.size_mm, n.lobe, n.type, n.margin) for n in labels.nodules] == [
        (6.0, "RUL", "solid", "spiculated"),
        (4.0, "LLL", "non_solid", None),
    ]


def test_dedup_findings_and_impression() -> None:
    report = (
        "FINDINGS: There is a 6 x 5 mm solid nodule in the right middle lobe, unchanged since 2019. "
        "Mild emphysema.\nIMPRESSION: Stable 6 mm RML nodule. Lung-RADS 2."
    )
    labels = label_report(report)
    assert [n.to_dict() for n in labels.nodules] == [
        {"size_mm": 6.0, "lobe": "RML", "type": "solid", "margin": None, "calcified": None}
    ]
    assert (labels.comparison, labels.lung_rads, labels.emphysema) == ("stable", "2", True)


def test_dedup_merges_partial_mentions_but_keeps_distinct_nodules() -> None:
    labels = label_report("Findings: RUL nodule. Impression: 6 mm nodule, Lung-RADS 2.")
    assert [(n.size_mm, n.lobe) for n in labels.nodules] == [(6.0, "RUL")]
    labels = label_report("Findings: 4 mm RUL nodule and 5 mm LLL nodule. Impression: Pulmonary nodules, stable.")
    assert [(n.size_mm, n.lobe) for n in labels.nodules] == [(4.0, "RUL"), (5.0, "LLL")]
    assert labels.comparison == "stable"
    labels = label_report("A 4 mm nodule in the RUL. Another 4 mm nodule in the RUL, more inferiorly.")
    assert len(labels.nodules) == 2


def test_coreference_to_previous_sentence() -> None:
    labels = label_report("Pulmonary nodule in the right upper lobe. This nodule is solid and measures 6 mm.")
    assert [n.to_dict() for n in labels.nodules] == [
        {"size_mm": 6.0, "lobe": "RUL", "type": "solid", "margin": None, "calcified": None}
    ]
    (n,) = label_report("There is an 8 mm solid nodule in the LLL. It is spiculated.").nodules
    assert n.margin == "spiculated"


US_REPORT = """EXAMINATION: CT CHEST LOW DOSE SCREENING
CLINICAL HISTORY: 64-year-old former smoker, 40 pack-years. Follow-up of RUL nodule.
COMPARISON: CT chest 03/12/2022.
TECHNIQUE: Low-dose axial images at 1.25 mm slice thickness.

FINDINGS:
Lungs and airways: Moderate centrilobular and paraseptal emphysema. There is a 7 x 5 mm solid nodule
in the right upper lobe (series 3, image 45), previously 5 mm, consistent with interval growth. A 3 mm
calcified granuloma in the left lower lobe is unchanged. No new nodules.
Pleura: No effusion.
Mediastinum: No lymphadenopathy. Mild coronary artery calcification.
Upper abdomen: 1.2 cm hypodense lesion in the liver, too small to characterize. Left adrenal nodule
measuring 1.5 cm.

IMPRESSION:
1. Enlarging 7 mm right upper lobe solid nodule. Lung-RADS 4A.
2. Moderate emphysema.
"""

UK_REPORT = """CT THORAX
Indication: ?lung cancer. Weight loss.
Report: There is a 2.3cm spiculated soft tissue mass in the left upper lobe abutting the
pleura, highly suspicious for a primary bronchogenic carcinoma. Enlarged left hilar lymph node.
No further pulmonary nodules. Background paraseptal emphysema. No pleural effusion.
Conclusion: Left upper lobe mass, suspicious for malignancy.
"""


def test_full_us_screening_report() -> None:
    labels = label_report(US_REPORT)
    assert labels.to_dict() == {
        "nodule_present": True,
        "emphysema": True,
        "nodules": [
            {"size_mm": 7.0, "lobe": "RUL", "type": "solid", "margin": None, "calcified": None},
            {"size_mm": 3.0, "lobe": "LLL", "type": None, "margin": None, "calcified": True},
        ],
        "comparison": "growing",
        "lung_rads": "4A",
    }
    assert labels.nodules[0].dims_mm == (7.0, 5.0)


def test_full_uk_report() -> None:
    labels = label_report(UK_REPORT)
    assert labels.to_dict() == {
        "nodule_present": True,
        "emphysema": True,
        "nodules": [{"size_mm": 23.0, "lobe": "LUL", "type": "solid", "margin": "spiculated", "calcified": None}],
        "comparison": None,
        "lung_rads": None,
    }


def test_normal_report() -> None:
    labels = label_report(
        "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. No emphysema.\n"
        "IMPRESSION: No acute cardiopulmonary process. Lung-RADS 1."
    )
    assert labels.to_dict() == {
        "nodule_present": False,
        "emphysema": False,
        "nodules": [],
        "comparison": None,
        "lung_rads": "1",
    }


def test_history_section_is_not_mined() -> None:
    labels = label_report("INDICATION: Follow-up of 8 mm RUL nodule, emphysema.\nFINDINGS: No pulmonary nodules.")
    assert (labels.nodule_present, labels.nodules, labels.emphysema) == (False, [], None)


def test_hard_wrapped_lines_and_bullets() -> None:
    labels = label_report("Impression:\n- Solid nodule in the\nRUL measuring 6\nmm.\n- Mild emphysema")
    assert [(n.size_mm, n.lobe, n.type) for n in labels.nodules] == [(6.0, "RUL", "solid")]
    assert labels.emphysema is True


def test_report_labels_to_dict_keys() -> None:
    d = label_report("5 mm RUL nodule. Lung-RADS 2.").to_dict()
    assert list(d) == ["nodule_present", "emphysema", "nodules", "comparison", "lung_rads"]
    assert list(d["nodules"][0]) == list(NODULE_KEYS)
    json.dumps(d)


# ---------------------------------------------------------------------------------------------------------
# JSONL batch
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_batch_with_malformed_lines() -> None:
    lines = [
        json.dumps({"id": "a", "text": "Stable 4 mm RUL nodule. Lung-RADS 2."}),
        "{not json",
        "",
        json.dumps(["a list"]),
        json.dumps({"id": "c"}),
        json.dumps({"text": "No nodules."}),
        json.dumps({"id": 7, "text": "No pulmonary nodules. No emphysema."}),
        json.dumps({"study_uid": "1.2.3", "text": "New 6 mm LLL nodule."}),
    ]
    out = list(label_reports_jsonl(lines))
    assert len(out) == 7  # the blank line is skipped
    ok = [rec for rec, err in out if err is None]
    errors = [err for rec, err in out if rec is None]
    assert [r["id"] for r in ok] == ["a", 7, "1.2.3"]
    assert ok[0] == {
        "id": "a",
        "nodule_present": True,
        "emphysema": None,
        "nodules": [{"size_mm": 4.0, "lobe": "RUL", "type": None, "margin": None, "calcified": None}],
        "comparison": "stable",
        "lung_rads": "2",
    }
    assert ok[1]["nodule_present"] is False and ok[1]["emphysema"] is False
    assert ok[2]["comparison"] == "new"
    assert errors[0].startswith("line 2: not valid JSON") and "{not json" in errors[0]
    assert errors[1].startswith("line 4: expected a JSON object, got list")
    assert errors[2].startswith("line 5: id 'c': 'text' missing") and "None" in errors[2]
    assert errors[3].startswith("line 6: 'id' missing") and "None" in errors[3]


# ---------------------------------------------------------------------------------------------------------
# Concept vector / F1
# ---------------------------------------------------------------------------------------------------------


def test_size_buckets() -> None:
    assert [size_bucket(v) for v in (None, 5.9, 6.0, 7.9, 8.0, 14.9, 15.0)] == [
        None, "<6", "6-8", "6-8", "8-15", "8-15", ">=15",
    ]  # fmt: skip


def test_concept_vector_uses_largest_nodule() -> None:
    labels = label_report("New 4 mm RLL nodule. 11 mm spiculated solid nodule in the left upper lobe. Mild emphysema.")
    assert concept_vector(labels) == {
        "nodule_present": True,
        "type": "solid",
        "margin": "spiculated",
        "calcified": None,
        "lobe": "LUL",
        "size_bucket": "8-15",
        "comparison": "new",
        "emphysema": True,
    }
    assert set(concept_vector(ReportLabels())) == set(CONCEPT_KEYS)


def test_concept_f1_sanity() -> None:
    ref = label_report("Enlarging 9 mm spiculated solid nodule in the right upper lobe. Mild emphysema.")
    assert concept_f1(ref, ref) == 1.0
    disjoint = ReportLabels(
        nodule_present=False,
        emphysema=False,
        nodules=[LabeledNodule(size_mm=3.0, lobe="LLL", type="non_solid", margin="smooth", calcified=True)],
        comparison="stable",
    )
    assert concept_f1(disjoint, ref) == 0.0
    partial = label_report("9 mm nodule in the right upper lobe.")  # present, lobe, size right; the rest unknown
    # gold: present, type, margin, lobe, bucket, comparison, emphysema (7); predicted 3, all hits
    assert concept_f1(partial, ref) == pytest.approx(2 * 1.0 * (3 / 7) / (1.0 + 3 / 7))
    assert concept_f1(ReportLabels(), ReportLabels()) == 1.0


def test_concept_counts_are_what_concept_f1_counts() -> None:
    ref = label_report("Enlarging 9 mm spiculated solid nodule in the right upper lobe. Mild emphysema.")
    pred = label_report("9 mm nodule in the left upper lobe. No emphysema.")
    counts = concept_counts(pred, ref)
    assert set(counts) == set(CONCEPT_KEYS)
    # present and size agree; lobe and emphysema are stated and wrong; type, margin, comparison not stated;
    # calcification is unknown in the reference (not gold)
    assert counts["nodule_present"] == (1, 1, 1) and counts["size_bucket"] == (1, 1, 1)
    assert counts["lobe"] == (0, 1, 1) and counts["emphysema"] == (0, 1, 1)
    assert counts["type"] == counts["margin"] == counts["comparison"] == (0, 0, 1)
    assert counts["calcified"] == (0, 0, 0)
    hits, predicted, gold = (sum(c[i] for c in counts.values()) for i in range(3))
    assert (hits, predicted, gold) == (2, 4, 7)
    precision, recall = hits / predicted, hits / gold
    assert concept_f1(pred, ref) == pytest.approx(2 * precision * recall / (precision + recall))


def test_concept_f1_ignores_slots_unknown_in_reference() -> None:
    ref = ReportLabels(nodule_present=False)
    pred = ReportLabels(nodule_present=False, emphysema=True)
    assert concept_f1(pred, ref) == 1.0
    assert concept_f1(ReportLabels(nodule_present=True), ref) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            "no nodule nodules mass 6 mm 1.2 cm x RUL left upper lobe . , ; : stable new emphysema not "
            "seen without calcified spiculated Lung-RADS 4A category 2S ground-glass part-solid the and "
            "IMPRESSION: \n thyroid it resolved previously from to 3-4 approx. e.g.".split(" ")
        ),
        max_size=40,
    ).map(" ".join)
    | st.text(max_size=200)
)
def test_never_raises_and_keeps_schema(text: str) -> None:
    d = label_report(text).to_dict()
    assert list(d) == ["nodule_present", "emphysema", "nodules", "comparison", "lung_rads"]
    assert d["lung_rads"] in (None, "0", "1", "2", "3", "4A", "4B", "4X")
    assert d["comparison"] in (None, "new", "stable", "growing")
    for n in d["nodules"]:
        assert list(n) == list(NODULE_KEYS)
        assert n["lobe"] in (None, "RUL", "RML", "RLL", "LUL", "LLL")
        assert n["size_mm"] is None or n["size_mm"] > 0 or n["size_mm"] == 0
    if d["nodules"]:
        assert d["nodule_present"] is True


@pytest.mark.parametrize(
    ("text", "present", "comparison"),
    [
        ("The 6 mm right lower lobe nodule is not meeting growth criteria.", True, "stable"),
        ("The 6 mm RLL nodule does not meet Lung-RADS growth criteria.", True, "stable"),
        ("The 6 mm RLL nodule has grown.", True, "growing"),
        ("Small left lower lobe nodule. The lungs are otherwise clear.", True, None),
    ],
)
def test_growth_criteria_and_otherwise_clear(text: str, present: bool, comparison: str | None) -> None:
    labels = label_report(text)
    assert labels.nodule_present is present
    assert [n.comparison for n in labels.nodules] == [comparison]


def test_otherwise_clear_alone_is_no_negation() -> None:
    # "otherwise" points at a finding stated elsewhere: this sentence alone does not say there is no nodule
    assert label_report("The lungs are otherwise clear.").nodule_present is None
    assert label_report("The lungs are clear.").nodule_present is False

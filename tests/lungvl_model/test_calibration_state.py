from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.special import expit, softmax

from lungvl_model import atomic_file
from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.calibration import (
    CALIBRATION_FILE,
    CalibrationRecord,
    CalibrationState,
    ValidationSplitInfo,
    fit_calibration,
    load_state,
    load_threshold,
    save_state,
    save_threshold,
)
from lungvl_model.inference.deferral import DeferralPolicy, DeferralSignals, LearnedScore


def sig(**kw: Any) -> DeferralSignals:
    base: dict[str, Any] = dict(
        max_key_entropy=0.5,
        lung_rads_disagreement=False,
        unsupported_facts=0,
        contradictions=0,
        borderline_mm=math.inf,
        malignancy_probability=0.5,
    )
    return DeferralSignals(**{**base, **kw})


def full_state() -> CalibrationState:
    learned = LearnedScore(
        mean=(1, 2, 3, 4, 0.8),
        scale=(1, 1, 2, 2, 0.1),
        weight=(0.5, -0.2, 0, 1, -0.3),
        bias=-1.0,
        threshold=0.4,
        l2=0.1,
    )  # type: ignore[arg-type]
    return CalibrationState(
        sentence_entropy_threshold=1.25,
        malignancy_temperature=1.7,
        lung_rads_temperature=2.5,
        deferral_policy=DeferralPolicy(learned=learned),
        validation_split=ValidationSplitInfo(study_count=40, validation_fraction=0.15, test_fraction=0.2, salt="s"),
        finding_threshold=0.31,
        metrics={"malignancy": {"nll_before": 0.7, "nll_after": 0.5}, "ratio": math.nan},
        details={"note": "x"},
    )


def test_round_trip_is_strict_json_and_atomic(tmp_path: Path) -> None:
    st = full_state()
    p = save_state(tmp_path, st)
    assert p == tmp_path / CALIBRATION_FILE
    doc = json.loads(p.read_text())  # strict JSON: NaN became null
    assert doc["schema_version"] == 3 and doc["kind"] == "lungvl-calibration"
    assert doc["metrics"]["ratio"] is None and doc["temperatures"] == {"malignancy": 1.7, "lung_rads": 2.5}
    back = load_state(tmp_path)
    assert back is not None
    assert back.deferral_policy == st.deferral_policy and back.validation_split == st.validation_split
    assert (back.malignancy_temperature, back.lung_rads_temperature) == (1.7, 2.5)
    assert back.sentence_entropy_threshold == 1.25 and load_threshold(tmp_path) == 1.25
    assert back.finding_threshold == 0.31
    assert sorted(os.listdir(tmp_path)) == [CALIBRATION_FILE]  # no temporary file left


def test_version_2_loads_without_a_finding_threshold(tmp_path: Path) -> None:
    doc = full_state().to_dict()
    doc["schema_version"] = 2
    del doc["finding_threshold"]
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(doc))
    back = load_state(tmp_path)
    assert back is not None and back.finding_threshold is None and back.malignancy_temperature == 1.7
    doc["finding_threshold"] = 0.2  # a key version 2 never had
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(doc))
    with pytest.raises(CorruptStateError, match="finding_threshold: unknown key"):
        load_state(tmp_path)


def test_failed_replace_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_state(tmp_path, CalibrationState(sentence_entropy_threshold=0.5))

    def boom(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic_file.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path, full_state())
    monkeypatch.undo()
    assert load_threshold(tmp_path) == 0.5 and sorted(os.listdir(tmp_path)) == [CALIBRATION_FILE]


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert load_state(tmp_path) is None and load_threshold(tmp_path) is None


def test_first_format_still_loads(tmp_path: Path) -> None:
    (tmp_path / CALIBRATION_FILE).write_text(
        json.dumps({"sentence_entropy_threshold": 0.8, "key_sentences": 10, "correct": 9, "target_error": 0.1})
    )
    st = load_state(tmp_path)
    assert st is not None and st.sentence_entropy_threshold == 0.8
    assert (st.malignancy_temperature, st.lung_rads_temperature, st.deferral_policy) == (1.0, 1.0, None)
    assert st.details == {"key_sentences": 10, "correct": 9, "target_error": 0.1}
    assert load_threshold(tmp_path) == 0.8


def test_save_threshold_keeps_the_fitted_policy(tmp_path: Path) -> None:
    save_state(tmp_path, full_state())
    save_threshold(tmp_path, math.inf, {"key_sentences": 3})
    st = load_state(tmp_path)
    assert st is not None and st.sentence_entropy_threshold == 1e9  # "never defer", as the first format stored it
    assert st.deferral_policy == full_state().deferral_policy and st.malignancy_temperature == 1.7
    assert st.details == {"key_sentences": 3}
    (tmp_path / CALIBRATION_FILE).write_text("{]")
    save_threshold(tmp_path, 0.7, {})  # a damaged file is replaced
    assert load_threshold(tmp_path) == 0.7


def _doc(**changes: Any) -> dict[str, Any]:
    d = full_state().to_dict()
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("content", "names"),
    [
        (b"{]", ("JSONDecodeError",)),
        (b"\xff\xfe\x00", ("UnicodeDecodeError",)),
        (b"[1, 2]", ("top level", "JSON object")),
        (json.dumps({"threshold": 1.0}).encode(), ("schema_version", "not a lungvl calibration")),
        (json.dumps({"sentence_entropy_threshold": "high"}).encode(), ("sentence_entropy_threshold",)),
        (json.dumps(_doc(schema_version=4)).encode(), ("schema_version", "4")),
        (json.dumps(_doc(finding_threshold=KeyError)).encode(), ("finding_threshold: missing",)),
        (json.dumps(_doc(finding_threshold=1.5)).encode(), ("finding_threshold", "1.5")),
        (json.dumps(_doc(schema_version="2")).encode(), ("schema_version", "'2'")),
        (json.dumps(_doc(kind="lungvl-registry")).encode(), ("kind", "lungvl-registry")),
        (json.dumps(_doc(metrics=KeyError)).encode(), ("metrics: missing",)),
        (json.dumps(_doc(extra=1)).encode(), ("extra: unknown key",)),
        (json.dumps(_doc(temperatures={"malignancy": 0.0, "lung_rads": 1.0})).encode(), ("malignancy_temperature",)),
        (json.dumps(_doc(temperatures={"malignancy": 1.0})).encode(), ("temperatures",)),
        (json.dumps(_doc(deferral_policy={"max_contradictions": 0})).encode(), ("deferral_policy", "missing key")),
        (
            json.dumps(_doc(validation_split={"study_count": 3, "validation_fraction": 1.5})).encode(),
            ("validation_split", "validation_fraction", "1.5"),
        ),
        (json.dumps(_doc(sentence_entropy_threshold="x")).encode(), ("sentence_entropy_threshold",)),
    ],
)
def test_damaged_or_foreign_file_names_file_and_key(tmp_path: Path, content: bytes, names: tuple[str, ...]) -> None:
    (tmp_path / CALIBRATION_FILE).write_bytes(content)
    with pytest.raises(CorruptStateError) as info:
        load_state(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / CALIBRATION_FILE) in msg
    for name in names:
        assert name in msg
    with pytest.raises(CorruptStateError):
        load_threshold(tmp_path)


def test_state_probabilities_by_hand() -> None:
    st = CalibrationState(malignancy_temperature=2.0, lung_rads_temperature=0.5)
    assert st.malignancy_probability(math.log(9)) == pytest.approx(0.75)  # sigmoid(ln 3) = 3/4
    assert st.lung_rads_probabilities([0.0, math.log(2) / 2, 0, 0, 0, 0]).tolist() == pytest.approx(
        [1 / 7, 2 / 7, 1 / 7, 1 / 7, 1 / 7, 1 / 7]
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"malignancy_temperature": 0.0}, "malignancy_temperature.*0.0"),
        ({"lung_rads_temperature": 25.0}, "lung_rads_temperature.*25.0"),
        ({"sentence_entropy_threshold": math.inf}, "sentence_entropy_threshold.*inf"),
        ({"metrics": [1]}, "metrics"),
        ({"finding_threshold": -0.1}, "finding_threshold.*-0.1"),
        ({"finding_threshold": True}, "finding_threshold"),
    ],
)
def test_invalid_state(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CalibrationState(**kw)


def _records(n: int, k: float, seed: int = 0) -> list[CalibrationRecord]:
    rng = np.random.default_rng(seed)
    true_m = rng.normal(0.0, 2.0, n)
    y_m = rng.random(n) < expit(true_m)
    true_lr = rng.normal(0.0, 1.5, (n, 6))
    cum = np.cumsum(softmax(true_lr, axis=1), axis=1)
    y_lr = (rng.random((n, 1)) > cum).sum(axis=1)
    ent = rng.gamma(2.0, 0.3, n)
    wrong = rng.random(n) < expit(-2.5 + 2.0 * ent)
    return [
        CalibrationRecord(
            study_uid=f"s{i}",
            malignancy_logit=float(true_m[i] * k),
            malignancy_label=int(y_m[i]),
            lung_rads_logits=tuple(true_lr[i] * k),
            lung_rads_label=int(y_lr[i]),
            signals=sig(max_key_entropy=float(ent[i]), contradictions=int(i % 25 == 0)),
            wrong=bool(wrong[i] or i % 25 == 0),
        )
        for i in range(n)
    ]


def test_fit_calibration_recovers_temperatures_and_fits_a_policy(tmp_path: Path) -> None:
    recs = _records(3000, k=2.0)
    split = ValidationSplitInfo(study_count=3000, validation_fraction=0.15, test_fraction=0.2)
    st = fit_calibration(recs, split=split, max_deferral_rate=0.3)
    assert st.malignancy_temperature == pytest.approx(2.0, rel=0.1)
    assert st.lung_rads_temperature == pytest.approx(2.0, rel=0.1)
    m = st.metrics
    assert m["malignancy"]["nll_after"] < m["malignancy"]["nll_before"]
    assert m["lung_rads"]["ece_after"] < m["lung_rads"]["ece_before"]
    assert m["deferral"]["deferral_rate"] <= 0.3 and m["deferral"]["n_hard"] == 120
    assert m["deferral"]["error_kept"] < m["deferral"]["error_all"]
    rc = m["risk_coverage"]
    assert rc["policy"]["deferral_rate"] <= 0.3 and rc["policy"]["error_kept"] < rc["entropy_only"]["error_all"]
    # the learned score saw calibrated malignancy probabilities: sigmoid(logit / T), not sigmoid(logit)
    assert st.deferral_policy is not None and st.deferral_policy.learned is not None
    calibrated = [expit(r.malignancy_logit / st.malignancy_temperature) for r in recs if not r.signals.contradictions]
    assert st.deferral_policy.learned.mean[2] == pytest.approx(float(np.mean(calibrated)))
    save_state(tmp_path, st)
    back = load_state(tmp_path)
    assert back is not None and back.deferral_policy == st.deferral_policy and back.validation_split == split


def test_policy_fitted_on_the_nodule_level_probability_explain_gives() -> None:
    """With a nodule-level head, explain's malignancy signal is its noisy-OR, not the study head's: fit on that."""
    recs = [
        dataclasses.replace(
            r,
            signals=dataclasses.replace(r.signals, malignancy_probability=0.01 * (i % 40)),
            malignancy_from_study_head=False,
        )
        for i, r in enumerate(_records(400, k=2.0))
    ]
    st = fit_calibration(recs, max_deferral_rate=0.3)
    assert st.deferral_policy is not None and st.deferral_policy.learned is not None
    kept = [0.01 * (i % 40) for i, r in enumerate(recs) if not r.signals.contradictions]
    assert st.deferral_policy.learned.mean[2] == pytest.approx(float(np.mean(kept)))  # the signals' own values
    head = [expit(r.malignancy_logit / st.malignancy_temperature) for r in recs if not r.signals.contradictions]
    assert abs(st.deferral_policy.learned.mean[2] - float(np.mean(head))) > 0.05  # not the study head's
    with pytest.raises(ValueError, match="'s0'.*malignancy_from_study_head must be True or False, got 'no'"):
        dataclasses.replace(recs[0], malignancy_from_study_head="no")


def test_fit_calibration_keeps_t_one_for_a_single_class_head() -> None:
    recs = [
        CalibrationRecord(f"s{i}", float(i - 5), 0, tuple([0.0] * 6), -1, sig(max_key_entropy=0.1 * i), i > 7)
        for i in range(10)
    ]
    st = fit_calibration(recs)
    assert st.malignancy_temperature == 1.0 and "single class" in st.metrics["malignancy"]["skipped"]
    assert st.lung_rads_temperature == 1.0 and st.metrics["lung_rads"] == {
        "skipped": "0 validation report(s) with a known label",
        "n": 0,
    }
    with pytest.raises(ValueError, match="records must not be empty"):
        fit_calibration([])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"malignancy_logit": math.nan}, "'s1'.*malignancy_logit"),
        ({"malignancy_label": 2}, "malignancy_label.*2"),
        ({"malignancy_label": 0.5}, "malignancy_label.*0.5"),
        ({"lung_rads_logits": (0.0,) * 5}, "lung_rads_logits must be 6"),
        ({"lung_rads_label": 6}, "lung_rads_label.*6"),
        ({"wrong": "no"}, "wrong.*no"),
    ],
)
def test_invalid_records(kw: dict[str, Any], match: str) -> None:
    ok: dict[str, Any] = dict(
        study_uid="s1",
        malignancy_logit=0.0,
        malignancy_label=None,
        lung_rads_logits=(0.0,) * 6,
        lung_rads_label=-1,
        signals=sig(),
        wrong=False,
    )
    CalibrationRecord(**ok)
    with pytest.raises(ValueError, match=match):
        CalibrationRecord(**{**ok, **kw})


def test_fit_calibration_stores_an_infinite_sentence_threshold(tmp_path: Path) -> None:
    # calibrate_entropy_threshold returns +inf when every validation sentence meets the target
    st = fit_calibration(_records(200, 2.0), sentence_entropy_threshold=math.inf)
    assert st.sentence_entropy_threshold is not None and st.sentence_entropy_threshold >= 1e9
    save_state(tmp_path, st)
    assert load_state(tmp_path).sentence_entropy_threshold == st.sentence_entropy_threshold

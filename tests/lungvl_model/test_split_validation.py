from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungvl_model.data.split import holdout_split, in_holdout, split_of, three_way_split, training_studies

KEYS = [f"patient-{i}" for i in range(10_000)]


def _splits(t: float, v: float, salt: str = "lungvl-holdout") -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for k in KEYS:
        out[split_of(k, test_fraction=t, validation_fraction=v, salt=salt)].add(k)
    return out


def test_fractions_within_tolerance_on_10000_keys() -> None:
    s = _splits(0.2, 0.15)
    # binomial sd at n=10000, p=0.2 is 40 keys: a 2 % window is 5 sd
    assert abs(len(s["test"]) / 10_000 - 0.2) < 0.02
    assert abs(len(s["validation"]) / 10_000 - 0.15) < 0.02
    assert abs(len(s["train"]) / 10_000 - 0.65) < 0.02


def test_disjoint_and_covering() -> None:
    s = _splits(0.25, 0.25)
    assert not (s["train"] & s["validation"]) and not (s["train"] & s["test"]) and not (s["validation"] & s["test"])
    assert s["train"] | s["validation"] | s["test"] == set(KEYS)


def test_test_split_is_exactly_the_existing_holdout() -> None:
    for k in KEYS[:2000]:
        assert (split_of(k, test_fraction=0.3, validation_fraction=0.2) == "test") == in_holdout(k, 0.3)


def test_deterministic_and_salted() -> None:
    a, b = _splits(0.2, 0.2), _splits(0.2, 0.2)
    assert a == b
    c = _splits(0.2, 0.2, salt="other")
    assert len(c["validation"] ^ a["validation"]) > 1000


@settings(max_examples=25, deadline=None)
@given(
    t=st.floats(0.0, 0.45),
    v=st.floats(0.0, 0.45),
    dt=st.floats(0.0, 0.05),
    dv=st.floats(0.0, 0.05),
)
def test_monotone_when_fractions_grow(t: float, v: float, dt: float, dv: float) -> None:
    keys = KEYS[:500]

    def split(tf: float, vf: float) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
        for k in keys:
            out[split_of(k, test_fraction=tf, validation_fraction=vf)].add(k)
        return out

    base, more_test, more_val = split(t, v), split(t + dt, v), split(t, v + dv)
    assert base["test"] <= more_test["test"]  # growing test only adds test patients ...
    assert more_test["validation"] == base["validation"]  # ... and never moves validation
    assert base["validation"] <= more_val["validation"]  # growing validation only adds ...
    assert more_val["test"] == base["test"]  # ... and never touches test
    assert more_val["train"] <= base["train"] and more_test["train"] <= base["train"]


def test_three_way_split_keeps_patients_together_and_matches_holdout() -> None:
    studies = [(f"s{i}", f"p{i // 2}") for i in range(400)]  # prior + current per patient
    sp = three_way_split(studies, test_fraction=0.2, validation_fraction=0.2)
    assert sp.test == tuple(holdout_split(studies, 0.2)[1])
    side = {u: name for name in ("train", "validation", "test") for u in sp.of(name)}  # type: ignore[arg-type]
    assert len(side) == 400
    for i in range(0, 400, 2):
        assert side[f"s{i}"] == side[f"s{i + 1}"]
    for uid, key in studies:
        if side[uid] != "test":
            assert side[uid] == split_of(key, test_fraction=0.2, validation_fraction=0.2)
    again = three_way_split(list(reversed(studies)), test_fraction=0.2, validation_fraction=0.2)
    assert set(again.validation) == set(sp.validation) and set(again.train) == set(sp.train)
    assert sp.counts() == {"train": len(sp.train), "validation": len(sp.validation), "test": len(sp.test)}


def test_tiny_sites_keep_a_validation_patient() -> None:
    checked = 0
    for n in range(3, 9):
        studies = [(f"s{i}", f"p{i}") for i in range(n)]
        sp = three_way_split(studies, test_fraction=0.3, validation_fraction=0.3)
        assert sp.test == tuple(holdout_split(studies, 0.3)[1])  # test is never sacrificed
        if n - len(sp.test) >= 2:  # two non-test patients: one trains, one validates
            assert sp.train and sp.validation
            checked += 1
    assert checked >= 3
    sp = three_way_split([("a", ""), ("b", "")], test_fraction=0.0, validation_fraction=0.0)
    assert (sp.train, sp.validation, sp.test) == (("a", "b"), (), ())
    sp = three_way_split([("a", ""), ("b", "")], test_fraction=0.0, validation_fraction=0.9, min_each=1)
    assert len(sp.train) == 1 and len(sp.validation) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": -0.1, "validation_fraction": 0.1}, "test_fraction.*-0.1"),
        ({"test_fraction": 0.1, "validation_fraction": 1.0}, "validation_fraction.*1.0"),
        ({"test_fraction": 0.1, "validation_fraction": True}, "validation_fraction.*True"),
        ({"test_fraction": 0.6, "validation_fraction": 0.4}, "test_fraction=0.6.*validation_fraction=0.4"),
        ({"test_fraction": "0.2", "validation_fraction": 0.1}, "test_fraction.*'0.2'"),
    ],
)
def test_invalid_fractions(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_of("p", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        three_way_split([("s", "p")], **kwargs)  # type: ignore[arg-type]


def test_catalogue_split_uses_patient_ids() -> None:
    from types import SimpleNamespace

    from lungvl_model.data.split import catalogue_split

    def entry(uid: str, pid: str | None) -> SimpleNamespace:
        header = {"PatientID": pid} if pid else {}
        return SimpleNamespace(study_uid=uid, series=SimpleNamespace(header=header), report=None)

    entries = [entry(f"s{i}", f"p{i // 2}") for i in range(60)] + [entry("lonely", None)]
    cat = SimpleNamespace(usable=entries)
    sp = catalogue_split(cat, test_fraction=0.2, validation_fraction=0.3)  # type: ignore[arg-type]
    pairs = [(e.study_uid, e.series.header.get("PatientID", "")) for e in entries]
    assert sp == three_way_split(pairs, test_fraction=0.2, validation_fraction=0.3)
    assert sum(sp.counts().values()) == 61 and sp.validation and sp.train and sp.test
    # training leaves validation out only when asked (the default keeps the two-way behaviour)
    assert training_studies(cat, 0.2, validation_fraction=0.3) == list(sp.train)  # type: ignore[arg-type]
    assert training_studies(cat, 0.2) == holdout_split(pairs, 0.2)[0]  # type: ignore[arg-type]

from __future__ import annotations

import pytest

from lungvl_model.data.split import holdout_split, in_holdout


def test_fraction_is_respected_and_deterministic() -> None:
    keys = [f"patient-{i}" for i in range(4000)]
    held = sum(in_holdout(k, 0.25) for k in keys)
    assert 0.22 * 4000 < held < 0.28 * 4000
    assert [in_holdout(k, 0.25) for k in keys[:50]] == [in_holdout(k, 0.25) for k in keys[:50]]
    assert sum(in_holdout(k, 0.25, salt="other") != in_holdout(k, 0.25) for k in keys) > 100


def test_patients_stay_together_and_order_does_not_matter() -> None:
    studies = [(f"s{i}", f"p{i // 2}") for i in range(200)]  # two studies per patient (baseline + prior)
    train, hold = holdout_split(studies, 0.3)
    assert set(train).isdisjoint(hold) and len(train) + len(hold) == 200
    side = {uid: (uid in hold) for uid, _ in studies}
    for i in range(0, 200, 2):
        assert side[f"s{i}"] == side[f"s{i + 1}"]
    train2, hold2 = holdout_split(list(reversed(studies)), 0.3)
    assert set(hold2) == set(hold) and set(train2) == set(train)


def test_tiny_sites_keep_both_sides() -> None:
    for n in range(2, 6):
        studies = [(f"s{i}", f"p{i}") for i in range(n)]
        train, hold = holdout_split(studies, 0.5)
        assert train and hold
    assert holdout_split([("s0", "p0")], 0.5)[0] in (["s0"], [])
    assert holdout_split([("a", ""), ("b", "")], 0.0) == (["a", "b"], [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_invalid_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=str(fraction)):
        in_holdout("p", fraction)
    with pytest.raises(ValueError, match=str(fraction)):
        holdout_split([("s", "p"), ("t", "q")], fraction)

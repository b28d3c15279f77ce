from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit, softmax

from lungvl_model.inference.temperature import (
    T_MAX,
    T_MIN,
    DegenerateCalibrationError,
    binary_nll,
    fit_binary_temperature,
    fit_multiclass_temperature,
    multiclass_nll,
    scale_logits,
)

# Convention: calibrated logits are ``logits / T``. Logits generated as ``true_logits * k`` are
# over-confident by a factor k, so the fitted T must be close to k (equivalently 1/T close to 1/k).


@pytest.mark.parametrize("k", [0.5, 2.5, 4.0])
def test_binary_recovers_known_temperature(k: float) -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 2.0, size=20_000)
    y = rng.random(true.size) < expit(true)
    fit = fit_binary_temperature(true * k, y)
    assert fit.temperature == pytest.approx(k, rel=0.06)
    assert fit.nll_after < fit.nll_before
    assert fit.ece_after < fit.ece_before
    assert fit.ece_after < 0.02
    assert not fit.at_bound and fit.n == 20_000


@pytest.mark.parametrize("k", [0.4, 3.0])
def test_multiclass_recovers_known_temperature(k: float) -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(0.0, 1.5, size=(10_000, 6))
    cum = np.cumsum(softmax(true, axis=1), axis=1)
    y = (rng.random((true.shape[0], 1)) > cum).sum(axis=1)  # inverse-CDF sampling of the true class
    fit = fit_multiclass_temperature(true * k, y)
    assert fit.temperature == pytest.approx(k, rel=0.06)
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before


def test_already_calibrated_gives_t_near_one() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 2.0, size=20_000)
    y = rng.random(z.size) < expit(z)
    fit = fit_binary_temperature(z, y)
    assert fit.temperature == pytest.approx(1.0, abs=0.06)
    assert fit.nll_after == pytest.approx(fit.nll_before, abs=1e-3)


def test_nll_by_hand() -> None:
    # z = [0, ln 3], y = [1, 0]: -log(1/2) and -log(1 - 3/4) = ln 2 and ln 4
    assert binary_nll(np.array([0.0, math.log(3)]), np.array([1, 0])) == pytest.approx((math.log(2) + math.log(4)) / 2)
    # T = 2 halves the logits: z/T = [0, ln 3 / 2], p2 = sqrt(3) / (1 + sqrt(3))
    p2 = math.sqrt(3) / (1 + math.sqrt(3))
    assert binary_nll(np.array([0.0, math.log(3)]), np.array([1, 0]), 2.0) == pytest.approx(
        (math.log(2) - math.log(1 - p2)) / 2
    )
    # two classes with logits [0, ln 3]: softmax = [1/4, 3/4]
    assert multiclass_nll(np.array([[0.0, math.log(3)]]), np.array([0])) == pytest.approx(math.log(4))


def test_separable_data_hits_the_lower_bound() -> None:
    z = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    fit = fit_binary_temperature(z, z > 0)  # perfectly separated: the NLL keeps falling as T -> 0
    assert fit.temperature == pytest.approx(T_MIN, rel=1e-3) and fit.at_bound


def test_labels_opposite_to_logits_hit_the_upper_bound() -> None:
    z = np.array([-3.0, -2.0, 2.0, 3.0])
    fit = fit_binary_temperature(z, z < 0)  # always wrong: best is as uncertain as allowed
    assert fit.temperature == pytest.approx(T_MAX, rel=1e-3) and fit.at_bound


def test_single_class_is_refused_with_a_clear_error() -> None:
    with pytest.raises(DegenerateCalibrationError, match="single class"):
        fit_binary_temperature(np.array([1.0, 2.0, -0.5]), np.array([1, 1, 1]))
    with pytest.raises(DegenerateCalibrationError, match=r"single class \(3\)"):
        fit_multiclass_temperature(np.zeros((4, 6)), np.array([3, 3, 3, 3]))


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 2)), np.array([0, 1, 0]), "logits must be 1-D"),
        (np.array([]), np.array([]), "must not be empty"),
        (np.array([0.0, np.nan]), np.array([0, 1]), "logits must be finite"),
        (np.array([0.0, 1.0]), np.array([0, 1, 1]), "one entry per logit row"),
        (np.array([0.0, 1.0]), np.array([0, 2]), r"labels must be integers in \[0, 2\).*2"),
        (np.array([0.0, 1.0]), np.array([0.5, 1]), "0.5"),
        (np.array(["a", "b"]), np.array([0, 1]), "numeric"),
    ],
)
def test_invalid_binary_inputs(logits: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_binary_temperature(logits, labels)


def test_invalid_multiclass_inputs() -> None:
    with pytest.raises(ValueError, match="2-D"):
        fit_multiclass_temperature(np.zeros(4), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="C >= 2"):
        fit_multiclass_temperature(np.zeros((4, 1)), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 6\).*6"):
        fit_multiclass_temperature(np.zeros((2, 6)), np.array([0, 6]))


def test_scale_logits() -> None:
    assert scale_logits(np.array([2.0, -4.0]), 2.0).tolist() == [1.0, -2.0]
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="temperature"):
            scale_logits(np.zeros(2), bad)

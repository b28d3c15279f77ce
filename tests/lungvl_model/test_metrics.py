"""Evaluation metrics against values computed by hand (STYLE.md habit 11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungvl_model.evaluation import (
    accuracy,
    bleu4,
    bootstrap_ci,
    brier,
    calibrate_entropy_threshold,
    confusion_matrix,
    deferral_summary,
    detection_summary,
    dice,
    expected_calibration_error,
    hd95,
    match_detections,
    roc_auc,
    rouge_l,
    sensitivity_specificity,
)
from lungvl_model.evaluation import metrics as metrics_module


def box(shape=(12, 12, 12), lo=(2, 2, 2), size=(4, 4, 4)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = True
    return m


def test_metrics_module_reexports_the_package_api():
    import lungvl_model.evaluation as pkg

    assert sorted(pkg.__all__) == sorted(metrics_module.__all__)
    assert all(getattr(pkg, name) is getattr(metrics_module, name) for name in pkg.__all__)


# ----------------------------------------------------------------------------- segmentation

EMPTY = np.zeros((3, 3, 3), dtype=bool)
CUBE8 = box((3, 3, 3), (0, 0, 0), (2, 2, 2))  # 8 voxels


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        (CUBE8, CUBE8, 1.0),
        (CUBE8, box((3, 3, 3), (0, 0, 1), (2, 2, 2)), 2 * 4 / 16),  # overlap 2x2x1
        (box((3, 3, 3), (0, 0, 0), (1, 1, 1)), CUBE8, 2 * 1 / 9),
        (CUBE8, box((3, 3, 3), (2, 2, 2), (1, 1, 1)), 0.0),  # disjoint
        (EMPTY, EMPTY, 1.0),
        (EMPTY, CUBE8, 0.0),
        (CUBE8, EMPTY, 0.0),
        (CUBE8.astype(np.uint8), CUBE8.astype(np.int64), 1.0),  # 0/1 integers accepted
    ],
)
def test_dice(pred, ref, expected):
    assert dice(pred, ref) == pytest.approx(expected)


SPACING = (2.5, 0.8, 0.8)


@pytest.mark.parametrize(
    "axis, shift, expected_mm",
    [
        # A 4-voxel cube shifted by `shift` voxels: the face of each cube that lies outside the other
        # (16 of 56 surface voxels, > 5 %) is exactly `shift * spacing[axis]` from the other surface,
        # and every other surface voxel is closer, so the 95th percentile is the shift in mm.
        (0, 2, 2 * 2.5),
        (1, 3, 3 * 0.8),
        (2, 2, 2 * 0.8),
        (0, 0, 0.0),
    ],
)
def test_hd95_shifted_cubes_equals_shift_in_mm(axis, shift, expected_mm):
    a = box()
    b = np.roll(a, shift, axis=axis)
    assert hd95(a, b, SPACING) == pytest.approx(expected_mm, rel=1e-6, abs=1e-6)
    assert hd95(b, a, SPACING) == pytest.approx(expected_mm, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("pred, ref", [(box(), np.zeros((12, 12, 12), bool)), (np.zeros((12, 12, 12), bool), box())])
def test_hd95_nan_when_a_mask_is_empty(pred, ref):
    assert math.isnan(hd95(pred, ref, SPACING))


@pytest.mark.parametrize(
    "pred, ref, kwargs, expected",
    [
        # (pred centroids, ref centroids, ref diameters), kwargs, (tp, fp, fn, pairs)
        ([[0, 0, 0]], [[3, 0, 0]], {}, (1, 0, 0, [(0, 0)])),  # within min radius 5
        ([[0, 0, 5]], [[0, 0, 0]], {}, (1, 0, 0, [(0, 0)])),  # boundary is inclusive
        ([[0, 0, 6]], [[0, 0, 0]], {}, (0, 1, 1, [])),  # miss: FP and FN
        ([[0, 0, 0]], [[0, 0, 8]], {"diam": [20.0]}, (1, 0, 0, [(0, 0)])),  # radius 0.5 * 20 = 10
        ([[0, 0, 0]], [[0, 0, 4.5]], {"radius_factor": 1.0, "min_radius_mm": 0.0}, (0, 1, 1, [])),  # r = 4
        ([[0, 0, 1], [0, 0, 0]], [[0, 0, 0]], {}, (1, 1, 0, [(1, 0)])),  # duplicate: nearest hits, other is FP
        ([[0, 0, 0]], [[0, 0, 2], [0, 0, 1]], {}, (1, 0, 1, [(0, 1)])),  # nearest reference wins
        # Greedy by distance: B-r1 (1 mm) first, then A-r2 (2 mm); A-r1 (3 mm) is never used.
        ([[0, 0, 0], [0, 0, 4]], [[0, 0, 3], [0, 0, -2]], {}, (2, 0, 0, [(0, 1), (1, 0)])),
        ([], [[0, 0, 0]], {}, (0, 0, 1, [])),
        ([[0, 0, 0]], [], {"diam": []}, (0, 1, 0, [])),
    ],
)
def test_match_detections(pred, ref, kwargs, expected):
    kwargs = dict(kwargs)
    diam = kwargs.pop("diam", [4.0] * len(ref))
    result = match_detections(pred, ref, diam, **kwargs)
    assert tuple(result) == expected
    tp, fp, fn, pairs = result
    assert (result.tp, result.fp, result.fn, result.pairs) == (tp, fp, fn, pairs)


def test_detection_summary_pools_over_scans():
    per_scan = [
        match_detections([[0, 0, 1], [0, 0, 0]], [[0, 0, 0]], [4.0]),  # tp 1, fp 1
        match_detections([], [[0, 0, 0], [9, 9, 9]], [4.0, 6.0]),  # fn 2
        (2, 0, 0),  # plain counts also accepted
    ]
    s = detection_summary(per_scan)
    assert s["sensitivity"] == pytest.approx(3 / 5)
    assert s["fp_per_scan"] == pytest.approx(1 / 3)
    assert (s["n_ref"], s["n_pred"], s["n_tp"], s["n_scans"]) == (5, 4, 3, 3)


def test_detection_summary_without_reference_nodules():
    s = detection_summary([(0, 2, 0), (0, 0, 0)])
    assert math.isnan(s["sensitivity"])
    assert s["fp_per_scan"] == 1.0


# ----------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    "y, score, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        # positives 0.35, 0.8 vs negatives 0.1, 0.4, 0.5: wins 1 + 3 of 6 pairs
        ([0, 0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8, 0.5], 4 / 6),
        # positives 0.2, 0.9 vs negatives 0.2, 0.1: 0.5 + 1 + 1 + 1 of 4 pairs
        ([False, True, False, True], [0.2, 0.2, 0.1, 0.9], 3.5 / 4),
    ],
)
def test_roc_auc(y, score, expected):
    assert roc_auc(np.array(y), np.array(score)) == pytest.approx(expected)


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0]])
def test_roc_auc_nan_with_one_class(y):
    assert math.isnan(roc_auc(y, np.linspace(0, 1, len(y))))


@pytest.mark.parametrize(
    "y, prob, n_bins, expected",
    [
        # bins [0, .5) and [.5, 1]: |0.5 - 0.15| * 2/4 + |1.0 - 0.8| * 2/4
        ([0, 1, 1, 1], [0.1, 0.2, 0.7, 0.9], 2, 0.35 / 2 + 0.2 / 2),
        # ten bins, one item each: (0.1 + 0.8 + 0.3 + 0.1) / 4
        ([0, 1, 1, 1], [0.1, 0.2, 0.7, 0.9], 10, 1.3 / 4),
        ([0, 1], [0.5, 0.5], 10, 0.0),
        ([1, 1], [1.0, 1.0], 10, 0.0),  # 1.0 falls in the last bin
        ([0, 0], [0.0, 0.0], 10, 0.0),
        # top-label form: confidences 0.7, 0.6, 0.8 (separate bins), correct 1, 0, 1
        ([0, 1, 2], [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], 10, (0.3 + 0.6 + 0.2) / 3),
    ],
)
def test_expected_calibration_error(y, prob, n_bins, expected):
    assert expected_calibration_error(np.array(y), np.array(prob), n_bins=n_bins) == pytest.approx(expected)


@pytest.mark.parametrize(
    "y, prob, expected",
    [
        ([0, 1, 1], [0.2, 0.6, 1.0], (0.04 + 0.16 + 0.0) / 3),
        ([0, 0], [[0.7, 0.3], [0.4, 0.6]], (0.18 + 0.72) / 2),
    ],
)
def test_brier(y, prob, expected):
    assert brier(np.array(y), np.array(prob)) == pytest.approx(expected)


def test_confusion_matrix():
    cm = confusion_matrix(np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 1, 1]), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 1, 1]])
    assert cm.sum() == 5


def test_accuracy_and_sensitivity_specificity():
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == pytest.approx(0.75)
    sens, spec = sensitivity_specificity(np.array([1, 1, 0, 0, 0]), np.array([1, 0, 0, 1, 0]))
    assert (sens, spec) == pytest.approx((1 / 2, 2 / 3))
    sens, spec = sensitivity_specificity([0, 0], [0, 1])
    assert math.isnan(sens) and spec == 0.5


# ----------------------------------------------------------------------------- bootstrap


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def test_bootstrap_ci_contains_point_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    widths = []
    for n in (25, 400):
        x = rng.normal(0.0, 1.0, size=n)
        point, low, high = bootstrap_ci(_mean, x, n_boot=300)
        assert point == pytest.approx(x.mean())
        assert low <= point <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(n): expected ratio 4


def test_bootstrap_ci_is_seeded_and_skips_nan_resamples():
    y = np.array([0, 0, 0, 0, 1, 0, 1, 0])
    s = np.array([0.1, 0.3, 0.2, 0.4, 0.9, 0.5, 0.6, 0.7])
    a = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=3)
    b = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=3)
    assert a == b
    point, low, high = a
    assert point == pytest.approx(11 / 12)  # 0.6 loses to 0.7; 0.9 wins all
    assert 0.0 <= low <= point <= high <= 1.0  # NaN (single-class) resamples were skipped


def test_bootstrap_ci_all_resamples_nan():
    point, low, high = bootstrap_ci(roc_auc, np.ones(4, int), np.arange(4.0), n_boot=20)
    assert math.isnan(point) and math.isnan(low) and math.isnan(high)


# ----------------------------------------------------------------------------- deferral


def test_deferral_summary():
    s = deferral_summary(np.array([True, False, False, False]), np.array([False, True, False, True]))
    assert s == pytest.approx({"deferral_rate": 0.25, "error_rate_all": 0.5, "error_rate_kept": 1 / 3, "n": 4})
    s = deferral_summary([1, 1], [1, 0])
    assert math.isnan(s["error_rate_kept"]) and s["deferral_rate"] == 1.0


@pytest.mark.parametrize(
    "entropies, correct, target, expected",
    [
        ([0.3, 0.1, 0.2], [1, 1, 1], 0.1, math.inf),  # all correct: defer nothing
        ([0.1 * k for k in range(1, 11)], [1] * 9 + [0], 0.1, math.inf),  # 1/10 errors already meets 0.1
        # cumulative errors 0/1, 0/2, 0/3, 1/4, 2/5
        ([0.1, 0.2, 0.3, 0.4, 0.5], [1, 1, 1, 0, 0], 0.25, 0.4),
        ([0.1, 0.2, 0.3, 0.4, 0.5], [1, 1, 1, 0, 0], 0.2, 0.3),
        ([0.5, 0.3, 0.1, 0.4, 0.2], [0, 1, 1, 0, 1], 0.2, 0.3),  # unsorted input
        ([0.1, 0.2, 0.3], [1, 1, 0], 0.0, 0.2),
        # not monotone: 0/1, 1/2, 1/3, 1/4, 1/5, 2/6 -> the last qualifying value is 0.5
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1, 0, 1, 1, 1, 0], 0.25, 0.5),
        # ties are kept together: at 0.2 the kept set is 3 items with 1 error (not 2 items with 1)
        ([0.1, 0.2, 0.2, 0.3], [1, 0, 1, 0], 0.34, 0.2),
        ([0.1, 0.2, 0.2, 0.3], [1, 0, 1, 0], 0.3, 0.1),
    ],
)
def test_calibrate_entropy_threshold(entropies, correct, target, expected):
    assert calibrate_entropy_threshold(np.array(entropies), np.array(correct), target_error=target) == expected


def test_calibrate_entropy_threshold_defers_everything_when_most_confident_is_wrong():
    e = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    t = calibrate_entropy_threshold(e, np.array([False, False, True]), target_error=0.1)
    assert t < 0.1 and t == pytest.approx(0.1, abs=1e-5)
    assert not (e <= np.float32(t)).any()  # still below the minimum after a float32 cast
    assert deferral_summary(e > t, np.array([False, False, True]))["deferral_rate"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=25),
    st.sampled_from([0.0, 0.1, 0.25, 0.5]),
)
def test_calibrate_entropy_threshold_property(items, target):
    e = np.array([v / 2 for v, _ in items])
    c = np.array([ok for _, ok in items])
    t = calibrate_entropy_threshold(e, c, target_error=target)
    kept = e <= t
    if kept.any():
        assert (~c[kept]).mean() <= target + 1e-9
    for v in np.unique(e[e > t]):  # no larger observed threshold qualifies
        assert (~c[e <= v]).mean() > target


# ----------------------------------------------------------------------------- text


# BLEU-4 / ROUGE-L (sacrebleu, rouge-score): tests/lungvl_model/evaluation/test_text_metrics.py


# ----------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool)), r"\(2, 2, 3\)"),
        (lambda: dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)), r"3-D.*\(2, 2\)"),
        (lambda: dice(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2))), r"0\.5"),
        (lambda: hd95(box(), box(), (0.0, 1.0, 1.0)), r"spacing.*0\.0"),
        (lambda: hd95(box(), box(), (1.0, 1.0)), r"spacing"),
        (lambda: match_detections([[0, 0, 0]], [[0, 0, 0]], [4.0, 5.0]), r"ref_diameters_mm.*\(1\).*2"),
        (lambda: match_detections([[0, 0, 0]], [[0, 0, 0]], [-1.0]), r"-1\.0"),
        (lambda: match_detections([[0, 0]], [[0, 0, 0]], [4.0]), r"pred_centroids_mm.*\(1, 2\)"),
        (lambda: match_detections([], [], [], radius_factor=-0.5), r"radius_factor.*-0\.5"),
        (lambda: detection_summary([]), r"per_scan"),
        (lambda: roc_auc([0, 1, 1], [0.1, 0.2]), r"y_true.*3.*score.*2"),
        (lambda: roc_auc([0, 2], [0.1, 0.2]), r"y_true.*\[2\]"),
        (lambda: roc_auc([0, 1], [0.1, float("nan")]), r"score.*nan"),
        (lambda: expected_calibration_error([0, 1], [0.5, 1.2]), r"prob.*1\.2"),
        (lambda: expected_calibration_error([0, 1], [0.5, 0.5], n_bins=0), r"n_bins.*0"),
        (lambda: expected_calibration_error([0], [[0.5, 0.6]]), r"sum to 1.*1\.1"),
        (lambda: brier([0, 1], [-0.1, 0.5]), r"prob.*-0\.1"),
        (lambda: brier([0, 3], [[0.5, 0.5], [0.5, 0.5]]), r"y_true.*\[3\]"),
        (lambda: confusion_matrix([0, 3], [0, 1], 3), r"y_true_idx.*\[3\]"),
        (lambda: confusion_matrix([0, 1], [0, 1], 0), r"n_classes.*0"),
        (lambda: accuracy([], []), r"empty"),
        (lambda: sensitivity_specificity([0, 1], [0, 1, 1]), r"y_pred.*3"),
        (lambda: bootstrap_ci(_mean, np.ones(3), np.ones(4)), r"\[3, 4\]"),
        (lambda: bootstrap_ci(_mean, np.ones(3), alpha=1.5), r"alpha.*1\.5"),
        (lambda: bootstrap_ci(_mean, np.ones(3), n_boot=0), r"n_boot.*0"),
        (lambda: deferral_summary([True], [True, False]), r"deferred.*1.*correct.*2"),
        (lambda: calibrate_entropy_threshold([0.1], [True], target_error=1.5), r"target_error.*1\.5"),
        (lambda: calibrate_entropy_threshold([0.1, np.inf], [True, True]), r"entropies.*inf"),
        (lambda: bleu4(["a"], ["a", "b"]), r"1 and 2"),
        (lambda: bleu4("a b", "a b"), r"single str"),
        (lambda: rouge_l(None, "a"), r"NoneType"),  # type: ignore[arg-type]
    ],
)
def test_invalid_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_found_nodule_dice_hand_computed() -> None:
    """Two reference nodules: A (2x2x2 = 8 voxels) found by a prediction of 4 of its voxels plus a 4-voxel leak
    touching it (segment 8, overlap 4: Dice 0.5); B (1 voxel) missed; a far false positive does not count."""
    from lungvl_model.evaluation.segmentation_metrics import found_nodule_dice

    ref = np.zeros((10, 10, 10), bool)
    ref[1:3, 1:3, 1:3] = True  # A
    ref[7, 7, 7] = True  # B
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1] = True  # 4 voxels inside A
    pred[1:3, 1:3, 0] = True  # 4 voxels leaking out of A, connected to them
    pred[8:10, 0:2, 8:10] = True  # a false positive far from both
    got = found_nodule_dice(pred, ref)
    assert got.found == 1 and got.total == 2
    assert got.dices == pytest.approx([2 * 4 / (8 + 8)])
    assert found_nodule_dice(np.zeros_like(ref), ref) == ([], 0, 2)
    assert found_nodule_dice(pred, np.zeros_like(ref)) == ([], 0, 0)
    # diagonal neighbours are one nodule (26-connectivity)
    diag = np.zeros((4, 4, 4), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert found_nodule_dice(diag, diag) == ([1.0], 1, 1)

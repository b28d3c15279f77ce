"""Classification, calibration, bootstrap and deferral metrics (pure numpy + ``scipy.stats.rankdata``).

Used for the malignancy, Lung-RADS and growth heads and for the per-sentence confidence that
drives deferral:

- discrimination: :func:`roc_auc`, :func:`accuracy`, :func:`sensitivity_specificity`,
  :func:`confusion_matrix`;
- calibration: :func:`expected_calibration_error`, :func:`brier`;
- uncertainty of any metric: :func:`bootstrap_ci`;
- selective prediction: :func:`deferral_summary`, :func:`calibrate_entropy_threshold`.

Inputs are 1-D arrays of length ``N`` unless stated; binary labels may be ``bool`` or 0/1.
Every function raises ``ValueError`` naming the offending argument and value on malformed input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "accuracy",
    "bootstrap_ci",
    "brier",
    "calibrate_entropy_threshold",
    "confusion_matrix",
    "deferral_summary",
    "expected_calibration_error",
    "roc_auc",
    "sensitivity_specificity",
]


# --------------------------------------------------------------------------- validation helpers


def _as_1d(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def _as_binary(name: str, x: Any) -> np.ndarray:
    arr = _as_1d(name, x)
    if arr.dtype != np.bool_:
        bad = arr[~np.isin(arr, (0, 1))]
        if bad.size:
            raise ValueError(f"{name} must be boolean or 0/1, got value(s) {bad[:5].tolist()}")
    return arr.astype(bool)


def _as_finite(name: str, x: Any, ndim: int = 1) -> np.ndarray:
    arr = _as_1d(name, x) if ndim == 1 else np.asarray(x)
    try:
        arr = arr.astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from err
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr[~np.isfinite(arr)][:5].tolist()}")
    return arr


def _as_probability(name: str, x: Any, ndim: int = 1) -> np.ndarray:
    arr = _as_finite(name, x, ndim)
    bad = arr[(arr < 0) | (arr > 1)]
    if bad.size:
        raise ValueError(f"{name} must lie in [0, 1], got value(s) {bad[:5].tolist()}")
    return arr


def _as_labels(name: str, x: Any, n_classes: int | None = None) -> np.ndarray:
    arr = _as_1d(name, x)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(f"{name} must hold integer class indices, got {arr[:5].tolist()}")
    arr = arr.astype(np.int64)
    if n_classes is not None:
        bad = arr[(arr < 0) | (arr >= n_classes)]
        if bad.size:
            raise ValueError(f"{name} must lie in [0, {n_classes}), got value(s) {bad[:5].tolist()}")
    return arr


def _check_lengths(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")


# --------------------------------------------------------------------------- discrimination


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic.

    ``AUC = P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg)`` over all positive/negative
    pairs, computed from average ranks in ``O(N log N)``.

    Args:
        y_true: ``(N,)`` binary labels (1 = positive).
        score: ``(N,)`` finite scores, higher meaning more likely positive.

    Returns:
        AUC in ``[0, 1]``; ``NaN`` when ``y_true`` contains only one class.

    Raises:
        ValueError: on non-binary labels, non-finite scores, or a length mismatch.
    """
    y = _as_binary("y_true", y_true)
    s = _as_finite("score", score)
    _check_lengths(y_true=y, score=s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # ties get the average rank, which counts a tied pair as 1/2
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of predictions equal to the labels.

    Args:
        y_true: ``(N,)`` labels (any comparable values, e.g. class indices).
        y_pred: ``(N,)`` predicted labels.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: on empty or non-1-D inputs or a length mismatch.
    """
    t, p = _as_1d("y_true", y_true), _as_1d("y_pred", y_pred)
    _check_lengths(y_true=t, y_pred=p)
    return float(np.mean(t == p))


def sensitivity_specificity(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Sensitivity (true-positive rate) and specificity (true-negative rate) of binary predictions.

    Args:
        y_true: ``(N,)`` binary labels.
        y_pred: ``(N,)`` binary predictions.

    Returns:
        ``(sensitivity, specificity)``; each is ``NaN`` when there is no positive (resp. negative)
        label.

    Raises:
        ValueError: on non-binary inputs or a length mismatch.
    """
    t, p = _as_binary("y_true", y_true), _as_binary("y_pred", y_pred)
    _check_lengths(y_true=t, y_pred=p)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    sens = float((t & p).sum() / n_pos) if n_pos else float("nan")
    spec = float((~t & ~p).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


def confusion_matrix(y_true_idx: np.ndarray, y_pred_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix with true classes in rows and predicted classes in columns.

    Args:
        y_true_idx: ``(N,)`` true class indices in ``[0, n_classes)``.
        y_pred_idx: ``(N,)`` predicted class indices in ``[0, n_classes)``.
        n_classes: number of classes (>= 1).

    Returns:
        ``(n_classes, n_classes)`` int64 counts; ``cm[i, j]`` = items of class ``i`` predicted ``j``.

    Raises:
        ValueError: on ``n_classes < 1``, non-integer or out-of-range indices, or a length mismatch.
    """
    if int(n_classes) != n_classes or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    t = _as_labels("y_true_idx", y_true_idx, n_classes)
    p = _as_labels("y_pred_idx", y_pred_idx, n_classes)
    _check_lengths(y_true_idx=t, y_pred_idx=p)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


# --------------------------------------------------------------------------- calibration


def _correct_and_confidence(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate ``(y_true, prob)`` and return ``(outcome, confidence, prob)`` for the calibration metrics."""
    p_arr = np.asarray(prob)
    if p_arr.ndim == 1:
        p = _as_probability("prob", p_arr)
        y = _as_binary("y_true", y_true)
        _check_lengths(y_true=y, prob=p)
        return y.astype(float), p, p
    if p_arr.ndim != 2 or p_arr.shape[0] == 0 or p_arr.shape[1] < 2:
        raise ValueError(f"prob must be (N,) or (N, C) with N >= 1 and C >= 2, got shape {p_arr.shape}")
    p = _as_probability("prob", p_arr, ndim=2)
    row_sums = p.sum(axis=1)
    bad = row_sums[np.abs(row_sums - 1.0) > 1e-3]
    if bad.size:
        raise ValueError(f"rows of prob must sum to 1 (within 1e-3), got row sums {bad[:5].tolist()}")
    y = _as_labels("y_true", y_true, p.shape[1])
    _check_lengths(y_true=y, prob=p)
    return (p.argmax(axis=1) == y).astype(float), p.max(axis=1), p


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` where bin ``b`` holds the items with confidence in
    ``[b / n_bins, (b + 1) / n_bins)`` (the last bin also holds 1.0), ``acc_b`` is the mean outcome
    and ``conf_b`` the mean confidence in the bin; empty bins contribute nothing.

    Two input forms:

    - ``prob`` of shape ``(N,)``: the predicted probability that the binary ``y_true`` is 1 (the
      outcome is ``y_true`` and the confidence is ``prob``). Passing ``y_true = correct`` and
      ``prob = confidence`` gives the usual top-label ECE of any predictor, e.g. per sentence.
    - ``prob`` of shape ``(N, C)`` with ``y_true`` class indices: top-label ECE, with confidence
      ``max_c prob`` and outcome ``argmax_c prob == y_true``.

    Args:
        y_true: ``(N,)`` binary labels, or class indices when ``prob`` is ``(N, C)``.
        prob: ``(N,)`` or ``(N, C)`` probabilities in ``[0, 1]`` (rows summing to 1 for ``(N, C)``).
        n_bins: number of equal-width bins (>= 1).

    Returns:
        ECE in ``[0, 1]``.

    Raises:
        ValueError: on ``n_bins < 1``, probabilities outside ``[0, 1]``, invalid labels, or a length
            mismatch.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    outcome, conf, _ = _correct_and_confidence(y_true, prob)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=outcome, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins)
    # sum_b (n_b / N) |mean_b(outcome) - mean_b(conf)| = sum_b |sum_b(outcome - conf)| / N
    return float(np.abs(gap[counts > 0]).sum() / conf.size)


def brier(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Brier score (mean squared error of the predicted probabilities; lower is better).

    Args:
        y_true: ``(N,)`` binary labels, or class indices when ``prob`` is ``(N, C)``.
        prob: ``(N,)`` probability of class 1 (score in ``[0, 1]``), or ``(N, C)`` class
            probabilities (Brier's original multi-class form ``mean_i sum_c (p_ic - 1[y_i = c])²``,
            in ``[0, 2]``).

    Returns:
        The Brier score.

    Raises:
        ValueError: on probabilities outside ``[0, 1]``, invalid labels, or a length mismatch.
    """
    _, _, p = _correct_and_confidence(y_true, prob)
    if p.ndim == 1:
        y = _as_binary("y_true", y_true).astype(float)
        return float(np.mean((p - y) ** 2))
    onehot = np.eye(p.shape[1])[_as_labels("y_true", y_true, p.shape[1])]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of ``metric_fn(*arrays)``.

    Each resample draws ``N`` indices with replacement and applies them to every array along the
    first axis, so paired inputs (labels and scores) stay paired. Resamples whose metric is ``NaN``
    (e.g. an AUC resample with a single class) are skipped, so the interval is conditional on the
    metric being defined; with a tiny minority class this biases it, and if every resample is
    skipped the bounds are ``NaN``.

    Args:
        metric_fn: ``metric_fn(*arrays) -> float``, e.g. :func:`roc_auc`.
        *arrays: one or more arrays with the same first-axis length ``N`` (>= 1).
        n_boot: number of resamples (>= 1).
        alpha: two-sided level in ``(0, 1)``; the interval is the ``alpha/2`` and ``1 - alpha/2``
            percentiles of the resampled metrics.
        seed: seed of the ``numpy`` generator, for reproducible intervals.

    Returns:
        ``(point, low, high)`` where ``point = metric_fn(*arrays)`` on the full data.

    Raises:
        ValueError: on no arrays, empty or unequal-length arrays, ``n_boot < 1`` or ``alpha``
            outside ``(0, 1)``.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    arrs = [np.asarray(a) for a in arrays]
    if any(a.ndim == 0 for a in arrs):
        raise ValueError(f"arrays must be at least 1-D, got shapes {[a.shape for a in arrs]}")
    lengths = [a.shape[0] for a in arrs]
    if len(set(lengths)) > 1 or lengths[0] == 0:
        raise ValueError(f"arrays must share a non-zero first-axis length, got {lengths}")
    n = lengths[0]
    point = float(metric_fn(*arrs))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, size=n)
        value = float(metric_fn(*(a[idx] for a in arrs)))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return point, float("nan"), float("nan")
    low, high = np.percentile(values, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return point, float(low), float(high)


# --------------------------------------------------------------------------- deferral


def deferral_summary(deferred: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Error rates with and without deferring the flagged items to a radiologist.

    Args:
        deferred: ``(N,)`` bool, items (e.g. report sentences) handed to a human.
        correct: ``(N,)`` bool, whether the model's output for the item is correct.

    Returns:
        ``{"deferral_rate", "error_rate_all", "error_rate_kept", "n"}``: the fraction deferred, the
        error rate over all items, the error rate over the items not deferred (``NaN`` when all
        are deferred), and ``N`` (an ``int``).

    Raises:
        ValueError: on non-boolean inputs or a length mismatch.
    """
    d, c = _as_binary("deferred", deferred), _as_binary("correct", correct)
    _check_lengths(deferred=d, correct=c)
    kept = ~d
    return {
        "deferral_rate": float(d.mean()),
        "error_rate_all": float((~c).mean()),
        "error_rate_kept": float((~c[kept]).mean()) if kept.any() else float("nan"),
        "n": int(d.size),
    }


def calibrate_entropy_threshold(entropies: np.ndarray, correct: np.ndarray, *, target_error: float = 0.1) -> float:
    """Choose the entropy threshold for deferral on a calibration set.

    Items with ``entropy <= t`` are kept, the rest deferred. The function returns the largest
    ``t`` such that the error rate among the kept calibration items is at most ``target_error``:

    - if the whole set already meets the target (in particular when every item is correct), every
      ``t`` above the largest entropy qualifies and ``+inf`` is returned: nothing is deferred;
    - otherwise the qualifying thresholds are unions of intervals ``[e_k, e_(k+1))`` between
      sorted distinct entropies; the observed value ``e_k`` of the last qualifying interval is
      returned (the conservative end: it keeps the same calibration items, and defers new items
      that fall in the gap). The error rate is not monotone in ``t``, so this is the *last*
      qualifying value, not the first violation;
    - if no threshold qualifies (typically the most confident item is already wrong), returns
      ``min(entropies) - eps`` with ``eps = 1e-6 * max(1, |min|)`` (large enough to survive a cast
      to float32), so that every item is deferred.

    Args:
        entropies: ``(N,)`` finite uncertainty scores (e.g. mean token entropy per sentence, nats).
        correct: ``(N,)`` bool, whether each item's prediction is correct.
        target_error: highest acceptable error rate among kept items, in ``[0, 1]``.

    Returns:
        The threshold ``t`` (possibly ``+inf``).

    Raises:
        ValueError: on non-finite entropies, non-boolean ``correct``, a length mismatch, or
            ``target_error`` outside ``[0, 1]``.
    """
    if not 0.0 <= target_error <= 1.0:
        raise ValueError(f"target_error must lie in [0, 1], got {target_error}")
    e = _as_finite("entropies", entropies)
    c = _as_binary("correct", correct)
    _check_lengths(entropies=e, correct=c)
    # Compare error counts with target * count plus a tolerance, so that 1 error in 10 meets 0.1
    # (and 29 in 100 meets 0.29, where 0.29 * 100 rounds to 28.999...).
    if (~c).sum() <= target_error * c.size + 1e-9:
        return math.inf
    order = np.argsort(e, kind="stable")
    e_sorted, err_sorted = e[order], (~c[order]).astype(np.int64)
    # Items with equal entropy are kept or deferred together: evaluate only at the last of each tie.
    last_of_value = np.r_[e_sorted[1:] != e_sorted[:-1], True]
    n_kept = np.arange(1, e.size + 1)[last_of_value]
    n_err = np.cumsum(err_sorted)[last_of_value]
    ok = n_err <= target_error * n_kept + 1e-9
    if ok.any():
        return float(e_sorted[last_of_value][np.nonzero(ok)[0][-1]])
    lo = float(e_sorted[0])
    return lo - 1e-6 * max(1.0, abs(lo))

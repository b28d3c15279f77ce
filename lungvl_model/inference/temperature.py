"""Temperature scaling of the risk heads' logits, fitted on validation data (Guo et al., 2017).

A single scalar ``T > 0`` divides the logits: ``p = sigmoid(z / T)`` for the malignancy head,
``p = softmax(z / T)`` for the Lung-RADS head. ``T > 1`` softens an over-confident head, ``T < 1``
sharpens an under-confident one; the ranking (and so AUC and the arg-max class) never changes.

``T`` minimises the mean negative log-likelihood (NLL) of the validation labels. The NLL is convex in
``beta = 1 / T`` (the logits enter linearly), so it is unimodal in ``log T`` and a bounded 1-D search
(Brent, ``scipy.optimize.minimize_scalar``) over ``log T`` in ``[log T_MIN, log T_MAX]`` finds the global
minimum on that interval. An optimum on a bound is reported (``at_bound``): it usually means the
validation data are (nearly) separable or the labels carry no signal.

Degenerate input: labels of a single class make the NLL minimum a matter of the logits' signs rather
than calibration (all positives with positive logits drive ``T`` to 0). The fitting functions refuse
it with :class:`DegenerateCalibrationError` (a ``ValueError``); callers that must go on (see
:func:`lungvl_model.inference.calibration.fit_calibration`) keep ``T = 1`` and record why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax

from lungvl_model.evaluation.classification_metrics import expected_calibration_error

__all__ = [
    "T_MAX",
    "T_MIN",
    "DegenerateCalibrationError",
    "TemperatureFit",
    "binary_nll",
    "fit_binary_temperature",
    "fit_multiclass_temperature",
    "multiclass_nll",
    "scale_logits",
]

T_MIN = 0.05
"""Smallest temperature searched."""
T_MAX = 20.0
"""Largest temperature searched."""


class DegenerateCalibrationError(ValueError):
    """The validation labels cannot identify a temperature (a single class)."""


@dataclass(frozen=True)
class TemperatureFit:
    """Result of one temperature fit.

    Attributes:
        temperature: the fitted ``T`` in ``[T_MIN, T_MAX]``; divide logits by it.
        nll_before: mean NLL at ``T = 1`` (nats).
        nll_after: mean NLL at ``temperature`` (never above ``nll_before`` up to the search tolerance).
        ece_before: 10-bin ECE at ``T = 1`` (binary: of ``P(y = 1)``; multi-class: top-label).
        ece_after: 10-bin ECE at ``temperature``.
        n: number of validation items.
        at_bound: the optimum lies on ``T_MIN`` or ``T_MAX`` (within 1e-3 relative).
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    n: int
    at_bound: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def scale_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` (any shape).

    Raises:
        ValueError: ``temperature`` not a finite number > 0.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return np.asarray(logits, dtype=float) / float(temperature)


def _finite(name: str, x: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(float)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr[~np.isfinite(arr)][:5].tolist()}")
    return arr


def _labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    y = _finite("labels", labels, 1)
    if y.shape[0] != n:
        raise ValueError(f"labels must have one entry per logit row ({n}), got {y.shape[0]}")
    bad = y[(y != np.round(y)) | (y < 0) | (y >= n_classes)]
    if bad.size:
        raise ValueError(f"labels must be integers in [0, {n_classes}), got value(s) {bad[:5].tolist()}")
    yi = y.astype(np.int64)
    present = np.unique(yi)
    if present.size < 2:
        raise DegenerateCalibrationError(
            f"labels hold a single class ({int(present[0])}) in all {n} items: the temperature is not identifiable"
        )
    return yi


def binary_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary NLL ``mean(softplus(-z/T) if y else softplus(z/T))`` in nats (no validation)."""
    z = np.asarray(logits, dtype=float) / temperature
    y = np.asarray(labels).astype(bool)
    return float(np.mean(np.where(y, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))))


def multiclass_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean multi-class NLL ``mean(-log softmax(z/T)[y])`` in nats (no validation); logits ``(N, C)``."""
    lp = log_softmax(np.asarray(logits, dtype=float) / temperature, axis=1)
    y = np.asarray(labels, dtype=np.int64)
    return float(-np.mean(lp[np.arange(y.size), y]))


def _fit(nll: Any) -> tuple[float, bool]:
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    res = minimize_scalar(lambda lt: nll(math.exp(lt)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    log_t = float(res.x)
    # Brent never evaluates the bounds themselves: compare with them so a monotone NLL lands on the bound.
    candidates = [(nll(math.exp(log_t)), log_t), (nll(T_MIN), lo), (nll(T_MAX), hi)]
    best = min(candidates)[1]
    t = math.exp(best)
    return t, abs(best - lo) < 1e-3 or abs(best - hi) < 1e-3


def fit_binary_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """Fit ``T`` for a binary head (e.g. ``RiskOutput.malignancy_logit``) on validation data.

    Args:
        logits: ``(N,)`` finite logits.
        labels: ``(N,)`` labels in {0, 1} (bool accepted), both classes present.

    Returns:
        The :class:`TemperatureFit`.

    Raises:
        ValueError: wrong shape, non-finite values, labels outside {0, 1}, or a length mismatch.
        DegenerateCalibrationError: every label is the same class.
    """
    z = _finite("logits", logits, 1)
    y = _labels(labels, z.shape[0], 2)
    t, at_bound = _fit(lambda temp: binary_nll(z, y, temp))
    return TemperatureFit(
        temperature=t,
        nll_before=binary_nll(z, y),
        nll_after=binary_nll(z, y, t),
        ece_before=expected_calibration_error(y, expit(z)),
        ece_after=expected_calibration_error(y, expit(z / t)),
        n=int(z.shape[0]),
        at_bound=at_bound,
    )


def fit_multiclass_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """Fit ``T`` for a multi-class head (e.g. ``RiskOutput.lung_rads_logits``) on validation data.

    Args:
        logits: ``(N, C)`` finite logits, ``C >= 2``.
        labels: ``(N,)`` class indices in ``[0, C)``, at least two classes present.

    Returns:
        The :class:`TemperatureFit` (ECE is top-label).

    Raises:
        ValueError: wrong shape, ``C < 2``, non-finite values, labels out of range, or a length mismatch.
        DegenerateCalibrationError: every label is the same class.
    """
    z = _finite("logits", logits, 2)
    if z.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {z.shape}")
    y = _labels(labels, z.shape[0], z.shape[1])
    t, at_bound = _fit(lambda temp: multiclass_nll(z, y, temp))
    return TemperatureFit(
        temperature=t,
        nll_before=multiclass_nll(z, y),
        nll_after=multiclass_nll(z, y, t),
        ece_before=expected_calibration_error(y, np.exp(log_softmax(z, axis=1))),
        ece_after=expected_calibration_error(y, np.exp(log_softmax(z / t, axis=1))),
        n=int(z.shape[0]),
        at_bound=at_bound,
    )

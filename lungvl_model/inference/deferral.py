"""When to hand a report to a radiologist: per-report signals, a fitted policy, and the decision.

The key-sentence entropy alone does not separate right from wrong reports, so the decision combines
several signals (:class:`DeferralSignals`):

* **hard rules** (:class:`DeferralPolicy`): any text–finding contradiction or unsupported fact found by
  the fact check, and a model Lung-RADS that disagrees with the rule engine, defer outright (each can be
  relaxed or switched off in the policy; the disagreement rule is switched off by :func:`fit_policy` when
  the validation reports show it uninformative or alone over the deferral budget);
* a **learned score** for the rest (:class:`LearnedScore`): an L2-regularised logistic regression of
  "the report is wrong" on standardised features (key-sentence entropy, borderline size, calibrated
  malignancy probability and its uncertainty, the weakest kept finding's candidate-filter score), fitted
  on the validation split by :func:`fit_policy` and thresholded so that at most ``max_deferral_rate`` of
  the validation reports are deferred, hard rules included, while the error among the kept reports is as
  low as possible.

The borderline-size signal comes from :func:`lungvl_model.clinical.borderline.borderline_size_mm`.

Everything here is pure (numpy/scipy, no torch): :func:`decide` needs only the signals and the policy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

__all__ = [
    "BORDERLINE_CAP_MM",
    "FEATURES",
    "DeferralPolicy",
    "DeferralSignals",
    "LearnedScore",
    "decide",
    "deferral_score",
    "disagreement_rule_holds",
    "features",
    "fit_policy",
    "hard_reasons",
]

BORDERLINE_CAP_MM = 5.0
"""Borderline distances above this (and "no threshold": ``inf``) enter the learned score as this value."""

FEATURES: tuple[str, ...] = (
    "max_key_entropy",
    "borderline_mm",
    "malignancy_probability",
    "malignancy_uncertainty",
    "weakest_finding_score",
)
"""Inputs of the learned score, in order (see :func:`features`). A score fitted before a feature was added
names the ones it was fitted on (:attr:`LearnedScore.feature_names`) and reads only those."""

_FEATURE_TEXT = {
    "max_key_entropy": ("max key-sentence entropy", " nats"),
    "borderline_mm": ("distance to the nearest Lung-RADS size threshold", " mm"),
    "malignancy_probability": ("calibrated malignancy probability", ""),
    "malignancy_uncertainty": ("malignancy uncertainty 1-|2p-1|", ""),
    "weakest_finding_score": ("lowest candidate-filter score of a kept finding", ""),
}

#: Score of a report deferred by a hard rule in :func:`deferral_score` (above any learned probability).
HARD_RULE_SCORE = 2.0


# --------------------------------------------------------------------------------------------- signals


def _nonneg_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    return int(value)


def _number(key: str, value: Any, lo: float, hi: float, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{key} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or not lo <= v <= hi:
        raise ValueError(f"{key} must be in [{lo}, {hi}]{' or inf' if allow_inf else ''}, got {value!r}")
    return v


@dataclass(frozen=True)
class DeferralSignals:
    """What is known about one report when deciding to defer it.

    Attributes:
        max_key_entropy: largest mean token entropy of a key sentence, nats (0 when there is none).
        lung_rads_disagreement: the model's Lung-RADS differs from the rule engine on measured findings.
        unsupported_facts: facts of the text the findings do not support (fact check).
        contradictions: text–finding contradictions (fact check).
        borderline_mm: ``lungvl_model.clinical.borderline.borderline_size_mm`` of the findings (``inf``: none applies).
        malignancy_probability: calibrated malignancy probability (temperature-scaled head).
        weakest_finding_score: the lowest candidate-filter score among the kept findings (1 when none is
            kept or the checkpoint has no filter): a finding kept just above the operating point is the
            likeliest false positive, and one false positive changes the exam's Lung-RADS category.
    """

    max_key_entropy: float
    lung_rads_disagreement: bool
    unsupported_facts: int
    contradictions: int
    borderline_mm: float
    malignancy_probability: float
    weakest_finding_score: float = 1.0

    def __post_init__(self) -> None:
        """Validate the fields (``ValueError`` naming the field and value)."""
        _number("max_key_entropy", self.max_key_entropy, 0.0, math.inf)
        if not isinstance(self.lung_rads_disagreement, bool | np.bool_):
            raise ValueError(f"lung_rads_disagreement must be True or False, got {self.lung_rads_disagreement!r}")
        _nonneg_int("unsupported_facts", self.unsupported_facts)
        _nonneg_int("contradictions", self.contradictions)
        _number("borderline_mm", self.borderline_mm, 0.0, math.inf, allow_inf=True)
        _number("malignancy_probability", self.malignancy_probability, 0.0, 1.0)
        _number("weakest_finding_score", self.weakest_finding_score, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``borderline_mm = inf`` as ``None``)."""
        d = dataclasses.asdict(self)
        d["lung_rads_disagreement"] = bool(self.lung_rads_disagreement)
        d["borderline_mm"] = self.borderline_mm if math.isfinite(self.borderline_mm) else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeferralSignals:
        """Inverse of :meth:`to_dict` (``ValueError`` naming a missing or unknown key).

        Signals written before ``weakest_finding_score`` existed read it as 1.
        """
        if isinstance(d, Mapping) and "weakest_finding_score" not in d:
            d = {**d, "weakest_finding_score": 1.0}
        data = _exact_keys("signals", d, {f.name for f in dataclasses.fields(cls)})
        if data["borderline_mm"] is None:
            data["borderline_mm"] = math.inf
        return cls(**data)


def features(signals: DeferralSignals, names: Sequence[str] = FEATURES) -> np.ndarray:
    """The learned score's inputs ``(len(names),)``, in the order of ``names`` (default :data:`FEATURES`)."""
    p = signals.malignancy_probability
    value = {
        "max_key_entropy": signals.max_key_entropy,
        "borderline_mm": min(signals.borderline_mm, BORDERLINE_CAP_MM),
        "malignancy_probability": p,
        "malignancy_uncertainty": 1.0 - abs(2.0 * p - 1.0),
        "weakest_finding_score": signals.weakest_finding_score,
    }
    return np.array([value[n] for n in names])


# --------------------------------------------------------------------------------------------- policy


def _exact_keys(what: str, d: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    missing, unknown = sorted(keys - set(d)), sorted(set(d) - keys)
    if missing:
        raise ValueError(f"{what}: missing key(s) {missing}")
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}")
    return dict(d)


def _vector(key: str, value: Any, n: int) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or len(value) != n:
        raise ValueError(f"{key} must be a list of {n} numbers, got {value!r}")
    return tuple(_number(f"{key}[{i}]", v, -math.inf, math.inf) for i, v in enumerate(value))


@dataclass(frozen=True)
class LearnedScore:
    """Logistic score ``p = sigmoid(bias + sum_i weight_i (x_i - mean_i) / scale_i)`` of "report wrong".

    Attributes:
        mean: ``(F,)`` feature means on the fitting data.
        scale: ``(F,)`` feature standard deviations (1 where a feature was constant), > 0.
        weight: ``(F,)`` coefficients on standardised features.
        bias: intercept.
        threshold: defer when ``p >= threshold``; ``None``: never (no budget left, or nothing gained).
        l2: the L2 penalty used (on the mean log-loss).
        feature_names: the features it was fitted on, in :data:`FEATURES` order (a score fitted before a
            feature was added lacks it; checked on load).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weight: tuple[float, ...]
    bias: float
    threshold: float | None
    l2: float
    feature_names: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        """Validate the fields (``ValueError`` naming the field and value)."""
        names = tuple(self.feature_names)
        if not names or any(n not in FEATURES for n in names) or list(names) != sorted(names, key=FEATURES.index):
            raise ValueError(
                f"feature_names must be distinct names of {list(FEATURES)} in that order, got {list(names)!r}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"feature_names must be distinct, got {list(names)!r}")
        n = len(names)
        object.__setattr__(self, "mean", _vector("mean", self.mean, n))
        object.__setattr__(self, "scale", _vector("scale", self.scale, n))
        object.__setattr__(self, "weight", _vector("weight", self.weight, n))
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if min(self.scale) <= 0:
            raise ValueError(f"scale must be > 0, got {list(self.scale)!r}")
        _number("bias", self.bias, -math.inf, math.inf)
        if self.threshold is not None:
            _number("threshold", self.threshold, 0.0, 1.0)
        _number("l2", self.l2, 0.0, math.inf)

    def logit(self, signals: DeferralSignals) -> float:
        """The score's log-odds for one report."""
        z = (features(signals, self.feature_names) - np.asarray(self.mean)) / np.asarray(self.scale)
        return float(self.bias + np.dot(self.weight, z))

    def probability(self, signals: DeferralSignals) -> float:
        """The score (probability that the report is wrong)."""
        return float(expit(self.logit(signals)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LearnedScore:
        """Inverse of :meth:`to_dict` (``ValueError`` naming the key)."""
        data = _exact_keys("learned", d, {f.name for f in dataclasses.fields(cls)})
        if not isinstance(data["feature_names"], list | tuple):
            raise ValueError(f"feature_names must be a list, got {data['feature_names']!r}")
        return cls(**{**data, "feature_names": tuple(data["feature_names"])})


@dataclass(frozen=True)
class DeferralPolicy:
    """Hard rules plus an optional learned score.

    Attributes:
        max_contradictions: defer when a report has more text–finding contradictions (None: rule off).
        max_unsupported_facts: defer when a report has more unsupported facts (None: rule off).
        defer_on_lung_rads_disagreement: defer when the model and rule-engine Lung-RADS differ.
        entropy_threshold: defer when the max key-sentence entropy exceeds it, nats (None: rule off; the
            historical single-signal rule, kept for old calibrations).
        max_deferral_rate: the validation deferral budget the learned threshold was chosen for, in (0, 1].
        learned: the learned score (None: hard rules only).
    """

    max_contradictions: int | None = 0
    max_unsupported_facts: int | None = 0
    defer_on_lung_rads_disagreement: bool = True
    entropy_threshold: float | None = None
    max_deferral_rate: float = 0.3
    learned: LearnedScore | None = None

    def __post_init__(self) -> None:
        """Validate the fields (``ValueError`` naming the field and value)."""
        for key in ("max_contradictions", "max_unsupported_facts"):
            if getattr(self, key) is not None:
                _nonneg_int(key, getattr(self, key))
        if not isinstance(self.defer_on_lung_rads_disagreement, bool):
            raise ValueError(
                f"defer_on_lung_rads_disagreement must be True or False, got {self.defer_on_lung_rads_disagreement!r}"
            )
        if self.entropy_threshold is not None:
            _number("entropy_threshold", self.entropy_threshold, 0.0, math.inf)
        rate = _number("max_deferral_rate", self.max_deferral_rate, 0.0, 1.0)
        if rate <= 0.0:
            raise ValueError(f"max_deferral_rate must be in (0, 1], got {self.max_deferral_rate!r}")
        if self.learned is not None and not isinstance(self.learned, LearnedScore):
            raise ValueError(f"learned must be a LearnedScore or None, got {type(self.learned).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["learned"] = None if self.learned is None else self.learned.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeferralPolicy:
        """Inverse of :meth:`to_dict` (``ValueError`` naming the key)."""
        data = _exact_keys("deferral_policy", d, {f.name for f in dataclasses.fields(cls)})
        if data["learned"] is not None:
            data["learned"] = LearnedScore.from_dict(data["learned"])
        return cls(**data)


# --------------------------------------------------------------------------------------------- decision


def hard_reasons(signals: DeferralSignals, policy: DeferralPolicy) -> list[str]:
    """Reasons from the hard rules alone (empty: the learned score decides)."""
    reasons = []
    if policy.max_contradictions is not None and signals.contradictions > policy.max_contradictions:
        reasons.append(f"text–finding contradictions: {signals.contradictions} > {policy.max_contradictions} allowed")
    if policy.max_unsupported_facts is not None and signals.unsupported_facts > policy.max_unsupported_facts:
        reasons.append(
            f"unsupported facts in the text: {signals.unsupported_facts} > {policy.max_unsupported_facts} allowed"
        )
    if policy.defer_on_lung_rads_disagreement and signals.lung_rads_disagreement:
        reasons.append("model Lung-RADS disagrees with the rule engine on the measured findings")
    if policy.entropy_threshold is not None and signals.max_key_entropy > policy.entropy_threshold:
        reasons.append(
            f"max key-sentence entropy {signals.max_key_entropy:.3f} nats > threshold {policy.entropy_threshold:.3f}"
        )
    return reasons


def _learned_reason(signals: DeferralSignals, learned: LearnedScore, p: float) -> str:
    assert learned.threshold is not None
    x = features(signals, learned.feature_names)
    contrib = np.asarray(learned.weight) * (x - np.asarray(learned.mean)) / np.asarray(learned.scale)
    parts = []
    for i in np.argsort(-contrib):
        if contrib[i] <= 0:
            break
        label, unit = _FEATURE_TEXT[learned.feature_names[i]]
        parts.append(
            f"{label} {x[i]:.3g}{unit} (validation mean {learned.mean[i]:.3g}{unit}, {contrib[i]:+.2f} log-odds)"
        )
    why = "; ".join(parts) if parts else "no single signal above its validation mean"
    return f"learned error score {p:.3f} >= threshold {learned.threshold:.3f}: {why}"


def decide(signals: DeferralSignals, policy: DeferralPolicy) -> tuple[bool, list[str]]:
    """Whether to defer a report to a radiologist, and why.

    Args:
        signals: the report's signals.
        policy: the fitted (or default, hard-rules-only) policy.

    Returns:
        ``(defer, reasons)``; each reason names the signal, its value and the threshold it crossed.
    """
    reasons = hard_reasons(signals, policy)
    learned = policy.learned
    if not reasons and learned is not None and learned.threshold is not None:
        p = learned.probability(signals)
        if p >= learned.threshold:
            reasons.append(_learned_reason(signals, learned, p))
    return bool(reasons), reasons


def deferral_score(signals: DeferralSignals, policy: DeferralPolicy) -> float:
    """A score to rank reports for deferral (risk–coverage), higher deferred first.

    Returns:
        :data:`HARD_RULE_SCORE` for a hard-rule deferral, else the learned probability (0 without one).
    """
    if hard_reasons(signals, policy):
        return HARD_RULE_SCORE
    return policy.learned.probability(signals) if policy.learned is not None else 0.0


# --------------------------------------------------------------------------------------------- fitting


def _logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """L2 logistic regression: minimise ``mean(logloss) + l2/2 * |w|^2`` (bias not penalised)."""
    n, f = x.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:f], theta[f]
        z = x @ w + b
        val = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * float(w @ w)
        r = (expit(z) - y) / n
        return float(val), np.r_[x.T @ r + l2 * w, r.sum()]

    res = minimize(loss, np.zeros(f + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:f], float(res.x[f])


def fit_policy(
    signals: Sequence[DeferralSignals],
    wrong: Sequence[bool] | np.ndarray,
    *,
    max_deferral_rate: float = 0.3,
    l2: float = 0.1,
    base: DeferralPolicy | None = None,
) -> tuple[DeferralPolicy, dict[str, Any]]:
    """Fit the learned score and its threshold on validation reports.

    The hard rules of ``base`` (default :class:`DeferralPolicy`) are applied first; the Lung-RADS
    disagreement rule only where the validation reports support it (:func:`disagreement_rule_holds`).
    The logistic score is fitted on the reports they keep (it needs at least one right and one wrong
    report there; else the policy has no learned score). Its threshold is the candidate (a score value,
    or "never") that gives the lowest error among all kept validation reports, with total deferrals
    (hard + learned) at most ``floor(max_deferral_rate * N)``; ties go to fewer deferrals.

    Args:
        signals: ``N`` reports' signals.
        wrong: ``(N,)`` bool, the report is wrong (e.g. its Lung-RADS differs from the reference).
        max_deferral_rate: the deferral budget in (0, 1].
        l2: L2 penalty on the mean log-loss (standardised features), >= 0.
        base: hard rules to use (its ``learned`` is replaced).

    Returns:
        ``(policy, summary)``; ``summary`` holds ``n``, ``n_hard``, ``n_learned``, ``deferral_rate``,
        ``error_all``, ``error_kept``, ``lung_rads_disagreement`` (the rule's validation check) and
        ``note`` (why there is no learned score or threshold, or "").

    Raises:
        ValueError: ``N == 0``, a length mismatch, non-boolean ``wrong``, or invalid ``l2`` / rate.
    """
    w_arr = np.asarray(wrong)
    if w_arr.ndim != 1 or w_arr.size != len(signals) or w_arr.size == 0:
        raise ValueError(f"wrong must be 1-D with one entry per report ({len(signals)}), got shape {w_arr.shape}")
    if w_arr.dtype != np.bool_ and not np.isin(w_arr, (0, 1)).all():
        raise ValueError(f"wrong must be boolean or 0/1, got {w_arr[:5].tolist()}")
    y = w_arr.astype(bool)
    _number("l2", l2, 0.0, math.inf)
    policy = dataclasses.replace(base or DeferralPolicy(), max_deferral_rate=max_deferral_rate, learned=None)
    n = y.size
    disagreement: dict[str, Any] = {"rule": policy.defer_on_lung_rads_disagreement}
    if policy.defer_on_lung_rads_disagreement:
        keep, disagreement = disagreement_rule_holds(signals, y, max_deferral_rate)
        policy = dataclasses.replace(policy, defer_on_lung_rads_disagreement=keep)
    hard = np.array([bool(hard_reasons(s, policy)) for s in signals])
    budget = math.floor(max_deferral_rate * n + 1e-9) - int(hard.sum())
    rest = ~hard
    summary: dict[str, Any] = {
        "n": n,
        "n_hard": int(hard.sum()),
        "error_all": float(y.mean()),
        "note": "",
        "lung_rads_disagreement": disagreement,
    }
    learned_defer = np.zeros(n, dtype=bool)
    if y[rest].all() or not y[rest].any():
        summary["note"] = "the reports kept by the hard rules are all right or all wrong: no learned score"
    else:
        x = np.stack([features(s) for s in signals])
        mean = x[rest].mean(axis=0)
        scale = x[rest].std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        w, b = _logistic((x[rest] - mean) / scale, y[rest].astype(float), l2)
        score = expit(((x - mean) / scale) @ w + b)
        best: tuple[float, int, float | None] = (_kept_error(y, hard), 0, None)
        if budget > 0:
            for t in np.unique(score[rest])[::-1]:
                d = rest & (score >= t)
                if d.sum() > budget:
                    break
                cand = (_kept_error(y, hard | d), int(d.sum()), float(t))
                if cand[0] < best[0] - 1e-12:
                    best = cand
        else:
            summary["note"] = "the hard rules already use the deferral budget: the learned score never defers"
        threshold = best[2]
        if threshold is not None:
            learned_defer = rest & (score >= threshold)
        elif not summary["note"]:
            summary["note"] = "no learned threshold lowers the error among kept reports: the learned score never defers"
        policy = dataclasses.replace(
            policy,
            learned=LearnedScore(
                mean=tuple(mean.tolist()),
                scale=tuple(scale.tolist()),
                weight=tuple(w.tolist()),
                bias=b,
                threshold=threshold,
                l2=float(l2),
            ),
        )
    deferred = hard | learned_defer
    summary.update(
        n_learned=int(learned_defer.sum()),
        deferral_rate=float(deferred.mean()),
        error_kept=_kept_error(y, deferred),
    )
    return policy, summary


def disagreement_rule_holds(
    signals: Sequence[DeferralSignals], wrong: np.ndarray, max_deferral_rate: float
) -> tuple[bool, dict[str, Any]]:
    """Whether the "model Lung-RADS disagrees with the rule engine" hard rule earns its place on validation.

    The rule stays on unless the validation reports show it is uninformative or alone over budget: it is
    switched off when the reports that disagree are not more often wrong than those that agree (a model
    head that gives every study one category disagrees with the rule engine on nearly every report, right
    or wrong), or when it alone would defer more than ``max_deferral_rate`` of them. With no disagreement
    on validation there is no evidence against it and it stays on.

    Args:
        signals: ``N`` validation reports' signals.
        wrong: ``(N,)`` bool, the report is wrong.
        max_deferral_rate: the deferral budget in (0, 1].

    Returns:
        ``(keep, summary)``; ``summary`` holds ``rule`` (the decision), ``disagreeing``, ``n``, the error
        among disagreeing and agreeing reports (NaN when none) and ``why``.
    """
    dis = np.array([bool(s.lung_rads_disagreement) for s in signals])
    y = np.asarray(wrong, dtype=bool)
    n_dis = int(dis.sum())
    err_dis = float(y[dis].mean()) if n_dis else math.nan
    err_agree = float(y[~dis].mean()) if n_dis < y.size else math.nan
    out: dict[str, Any] = {
        "n": int(y.size),
        "disagreeing": n_dis,
        "error_disagreeing": err_dis,
        "error_agreeing": err_agree,
    }
    if n_dis == 0:
        return True, {**out, "rule": True, "why": "no validation report disagrees: kept"}
    if n_dis > math.floor(max_deferral_rate * y.size + 1e-9):
        why = f"it alone defers {n_dis} of {y.size} validation reports, over the {max_deferral_rate:g} budget: off"
        return False, {**out, "rule": False, "why": why}
    if n_dis == y.size or not err_dis > err_agree:
        why = (
            f"disagreeing reports are wrong {err_dis:.2f} of the time, agreeing ones {err_agree:.2f}: "
            "uninformative, off"
        )
        return False, {**out, "rule": False, "why": why}
    why = f"disagreeing reports are wrong {err_dis:.2f} of the time, agreeing ones {err_agree:.2f}: kept"
    return True, {**out, "rule": True, "why": why}


def _kept_error(wrong: np.ndarray, deferred: np.ndarray) -> float:
    kept = ~deferred
    return float(wrong[kept].mean()) if kept.any() else math.nan

"""A small learned nodule-candidate classifier on :mod:`.candidate_features` (numpy only).

Two model kinds, both dependency-free:

* ``"logistic"``: logistic regression on standardised features with an L2 penalty on the weights
  (not the bias), fitted by Newton's method (the penalised log-likelihood is strictly convex).
* ``"stumps"``: gradient-boosted decision stumps (logistic loss, one feature split per round with
  Newton leaf values ``-G / (H + l2)``, shrinkage ``learning_rate``; split points at feature quantiles).

The operating threshold is chosen on validation scores for a target sensitivity (the highest
threshold that keeps at least ``target_sensitivity`` of the true candidates) and stored with the model.

Measured (``lungvl train <3 synthetic sites> ../shared/data/lidc --stage candidates``: screening 12 +
referral 8 + referral 12 patients, seeds 11-13, matrix 160; 42 nodules x 2 seeds = 84 positives,
2,290 refined hard negatives incl. 96 from LIDC-IDRI-0001's training slabs; see
:mod:`lungvl_model.training.candidate_filter`):

* Model kind, out-of-fold by study: logistic AUC 0.976, negatives kept at 95 % sensitivity 8.8 %;
  stumps AUC 0.970, 15.9 % -> logistic (``l2 = 1``, ``positive_weight = 5``: of l2 in {0.1, 1, 10} x
  weight in {1, 5, 25}, out-of-fold negatives kept per study 4.5-13.9, this one 4.8); threshold 0.078.
* Held-out synthetic sites (screening 10 + referral 8 patients, seeds 21-22; 50 positive seeds, 1,203
  refined hard negatives): AUC 0.981, sensitivity 0.96 at the stored threshold; hard negatives per
  scan 50.1 -> 5.5 (kept: bronchial wall 32/129, hilar vessel 28/143, random intrapulmonary vessel
  44/192, heart border 8/88, diaphragm 5/106; aorta, pulmonary artery/vein, sternum, vertebra,
  mediastinal soft tissue 0).
* LIDC-IDRI-0001 (its nodule never in training): the consensus nodule p = 0.66 (seeded as the triage
  gives it; 0.28 from a point seed), kept; held-out-slab seeds: 1 of 21 random vessel/pleura/medial
  kept (a vessel, p = 0.70), 0 of 24 anatomical (heart border, hilar vessel, chest wall, sternum,
  aorta/contrast, diaphragm; 7 already rejected by the refinement).
* Time per candidate: features 0.02 s (2 mm pixels) / 0.08 s (LIDC 0.7 mm); classifier ~10 us.
* The shipped filter (2026-12-07) is fitted with the fine detector (``triage_source`` ``"fine_detector"``):
  84 training studies + LIDC-IDRI-0001's training slabs, 285 nodule rows, 6,084 negatives of 21 kinds incl.
  1,106 detector false positives: logistic, out-of-fold AUC 0.949, sensitivity 0.951 at specificity 0.688.

Persistence: ``candidate_filter.json`` beside a checkpoint (:data:`FILENAME`), written atomically
(temporary file + ``os.replace``), versioned (:data:`SCHEMA_VERSION`); a damaged file raises
:class:`~lungvl_model.errors.CorruptStateError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungvl_model.atomic_file import write_json_atomic
from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.candidate_features import FEATURE_NAMES, FeatureConfig, candidate_features

if TYPE_CHECKING:
    from lungvl_model.data.volume import CTVolume
    from lungvl_model.inference.findings import Finding

FILENAME = "candidate_filter.json"
"""File name of the filter beside a checkpoint's files."""
SCHEMA_VERSION = 2
"""Version of the JSON document (1: no ``triage_source``, read as ``"constant"``)."""
KINDS = ("logistic", "stumps")
TRIAGE_SOURCES = ("constant", "fine_detector")
"""What the ``triage_probability`` feature held when the filter was fitted, and so must hold when it scores:
``"constant"``: 1.0 for every row (seeded candidates, no proposer model: the filter learned no weight
for it); ``"fine_detector"``: the checkpoint's fine detector's maximum probability over the refined
mask (:func:`~lungvl_model.inference.fine_detection.probability_over`), for every candidate whoever
proposed it."""


@dataclass(frozen=True)
class CandidateFilterConfig:
    """How the candidate classifier is fitted.

    Attributes:
        kind: ``"logistic"`` or ``"stumps"``.
        l2: L2 penalty (logistic: on the standardised weights; stumps: added to the leaf hessian).
        n_rounds: boosting rounds (stumps).
        learning_rate: shrinkage of each stump (stumps).
        n_split_points: candidate split points per feature, at evenly spaced quantiles (stumps).
        max_iter: Newton iterations (logistic).
        positive_weight: weight of a nodule row in the loss relative to a non-nodule row (the hard
            negatives outnumber the nodules ~25:1).
        target_sensitivity: fraction of true candidates the operating threshold keeps on validation data.
    """

    kind: str = "logistic"
    l2: float = 1.0
    n_rounds: int = 200
    learning_rate: float = 0.1
    n_split_points: int = 32
    max_iter: int = 50
    positive_weight: float = 5.0
    target_sensitivity: float = 0.95

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"CandidateFilterConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"CandidateFilterConfig.l2 must be >= 0, got {self.l2!r}")
        for key in ("n_rounds", "n_split_points", "max_iter"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CandidateFilterConfig.{key} must be a positive int, got {v!r}")
        if not (math.isfinite(self.positive_weight) and self.positive_weight > 0):
            raise ValueError(f"CandidateFilterConfig.positive_weight must be > 0, got {self.positive_weight!r}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError(f"CandidateFilterConfig.learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(
                f"CandidateFilterConfig.target_sensitivity must be in (0, 1], got {self.target_sensitivity!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


@dataclass
class CandidateFilter:
    """A fitted candidate classifier.

    Attributes:
        config: how it was fitted.
        feature_names: the features it expects, in order.
        params: ``logistic``: ``mean``, ``scale``, ``weights`` (lists of F) and ``bias``; ``stumps``:
            ``base`` and ``stumps`` as ``[feature index, split, value if <= split, value if > split]``.
        threshold: operating threshold on :meth:`predict_proba` (keep ``p >= threshold``).
        metrics: validation numbers recorded at training time (free-form, JSON-ready).
        triage_source: what its ``triage_probability`` feature holds (one of :data:`TRIAGE_SOURCES`).
    """

    config: CandidateFilterConfig
    feature_names: tuple[str, ...]
    params: dict[str, Any]
    threshold: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)
    triage_source: str = "constant"

    def __post_init__(self) -> None:
        if self.triage_source not in TRIAGE_SOURCES:
            raise ValueError(
                f"CandidateFilter.triage_source must be one of {TRIAGE_SOURCES}, got {self.triage_source!r}"
            )

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N,)`` of features ``(N, F)``."""
        x = _check_x(x, len(self.feature_names))
        if self.config.kind == "logistic":
            z = (x - np.asarray(self.params["mean"])) / np.asarray(self.params["scale"])
            return np.asarray(z @ np.asarray(self.params["weights"]) + float(self.params["bias"]))
        out = np.full(len(x), float(self.params["base"]))
        for f, s, left, right in self.params["stumps"]:
            out += np.where(x[:, int(f)] <= s, left, right)
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Nodule probabilities ``(N,)`` of features ``(N, F)``."""
        return _sigmoid(self.decision_function(x))

    def keep(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: candidates at or above the operating threshold."""
        return self.predict_proba(x) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see :func:`save_candidate_filter`)."""
        return {
            "kind": "lungvl.candidate_filter",
            "version": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "feature_names": list(self.feature_names),
            "params": self.params,
            "threshold": float(self.threshold),
            "triage_source": self.triage_source,
            "metrics": self.metrics,
        }


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, float))))


def _check_x(x: np.ndarray, n_features: int) -> np.ndarray:
    x = np.asarray(x, float)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"candidate filter: features must have shape (N, {n_features}), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("candidate filter: features contain NaN or inf")
    return x


def _fit_logistic(x: np.ndarray, y: np.ndarray, sw: np.ndarray, cfg: CandidateFilterConfig) -> dict[str, Any]:
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    pen = np.full(z.shape[1], cfg.l2)
    pen[-1] = 0.0  # no penalty on the bias
    for _ in range(cfg.max_iter):
        p = _sigmoid(z @ w)
        grad = z.T @ (sw * (p - y)) + pen * w
        hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(pen + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return {"mean": mean.tolist(), "scale": scale.tolist(), "weights": w[:-1].tolist(), "bias": float(w[-1])}


def _fit_stumps(x: np.ndarray, y: np.ndarray, sw: np.ndarray, cfg: CandidateFilterConfig) -> dict[str, Any]:
    prior = float(np.clip(np.sum(sw * y) / np.sum(sw), 1e-6, 1 - 1e-6))
    base = math.log(prior / (1 - prior))
    qs = np.linspace(0, 1, cfg.n_split_points + 2)[1:-1]
    splits = [np.unique(np.quantile(x[:, f], qs)) for f in range(x.shape[1])]
    below = [x[:, f][:, None] <= s[None, :] for f, s in enumerate(splits)]  # (N, S_f) each
    score = np.full(len(x), base)
    stumps: list[list[float]] = []
    lam = max(cfg.l2, 1e-6)
    for _ in range(cfg.n_rounds):
        p = _sigmoid(score)
        g, h = sw * (p - y), sw * p * (1 - p)
        gt, ht = g.sum(), h.sum()
        best: tuple[float, int, float, float, float] | None = None
        for f, b in enumerate(below):
            if b.shape[1] == 0:
                continue
            gl, hl = g @ b, h @ b
            gr, hr = gt - gl, ht - hl
            gain = gl**2 / (hl + lam) + gr**2 / (hr + lam)
            k = int(np.argmax(gain))
            if best is None or gain[k] > best[0]:
                best = (float(gain[k]), f, float(splits[f][k]), -gl[k] / (hl[k] + lam), -gr[k] / (hr[k] + lam))
        if best is None:
            break
        _, f, s, vl, vr = best
        vl, vr = cfg.learning_rate * vl, cfg.learning_rate * vr
        stumps.append([float(f), s, float(vl), float(vr)])
        score += np.where(x[:, f] <= s, vl, vr)
    return {"base": base, "stumps": stumps}


def fit_candidate_filter(
    x: np.ndarray,
    y: np.ndarray,
    config: CandidateFilterConfig | None = None,
    feature_names: Sequence[str] = FEATURE_NAMES,
) -> CandidateFilter:
    """Fit a classifier (threshold 0.5 until :func:`choose_threshold` sets one).

    Args:
        x: ``(N, F)`` features.
        y: ``(N,)`` labels, 1 = nodule.
        config: model kind and hyper-parameters.
        feature_names: names of the F features.

    Returns:
        The fitted filter.

    Raises:
        ValueError: shapes differ, non-finite features, or a single class.
    """
    cfg = config or CandidateFilterConfig()
    x = _check_x(x, len(feature_names))
    y = np.asarray(y, float).ravel()
    if len(y) != len(x):
        raise ValueError(f"fit_candidate_filter: {len(x)} feature rows for {len(y)} labels")
    if not np.all((y == 0) | (y == 1)) or len(np.unique(y)) < 2:
        raise ValueError("fit_candidate_filter: labels must be 0/1 with both classes present")
    sw = np.where(y == 1, cfg.positive_weight, 1.0)
    params = _fit_logistic(x, y, sw, cfg) if cfg.kind == "logistic" else _fit_stumps(x, y, sw, cfg)
    return CandidateFilter(cfg, tuple(feature_names), params)


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target_sensitivity: float) -> float:
    """Highest threshold ``t`` with ``mean(scores[labels == 1] >= t) >= target_sensitivity``.

    Args:
        scores: ``(N,)`` probabilities.
        labels: ``(N,)`` 0/1.
        target_sensitivity: in (0, 1].

    Returns:
        The threshold (a positive's score).

    Raises:
        ValueError: without positives or with a target outside (0, 1].
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"choose_threshold: target_sensitivity must be in (0, 1], got {target_sensitivity!r}")
    pos = np.sort(np.asarray(scores, float)[np.asarray(labels) == 1])[::-1]
    if pos.size == 0:
        raise ValueError("choose_threshold: no positive candidates")
    k = int(math.ceil(target_sensitivity * pos.size - 1e-9))  # keep the k highest-scored positives
    return float(pos[max(k, 1) - 1])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count 1/2); NaN with a single class."""
    s, y = np.asarray(scores, float), np.asarray(labels) == 1
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(order.size)
    allv = np.concatenate([pos, neg])[order]
    r = np.arange(1, order.size + 1, dtype=float)
    _, inv, cnt = np.unique(allv, return_inverse=True, return_counts=True)
    avg = np.bincount(inv, weights=r) / cnt  # average rank of tied values
    ranks[order] = avg[inv]
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def score_findings(
    findings: Sequence[Finding],
    volume: CTVolume,
    lungs: np.ndarray,
    flt: CandidateFilter,
    config: FeatureConfig | None = None,
    detector_probability: Sequence[float] | None = None,
) -> np.ndarray:
    """Set each finding's ``nodule_probability`` from its features (findings without a mask get 0).

    Args:
        findings: measured findings (mask crops on ``volume``'s grid); updated in place.
        volume: the CT.
        lungs: ``(Z, Y, X)`` lung mask of the CT.
        flt: the fitted filter.
        config: feature parameters.
        detector_probability: ``(N,)`` the fine detector's maximum probability over each finding's mask;
            required by a filter whose ``triage_source`` is ``"fine_detector"``, ignored otherwise.

    Returns:
        ``(N,)`` the probabilities, in the order of ``findings``.

    Raises:
        ValueError: a fine-detector filter without ``detector_probability`` (or one of another length).
    """
    if flt.triage_source == "fine_detector":
        if detector_probability is None or len(detector_probability) != len(findings):
            raise ValueError(
                "candidate filter: it was fitted on the fine detector's probability; give one per finding "
                f"({len(findings)} findings, got {None if detector_probability is None else len(detector_probability)})"
            )
        triage = [float(v) for v in detector_probability]
    else:
        triage = [1.0] * len(findings)  # what it was fitted on (seeded rows): a constant it learned no weight for
    out = np.zeros(len(findings))
    rows, idx = [], []
    for i, f in enumerate(findings):
        if f.mask is not None and f.mask.any():
            rows.append(candidate_features(volume.hu, volume.spacing, f.mask, f.offset, lungs, triage[i], config))
            idx.append(i)
    if rows:
        out[idx] = flt.predict_proba(np.stack(rows))
    for f, p in zip(findings, out, strict=True):
        f.nodule_probability = round(float(p), 5)
    return out


# --------------------------------------------------------------------------------------------- files


def save_candidate_filter(flt: CandidateFilter, path: str | Path) -> Path:
    """Write the filter as strict JSON, atomically; a directory gets :data:`FILENAME` inside it."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    return write_json_atomic(p, flt.to_dict(), indent=1)


def _need(doc: Mapping[str, Any], key: str, p: Path) -> Any:
    if key not in doc:
        raise CorruptStateError(f"{p}: damaged candidate filter: key {key!r} missing")
    return doc[key]


def load_candidate_filter(path: str | Path) -> CandidateFilter:
    """Read a filter written by :func:`save_candidate_filter` (a directory: its :data:`FILENAME`).

    Raises:
        FileNotFoundError: no such file.
        CorruptStateError: not JSON, another kind of document, a newer version, or a missing or invalid
            key (the message names the file and the key).
    """
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    raw = p.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStateError(f"{p}: damaged candidate filter ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "lungvl.candidate_filter":
        raise CorruptStateError(f"{p}: not a candidate filter (key 'kind' is not 'lungvl.candidate_filter')")
    version = _need(doc, "version", p)
    if version not in (1, SCHEMA_VERSION):
        raise CorruptStateError(
            f"{p}: candidate filter key 'version' is {version!r}, this lungvl reads 1 and {SCHEMA_VERSION}"
        )
    source = "constant" if version == 1 else _need(doc, "triage_source", p)
    if source not in TRIAGE_SOURCES:
        raise CorruptStateError(
            f"{p}: candidate filter key 'triage_source' must be one of {TRIAGE_SOURCES}, got {source!r}"
        )
    try:
        cfg = CandidateFilterConfig(**_need(doc, "config", p))
    except (TypeError, ValueError) as e:
        raise CorruptStateError(f"{p}: candidate filter key 'config' is invalid ({e})") from None
    names = tuple(str(n) for n in _need(doc, "feature_names", p))
    if names != FEATURE_NAMES:
        raise CorruptStateError(f"{p}: candidate filter key 'feature_names' {list(names)} differs from {FEATURE_NAMES}")
    params = _need(doc, "params", p)
    keys = ("mean", "scale", "weights", "bias") if cfg.kind == "logistic" else ("base", "stumps")
    for k in keys:
        if not isinstance(params, dict) or k not in params:
            raise CorruptStateError(f"{p}: damaged candidate filter: key 'params.{k}' missing")
    threshold = _need(doc, "threshold", p)
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise CorruptStateError(f"{p}: candidate filter key 'threshold' must be in [0, 1], got {threshold!r}")
    flt = CandidateFilter(cfg, names, params, float(threshold), dict(doc.get("metrics") or {}), source)
    try:
        flt.decision_function(np.zeros((1, len(names))))
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise CorruptStateError(f"{p}: candidate filter key 'params' is invalid ({type(e).__name__}: {e})") from None
    return flt


def load_from_checkpoint(checkpoint_dir: str | Path) -> CandidateFilter | None:
    """The filter beside a checkpoint, or None when the checkpoint has none (damaged: CorruptStateError)."""
    p = Path(checkpoint_dir) / FILENAME
    return load_candidate_filter(p) if p.is_file() else None

"""Calibration stored beside a checkpoint: head temperatures, the deferral policy, and how they were fitted.

``calibration.json`` is a versioned document (:data:`SCHEMA_VERSION`)::

    {"kind": "lungvl-calibration", "schema_version": 3,
     "sentence_entropy_threshold": 1.2 | null,          # the historical per-sentence threshold (nats)
     "finding_threshold": 0.31 | null,                  # candidate-filter score a finding must reach (v3)
     "temperatures": {"malignancy": 1.7, "lung_rads": 2.3},
     "deferral_policy": {...} | null,                    # DeferralPolicy.to_dict()
     "validation_split": {"study_count": 120, "validation_fraction": 0.15, "test_fraction": 0.2,
                          "salt": "lungvl-holdout"} | null,
     "metrics": {...}, "details": {...}}                 # before/after numbers; free-form extras

It is written atomically (temporary file + ``os.replace``). A file of the first format, a JSON object
holding ``sentence_entropy_threshold`` and free-form details, still loads (temperatures 1, no policy); a
version-2 document has no ``finding_threshold`` (None: the candidate filter's own operating point).
Anything else that is not this document raises :class:`~lungvl_model.errors.CorruptStateError` naming
the file and the key.

:func:`fit_calibration` builds the state from per-report :class:`CalibrationRecord` s of the validation
split: temperatures first (so the malignancy probability among the deferral signals is the calibrated
one), then the deferral policy (:func:`lungvl_model.inference.deferral.fit_policy`), then the
risk–coverage numbers of the policy's score against the entropy-only baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit, softmax

from lungvl_model.atomic_file import write_json_atomic
from lungvl_model.data.split import DEFAULT_SALT, check_split_fractions
from lungvl_model.data.targets import LUNG_RADS_CLASSES
from lungvl_model.errors import CorruptStateError
from lungvl_model.evaluation.risk_coverage import aurc, risk_coverage_curve, selective_error
from lungvl_model.inference.deferral import DeferralPolicy, DeferralSignals, deferral_score, fit_policy
from lungvl_model.inference.temperature import (
    T_MAX,
    T_MIN,
    DegenerateCalibrationError,
    fit_binary_temperature,
    fit_multiclass_temperature,
)

__all__ = [
    "CALIBRATION_FILE",
    "SCHEMA_VERSION",
    "CalibrationRecord",
    "CalibrationState",
    "ValidationSplitInfo",
    "fit_calibration",
    "load_state",
    "load_threshold",
    "save_state",
    "save_threshold",
]

CALIBRATION_FILE = "calibration.json"
SCHEMA_VERSION = 3
KIND = "lungvl-calibration"
_LEGACY_INF = 1e9  # how an infinite (never defer) sentence threshold is stored, as in the first format


# --------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class ValidationSplitInfo:
    """The validation split the calibration was fitted on.

    Attributes:
        study_count: validation studies (records) used.
        validation_fraction: the split's validation fraction of patients.
        test_fraction: the split's test fraction of patients.
        salt: the split's hash salt.
    """

    study_count: int
    validation_fraction: float
    test_fraction: float = 0.0
    salt: str = DEFAULT_SALT

    def __post_init__(self) -> None:
        """Validate the fields (``ValueError`` naming the field and value)."""
        if isinstance(self.study_count, bool) or not isinstance(self.study_count, int) or self.study_count < 0:
            raise ValueError(f"study_count must be an integer >= 0, got {self.study_count!r}")
        check_split_fractions(self.test_fraction, self.validation_fraction)
        if not isinstance(self.salt, str):
            raise ValueError(f"salt must be a string, got {self.salt!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dataclasses.asdict(self)


def _temperature(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not T_MIN <= value <= T_MAX:
        raise ValueError(f"{key} must be a number in [{T_MIN}, {T_MAX}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CalibrationState:
    """Everything ``calibration.json`` holds.

    Attributes:
        sentence_entropy_threshold: per-sentence mean-entropy threshold (nats) for ``explain``; None: use
            the config default.
        malignancy_temperature: divides ``RiskOutput.malignancy_logit``.
        lung_rads_temperature: divides ``RiskOutput.lung_rads_logits``.
        deferral_policy: the fitted policy (None: not fitted).
        validation_split: the data it was fitted on (None: unknown, e.g. a first-format file).
        finding_threshold: the candidate-filter score a finding must reach to be reported: the
            validation scans' FROC operating point (:func:`~lungvl_model.evaluation.froc.operating_threshold`);
            None: the filter's own threshold (fitted for 95 % sensitivity on its training seeds).
        metrics: JSON-ready numbers before/after calibration.
        details: JSON-ready free-form extras (e.g. what ``evaluate --calibrate`` counted).
    """

    sentence_entropy_threshold: float | None = None
    malignancy_temperature: float = 1.0
    lung_rads_temperature: float = 1.0
    deferral_policy: DeferralPolicy | None = None
    validation_split: ValidationSplitInfo | None = None
    finding_threshold: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the fields (``ValueError`` naming the field and value)."""
        t = self.sentence_entropy_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t)):
            raise ValueError(f"sentence_entropy_threshold must be a finite number or null, got {t!r}")
        f = self.finding_threshold
        if f is not None and (isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f <= 1.0):
            raise ValueError(f"finding_threshold must be a number in [0, 1] or null, got {f!r}")
        _temperature("malignancy_temperature", self.malignancy_temperature)
        _temperature("lung_rads_temperature", self.lung_rads_temperature)
        if self.deferral_policy is not None and not isinstance(self.deferral_policy, DeferralPolicy):
            raise ValueError(f"deferral_policy must be a DeferralPolicy, got {type(self.deferral_policy).__name__}")
        if self.validation_split is not None and not isinstance(self.validation_split, ValidationSplitInfo):
            raise ValueError(f"validation_split must be a ValidationSplitInfo, got {self.validation_split!r}")
        for key in ("metrics", "details"):
            if not isinstance(getattr(self, key), Mapping):
                raise ValueError(f"{key} must be a JSON object, got {getattr(self, key)!r}")

    def malignancy_probability(self, logit: float) -> float:
        """Calibrated malignancy probability ``sigmoid(logit / T)``."""
        return float(expit(float(logit) / self.malignancy_temperature))

    def lung_rads_probabilities(self, logits: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated Lung-RADS probabilities ``softmax(logits / T)``, ``(C,)`` or ``(B, C)``."""
        return np.asarray(softmax(np.asarray(logits, dtype=float) / self.lung_rads_temperature, axis=-1))

    def to_dict(self) -> dict[str, Any]:
        """The ``calibration.json`` document (non-finite numbers in metrics/details become null)."""
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "sentence_entropy_threshold": self.sentence_entropy_threshold,
            "finding_threshold": self.finding_threshold,
            "temperatures": {"malignancy": self.malignancy_temperature, "lung_rads": self.lung_rads_temperature},
            "deferral_policy": None if self.deferral_policy is None else self.deferral_policy.to_dict(),
            "validation_split": None if self.validation_split is None else self.validation_split.to_dict(),
            "metrics": _jsonable(self.metrics),
            "details": _jsonable(self.details),
        }


def _jsonable(x: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, NaN and infinities as None."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


# --------------------------------------------------------------------------------------------- files


def _atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write strict JSON atomically (:func:`lungvl_model.atomic_file.write_json_atomic`)."""
    write_json_atomic(path, payload)


def save_state(checkpoint_dir: str | Path, state: CalibrationState) -> Path:
    """Write ``calibration.json`` atomically into a checkpoint directory.

    Returns:
        The file's path.
    """
    p = Path(checkpoint_dir) / CALIBRATION_FILE
    _atomic_write_json(p, state.to_dict())
    return p


def _parse(doc: Any) -> CalibrationState:
    """Build a state from a parsed document; ``ValueError`` messages start with the offending key."""
    if not isinstance(doc, dict):
        raise ValueError(f"top level: expected a JSON object, got {type(doc).__name__}")
    if "schema_version" not in doc:
        if "sentence_entropy_threshold" not in doc:
            raise ValueError("schema_version: missing (and no 'sentence_entropy_threshold'): not a lungvl calibration")
        rest = {k: v for k, v in doc.items() if k != "sentence_entropy_threshold"}
        try:
            return CalibrationState(sentence_entropy_threshold=float(doc["sentence_entropy_threshold"]), details=rest)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sentence_entropy_threshold: {e}") from None
    version = doc["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 2:
        raise ValueError(f"schema_version: expected an integer >= 2, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version: {version} is newer than this lungvl reads ({SCHEMA_VERSION})")
    if doc.get("kind") != KIND:
        raise ValueError(f"kind: expected {KIND!r}, got {doc.get('kind')!r}")
    expected = {"kind", "schema_version", "sentence_entropy_threshold", "temperatures", "deferral_policy",
                "validation_split", "metrics", "details"}  # fmt: skip
    if version >= 3:
        expected.add("finding_threshold")
    missing, unknown = sorted(expected - set(doc)), sorted(set(doc) - expected)
    if missing:
        raise ValueError(f"{', '.join(missing)}: missing")
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: unknown key")
    temps = doc["temperatures"]
    if not isinstance(temps, dict) or set(temps) != {"malignancy", "lung_rads"}:
        raise ValueError(f"temperatures: expected {{'malignancy', 'lung_rads'}}, got {temps!r}")
    kwargs: dict[str, Any] = {
        "sentence_entropy_threshold": doc["sentence_entropy_threshold"],
        "finding_threshold": doc.get("finding_threshold"),
        "malignancy_temperature": temps["malignancy"],
        "lung_rads_temperature": temps["lung_rads"],
        "metrics": doc["metrics"],
        "details": doc["details"],
    }
    for key, build in (("deferral_policy", DeferralPolicy.from_dict), ("validation_split", _split_from_dict)):
        if doc[key] is not None:
            try:
                kwargs[key] = build(doc[key])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{key}: {e}") from None
    return CalibrationState(**kwargs)


def _split_from_dict(d: Any) -> ValidationSplitInfo:
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {d!r}")
    return ValidationSplitInfo(**d)


def load_state(checkpoint_dir: str | Path) -> CalibrationState | None:
    """Read ``calibration.json`` (either format), or None when the checkpoint has not been calibrated.

    Raises:
        CorruptStateError: the file is damaged, of another kind or of a newer schema (names the file and key).
    """
    p = Path(checkpoint_dir) / CALIBRATION_FILE
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStateError(f"{p}: damaged calibration file ({type(e).__name__}: {e})") from None
    try:
        return _parse(doc)
    except (TypeError, ValueError) as e:
        raise CorruptStateError(f"{p}: damaged calibration file: {e}") from None


def save_threshold(checkpoint_dir: str | Path, threshold: float, details: dict[str, Any]) -> Path:
    """Store the per-sentence entropy threshold (nats), keeping a fitted policy and temperatures.

    An infinite threshold (never defer) is stored as 1e9, as before. A damaged existing file is replaced.

    Returns:
        The file's path.
    """
    value = float(threshold) if math.isfinite(threshold) else _LEGACY_INF
    try:
        current = load_state(checkpoint_dir) or CalibrationState()
    except CorruptStateError:
        current = CalibrationState()
    return save_state(
        checkpoint_dir, dataclasses.replace(current, sentence_entropy_threshold=value, details=dict(details))
    )


def load_threshold(checkpoint_dir: str | Path) -> float | None:
    """The calibrated per-sentence threshold, or None when the checkpoint has none.

    Raises:
        CorruptStateError: the calibration file is damaged (named).
    """
    state = load_state(checkpoint_dir)
    return None if state is None else state.sentence_entropy_threshold


# --------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class CalibrationRecord:
    """One validation report, as ``explain`` + the reference labels give it.

    Attributes:
        study_uid: the study.
        malignancy_logit: ``RiskOutput.malignancy_logit`` (uncalibrated).
        malignancy_label: reference malignancy (0/1), None when unknown.
        lung_rads_logits: ``RiskOutput.lung_rads_logits`` over :data:`LUNG_RADS_CLASSES`, ``(6,)``.
        lung_rads_label: reference index into :data:`LUNG_RADS_CLASSES`, -1 when unknown.
        signals: the report's deferral signals (its ``malignancy_probability`` is replaced by the
            calibrated study head's when fitting, if it came from the study head).
        wrong: whether the report is wrong (e.g. its Lung-RADS differs from the reference).
        malignancy_from_study_head: the signals' malignancy probability is the study head's (``explain`` without
            a nodule-level risk head). False: it is the nodule-level head's noisy-OR, which the study head's
            temperature does not scale, and the policy is fitted on it as ``explain`` will give it.
    """

    study_uid: str
    malignancy_logit: float
    malignancy_label: int | None
    lung_rads_logits: tuple[float, ...]
    lung_rads_label: int
    signals: DeferralSignals
    wrong: bool
    malignancy_from_study_head: bool = True

    def __post_init__(self) -> None:
        """Validate the fields (``ValueError`` naming the study, the field and the value)."""
        where = f"record {self.study_uid!r}"
        if not isinstance(self.malignancy_logit, int | float) or not math.isfinite(self.malignancy_logit):
            raise ValueError(f"{where}: malignancy_logit must be a finite number, got {self.malignancy_logit!r}")
        if self.malignancy_label not in (None, 0, 1) or isinstance(self.malignancy_label, float):
            raise ValueError(f"{where}: malignancy_label must be 0, 1 or None, got {self.malignancy_label!r}")
        logits = tuple(float(v) for v in self.lung_rads_logits)
        if len(logits) != len(LUNG_RADS_CLASSES) or not all(math.isfinite(v) for v in logits):
            n = len(LUNG_RADS_CLASSES)
            raise ValueError(f"{where}: lung_rads_logits must be {n} finite numbers, got {self.lung_rads_logits!r}")
        object.__setattr__(self, "lung_rads_logits", logits)
        lab = self.lung_rads_label
        if isinstance(lab, bool) or not isinstance(lab, int) or not -1 <= lab < len(LUNG_RADS_CLASSES):
            raise ValueError(f"{where}: lung_rads_label must be -1 or in [0, {len(LUNG_RADS_CLASSES)}), got {lab!r}")
        if not isinstance(self.signals, DeferralSignals):
            raise ValueError(f"{where}: signals must be DeferralSignals, got {type(self.signals).__name__}")
        if not isinstance(self.wrong, bool | np.bool_):
            raise ValueError(f"{where}: wrong must be True or False, got {self.wrong!r}")
        if not isinstance(self.malignancy_from_study_head, bool | np.bool_):
            raise ValueError(
                f"{where}: malignancy_from_study_head must be True or False, got {self.malignancy_from_study_head!r}"
            )


def fit_calibration(
    records: Sequence[CalibrationRecord],
    *,
    split: ValidationSplitInfo | None = None,
    max_deferral_rate: float = 0.3,
    l2: float = 0.1,
    base_policy: DeferralPolicy | None = None,
    sentence_entropy_threshold: float | None = None,
) -> CalibrationState:
    """Fit temperatures and the deferral policy on validation reports.

    A head whose known labels hold a single class (or fewer than two items) keeps ``T = 1``; its metrics
    entry then says why (``"skipped"``).

    Args:
        records: the validation split's reports (>= 1).
        split: the split they came from (stored; ``study_count`` should equal ``len(records)``).
        max_deferral_rate: deferral budget on validation, in (0, 1].
        l2: L2 penalty of the learned score.
        base_policy: hard rules (default :class:`DeferralPolicy`).
        sentence_entropy_threshold: kept in the state for ``explain``'s per-sentence flag; ``+inf`` (nothing to
            defer, as :func:`calibrate_entropy_threshold` returns when every sentence meets the target) is stored
            as the same large finite value :func:`save_threshold` writes.

    Returns:
        The :class:`CalibrationState`; ``metrics`` holds ``malignancy`` and ``lung_rads`` (NLL/ECE before and
        after), ``deferral`` (the fit summary) and ``risk_coverage`` (policy score vs entropy alone: AURC and
        error of kept reports at ``max_deferral_rate``).

    Raises:
        ValueError: no records, or invalid arguments.
    """
    if not records:
        raise ValueError("records must not be empty")
    metrics: dict[str, Any] = {}
    known_m = [r for r in records if r.malignancy_label is not None]
    t_mal = _fit_head(
        metrics,
        "malignancy",
        lambda: fit_binary_temperature(
            np.array([r.malignancy_logit for r in known_m]), np.array([r.malignancy_label for r in known_m])
        ),
        len(known_m),
    )
    known_lr = [r for r in records if r.lung_rads_label >= 0]
    t_lr = _fit_head(
        metrics,
        "lung_rads",
        lambda: fit_multiclass_temperature(
            np.array([r.lung_rads_logits for r in known_lr]), np.array([r.lung_rads_label for r in known_lr])
        ),
        len(known_lr),
    )
    signals = [  # the deferral feature as explain computes it: the calibrated study head, or the nodule-level head
        dataclasses.replace(r.signals, malignancy_probability=float(expit(r.malignancy_logit / t_mal)))
        if r.malignancy_from_study_head
        else r.signals
        for r in records
    ]
    wrong = np.array([bool(r.wrong) for r in records])
    policy, summary = fit_policy(signals, wrong, max_deferral_rate=max_deferral_rate, l2=l2, base=base_policy)
    metrics["deferral"] = summary
    score = np.array([deferral_score(s, policy) for s in signals])
    entropy = np.array([s.max_key_entropy for s in signals])
    rate = min(max_deferral_rate, 0.999)
    metrics["risk_coverage"] = {
        "max_deferral_rate": max_deferral_rate,
        "policy": {"aurc": aurc(risk_coverage_curve(wrong, score)), **selective_error(wrong, score, rate)},
        "entropy_only": {"aurc": aurc(risk_coverage_curve(wrong, entropy)), **selective_error(wrong, entropy, rate)},
    }
    return CalibrationState(
        sentence_entropy_threshold=(
            sentence_entropy_threshold
            if sentence_entropy_threshold is None or math.isfinite(sentence_entropy_threshold)
            else _LEGACY_INF
        ),
        malignancy_temperature=t_mal,
        lung_rads_temperature=t_lr,
        deferral_policy=policy,
        validation_split=split,
        metrics=_jsonable(metrics),
    )


def _fit_head(metrics: dict[str, Any], name: str, fit: Any, n_known: int) -> float:
    if n_known < 2:
        metrics[name] = {"skipped": f"{n_known} validation report(s) with a known label", "n": n_known}
        return 1.0
    try:
        result = fit()
    except DegenerateCalibrationError as e:
        metrics[name] = {"skipped": str(e), "n": n_known}
        return 1.0
    metrics[name] = result.to_dict()
    return float(result.temperature)

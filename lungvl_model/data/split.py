"""Deterministic patient-level hold-out split of a site's studies (evaluation on unseen patients).

A study goes to the hold-out set when ``sha256(salt + patient key)`` falls below ``fraction``; all
studies of one patient (baseline and priors) land on the same side, so a model is never scored on a
patient whose other scan it trained on. The split depends only on the patient key and the salt, not
on the order or number of studies, so adding studies to a site never moves existing patients.

Three-way split (:func:`split_of`, :func:`three_way_split`, :func:`catalogue_split`): the test side is
exactly the hold-out above (``u < test_fraction`` with ``u`` the patient's hash in [0, 1)); validation
(for calibration: temperatures, deferral policy) is carved from the top of the non-test part,
``u >= 1 - validation_fraction``. Growing ``test_fraction`` never moves a patient out of test or into
validation; growing ``validation_fraction`` never touches test and only moves training patients into
validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lungvl_model.data.catalogue import SiteCatalogue

__all__ = [
    "DEFAULT_SALT",
    "Split",
    "StudySplit",
    "catalogue_split",
    "check_split_fractions",
    "holdout_split",
    "in_holdout",
    "patient_groups",
    "patient_pairs",
    "split_of",
    "three_way_split",
    "training_patients",
    "training_studies",
]

DEFAULT_SALT = "lungvl-holdout"
"""Salt of the hold-out hash (the test split); the validation split uses the same hash."""

Split = Literal["train", "validation", "test"]


def in_holdout(patient_key: str, fraction: float, salt: str = "lungvl-holdout") -> bool:
    """Whether a patient belongs to the hold-out set.

    Args:
        patient_key: the patient's identifier (PatientID, or the StudyInstanceUID when absent).
        fraction: expected hold-out fraction in [0, 1).
        salt: changes the assignment without changing the fraction.

    Returns:
        True for a hold-out patient.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction!r}")
    return _unit_hash(patient_key, salt) < fraction


def _unit_hash(patient_key: str, salt: str) -> float:
    """The patient's position in [0, 1): the first 8 bytes of ``sha256(salt NUL key)`` over 2**64."""
    digest = hashlib.sha256(f"{salt}\x00{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_holdout_fraction(fraction: object, *, key: str = "holdout_fraction") -> float:
    """The one rule for a hold-out fraction: a number in [0, 1) (raises ``ValueError`` naming ``key``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ValueError(f"{key} must be a number in [0, 1), got {fraction!r}")
    return float(fraction)


def holdout_split(
    studies: Iterable[tuple[str, str]], fraction: float, *, salt: str = "lungvl-holdout", min_each: int = 1
) -> tuple[list[str], list[str]]:
    """Split ``(study_uid, patient_key)`` pairs into training and hold-out study UIDs by patient.

    When the hash puts every patient on one side although both could be non-empty (tiny sites), the
    patient with the smallest hash is moved so that each side keeps at least ``min_each`` patient
    (when there are at least two patients and ``fraction > 0``).

    Args:
        studies: ``(study_uid, patient_key)`` pairs; an empty patient key falls back to the study UID.
        fraction: expected hold-out fraction of patients in [0, 1); 0 keeps everything for training.
        salt: see :func:`in_holdout`.
        min_each: patients kept on each side when possible (0 disables the adjustment).

    Returns:
        ``(train_uids, holdout_uids)`` in input order.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    fraction = check_holdout_fraction(fraction, key="hold-out fraction")
    pairs = [(uid, key or uid) for uid, key in studies]
    if fraction == 0.0:
        return [u for u, _ in pairs], []
    held = {key for _, key in pairs if in_holdout(key, fraction, salt)}
    patients = sorted({key for _, key in pairs}, key=lambda k: hashlib.sha256(f"{salt}\x00{k}".encode()).digest())
    if min_each and len(patients) >= 2:
        if not held:
            held = {patients[0]}
        elif len(held) == len(patients):
            held.discard(patients[-1])
    train = [u for u, k in pairs if k not in held]
    hold = [u for u, k in pairs if k in held]
    return train, hold


def check_split_fractions(test_fraction: object, validation_fraction: object) -> tuple[float, float]:
    """The one rule for a three-way split: each fraction in [0, 1) and their sum below 1.

    Args:
        test_fraction: expected fraction of patients in the test split.
        validation_fraction: expected fraction of patients in the validation split.

    Returns:
        ``(test_fraction, validation_fraction)`` as floats.

    Raises:
        ValueError: naming the offending key and value.
    """
    t = check_holdout_fraction(test_fraction, key="test_fraction")
    v = check_holdout_fraction(validation_fraction, key="validation_fraction")
    if t + v >= 1.0:
        raise ValueError(
            f"test_fraction + validation_fraction must be < 1 (some patients must train), got "
            f"test_fraction={test_fraction!r} + validation_fraction={validation_fraction!r} = {t + v!r}"
        )
    return t, v


def split_of(patient_key: str, *, test_fraction: float, validation_fraction: float, salt: str = DEFAULT_SALT) -> Split:
    """The split a patient belongs to (hash only; :func:`three_way_split` adds the tiny-site adjustment).

    ``"test"`` exactly when :func:`in_holdout` ``(patient_key, test_fraction, salt)``; ``"validation"``
    when the patient's hash is in the top ``validation_fraction`` of [0, 1); ``"train"`` otherwise.

    Args:
        patient_key: the patient's identifier (PatientID, or the StudyInstanceUID when absent).
        test_fraction: expected test fraction in [0, 1).
        validation_fraction: expected validation fraction in [0, 1); ``test + validation < 1``.
        salt: see :func:`in_holdout`.

    Returns:
        ``"train"``, ``"validation"`` or ``"test"``.

    Raises:
        ValueError: invalid fractions (see :func:`check_split_fractions`).
    """
    t, v = check_split_fractions(test_fraction, validation_fraction)
    u = _unit_hash(patient_key, salt)
    if u < t:
        return "test"
    return "validation" if u >= 1.0 - v else "train"


@dataclass(frozen=True)
class StudySplit:
    """Study UIDs per split (each in input order) and the parameters that produced them.

    Attributes:
        train: study UIDs to train on.
        validation: study UIDs to calibrate on (temperatures, deferral policy); never trained or tested on.
        test: study UIDs to report results on (the hold-out of :func:`holdout_split`).
        test_fraction: expected test fraction of patients.
        validation_fraction: expected validation fraction of patients.
        salt: hash salt.
    """

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    test_fraction: float
    validation_fraction: float
    salt: str

    def of(self, split: Split) -> tuple[str, ...]:
        """The study UIDs of one split by name.

        Raises:
            ValueError: unknown split name.
        """
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        return tuple(getattr(self, split))

    def counts(self) -> dict[str, int]:
        """Number of studies per split."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def three_way_split(
    studies: Iterable[tuple[str, str]],
    *,
    test_fraction: float,
    validation_fraction: float,
    salt: str = DEFAULT_SALT,
    min_each: int = 1,
) -> StudySplit:
    """Split ``(study_uid, patient_key)`` pairs into train / validation / test study UIDs by patient.

    The test side is exactly ``holdout_split(studies, test_fraction, salt=salt, min_each=min_each)[1]``
    (so a study that was hold-out stays test). Validation is taken from the rest by :func:`split_of`;
    when the hash leaves validation empty although ``validation_fraction > 0`` and at least two non-test
    patients exist, the non-test patient with the largest hash moves to validation; when it would take
    every non-test patient, the one with the smallest hash stays in training (``min_each`` patients;
    0 disables the adjustment, as in :func:`holdout_split`).

    Args:
        studies: ``(study_uid, patient_key)`` pairs; an empty patient key falls back to the study UID.
        test_fraction: expected test fraction of patients in [0, 1).
        validation_fraction: expected validation fraction of patients in [0, 1), ``test + validation < 1``.
        salt: see :func:`in_holdout`.
        min_each: see above.

    Returns:
        The :class:`StudySplit`.

    Raises:
        ValueError: invalid fractions (see :func:`check_split_fractions`).
    """
    t, v = check_split_fractions(test_fraction, validation_fraction)
    pairs = [(uid, key or uid) for uid, key in studies]
    test = set(holdout_split(pairs, t, salt=salt, min_each=min_each)[1])
    rest = sorted({k for u, k in pairs if u not in test}, key=lambda k: _unit_hash(k, salt))
    val = {k for k in rest if _unit_hash(k, salt) >= 1.0 - v}
    if min_each and v > 0.0 and len(rest) >= 2:
        if not val:
            val = {rest[-1]}
        elif len(val) == len(rest):
            val.discard(rest[0])
    return StudySplit(
        train=tuple(u for u, k in pairs if u not in test and k not in val),
        validation=tuple(u for u, k in pairs if u not in test and k in val),
        test=tuple(u for u, _ in pairs if u in test),
        test_fraction=t,
        validation_fraction=v,
        salt=salt,
    )


def catalogue_split(
    catalogue: SiteCatalogue, *, test_fraction: float, validation_fraction: float, salt: str = DEFAULT_SALT
) -> StudySplit:
    """:func:`three_way_split` of a site's usable studies by PatientID (see :func:`patient_pairs`)."""
    return three_way_split(
        patient_pairs(catalogue), test_fraction=test_fraction, validation_fraction=validation_fraction, salt=salt
    )


def patient_pairs(catalogue: SiteCatalogue) -> list[tuple[str, str]]:
    """``(study_uid, PatientID)`` of a site's usable studies (empty PatientID when the header has none)."""
    return [
        (e.study_uid, str(e.series.header.get("PatientID") or "") if e.series is not None else "")
        for e in catalogue.usable
    ]


def patient_groups(pairs: Iterable[tuple[str, str]], study_uids: Sequence[str]) -> list[list[int]]:
    """Positions in ``study_uids`` grouped by patient (DP-SGD's sampling unit), in order of first appearance.

    Args:
        pairs: ``(study_uid, patient_key)`` (e.g. :func:`patient_pairs`); a study whose key is empty, or
            that ``pairs`` does not name, is its own patient (as in :func:`holdout_split`).
        study_uids: the studies to group (e.g. a dataset's, in dataset order).

    Returns:
        One list of positions per patient; together they partition ``range(len(study_uids))``.
    """
    key_of = {uid: key for uid, key in pairs}
    groups: dict[tuple[bool, str], list[int]] = {}
    for i, uid in enumerate(study_uids):
        key = key_of.get(uid, "")
        groups.setdefault((bool(key), key or uid), []).append(i)  # a UID never merges with a PatientID
    return list(groups.values())


def training_patients(
    catalogue: SiteCatalogue, fraction: float, *, require_report: bool = False, validation_fraction: float = 0.0
) -> int:
    """Patients behind :func:`training_studies` (DP-SGD samples patients: ``q = batch / patients``)."""
    uids = training_studies(catalogue, fraction, require_report=require_report, validation_fraction=validation_fraction)
    return len(patient_groups(patient_pairs(catalogue), uids))


def training_studies(
    catalogue: SiteCatalogue, fraction: float, *, require_report: bool = False, validation_fraction: float = 0.0
) -> list[str]:
    """StudyInstanceUIDs a site trains on: the usable studies outside its hold-out (with a report if asked).

    What :class:`client.trainer.SiteTrainer` trains on; a study uses it to size DP-SGD's sampling rate.
    With ``validation_fraction > 0`` the validation split of :func:`three_way_split` is left out too
    (0, the default, keeps the historical two-way behaviour exactly).
    """
    pairs = patient_pairs(catalogue)
    if validation_fraction:
        train = set(three_way_split(pairs, test_fraction=fraction, validation_fraction=validation_fraction).train)
    else:
        train = set(holdout_split(pairs, fraction)[0])
    return [
        e.study_uid for e in catalogue.usable if e.study_uid in train and (e.report is not None or not require_report)
    ]

"""Deterministic patient-level hold-out split of a site's studies (evaluation on unseen patients).

A study goes to the hold-out set when ``sha256(salt + patient key)`` falls below ``fraction``; all
studies of one patient (baseline and priors) land on the same side, so a model is never scored on a
patient whose other scan it trained on. The split depends only on the patient key and the salt, not
on the order or number of studies, so adding studies to a site never moves existing patients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lungvl_model.data.catalogue import SiteCatalogue

__all__ = ["holdout_split", "in_holdout", "patient_groups", "patient_pairs", "training_patients", "training_studies"]


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
    digest = hashlib.sha256(f"{salt}\x00{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


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


def training_patients(catalogue: SiteCatalogue, fraction: float, *, require_report: bool = False) -> int:
    """Patients behind :func:`training_studies` (DP-SGD samples patients: ``q = batch / patients``)."""
    return len(
        patient_groups(patient_pairs(catalogue), training_studies(catalogue, fraction, require_report=require_report))
    )


def training_studies(catalogue: SiteCatalogue, fraction: float, *, require_report: bool = False) -> list[str]:
    """StudyInstanceUIDs a site trains on: the usable studies outside its hold-out (with a report if asked).

    What :class:`client.trainer.SiteTrainer` trains on; a study uses it to size DP-SGD's sampling rate.
    """
    train = set(holdout_split(patient_pairs(catalogue), fraction)[0])
    return [
        e.study_uid for e in catalogue.usable if e.study_uid in train and (e.report is not None or not require_report)
    ]

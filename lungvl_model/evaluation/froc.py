"""FROC analysis of nodule detection, LUNA16 protocol (pure numpy).

Per scan: candidates (LPS centroid, score) and reference nodules (LPS centroid, diameter mm).

* A candidate **hits** a reference nodule when its centroid lies within the nodule's radius
  (``diameter / 2``, optionally at least ``min_radius_mm``) of the nodule's centroid.
* Several hits on one nodule count once, with their highest score; a candidate inside two nodules
  hits both (LUNA16 warns and counts both too).
* A candidate that hits no nodule is a **false positive**, unless it hits an *excluded* reference
  (LUNA16: nodules < 3 mm, non-nodules; here also references below ``min_diameter_mm``): then it is
  ignored.
* Sweeping the score threshold ``t`` (candidates with ``score >= t`` are kept; tied scores enter
  together) gives the curve ``(FP(t) / n_scans, TP(t) / n_nodules)``. The sensitivity at an average
  false-positive rate ``r`` is the highest sensitivity of any threshold with at most ``r`` FPs per scan
  (a step function; LUNA16's script interpolates linearly between curve points, which can only read
  higher). The **CPM** is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan.
* Optional percentile bootstrap over scans (scans resampled with replacement, seeded generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

#: Average false positives per scan at which LUNA16 reads the sensitivity.
LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class FrocInputError(ValueError):
    """A FROC input array has the wrong shape or a non-finite or invalid value."""


@dataclass(frozen=True)
class FrocResult:
    """FROC summary.

    Attributes:
        fp_rates: average FPs per scan where the sensitivity is read.
        sensitivity: ``(len(fp_rates),)`` sensitivity at each rate.
        cpm: mean of ``sensitivity`` (competition performance metric).
        curve_fps: ``(K,)`` average FPs per scan of each distinct threshold, increasing.
        curve_sensitivity: ``(K,)`` sensitivity at those thresholds.
        n_scans: scans.
        n_nodules: reference (non-excluded) nodules.
        n_detected: nodules hit by any candidate.
        n_false_positives: candidates that hit nothing (at the lowest threshold).
        ci_level: bootstrap interval level (None: no bootstrap).
        sensitivity_ci: ``(len(fp_rates), 2)`` bootstrap interval per rate, or None.
        cpm_ci: ``(low, high)`` bootstrap interval of the CPM, or None.
    """

    fp_rates: tuple[float, ...]
    sensitivity: tuple[float, ...]
    cpm: float
    curve_fps: np.ndarray
    curve_sensitivity: np.ndarray
    n_scans: int
    n_nodules: int
    n_detected: int
    n_false_positives: int
    ci_level: float | None = None
    sensitivity_ci: tuple[tuple[float, float], ...] | None = None
    cpm_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (curve as lists)."""
        return {
            "fp_rates": list(self.fp_rates),
            "sensitivity": list(self.sensitivity),
            "cpm": self.cpm,
            "curve_fps": self.curve_fps.tolist(),
            "curve_sensitivity": self.curve_sensitivity.tolist(),
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_detected": self.n_detected,
            "n_false_positives": self.n_false_positives,
            "ci_level": self.ci_level,
            "sensitivity_ci": None if self.sensitivity_ci is None else [list(c) for c in self.sensitivity_ci],
            "cpm_ci": None if self.cpm_ci is None else list(self.cpm_ci),
        }


@dataclass(frozen=True)
class _ScanOutcome:
    """Per-scan matching: best hit score per nodule (-inf when missed) and the FP candidates' scores."""

    nodule_scores: np.ndarray
    fp_scores: np.ndarray


def _points(arr: Any, name: str, scan: int) -> np.ndarray:
    a = np.asarray(arr, dtype=float)
    if a.size == 0:
        return np.zeros((0, 3))
    if a.ndim != 2 or a.shape[1] != 3:
        raise FrocInputError(f"{name} of scan {scan} must have shape (N, 3), got {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise FrocInputError(f"{name} of scan {scan}: row {i} is not finite: {a[i].tolist()}")
    return a


def _values(arr: Any, name: str, scan: int, n: int, *, non_negative: bool = False) -> np.ndarray:
    a = np.asarray(arr, dtype=float).reshape(-1) if np.size(arr) else np.zeros(0)
    if len(a) != n:
        raise FrocInputError(f"{name} of scan {scan} has {len(a)} values for {n} points")
    bad = ~np.isfinite(a) | ((a < 0) if non_negative else False)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise FrocInputError(f"{name} of scan {scan}: value {i} is invalid: {float(a[i])!r}")
    return a


def match_scan(
    cand_points: np.ndarray,
    cand_scores: np.ndarray,
    ref_points: np.ndarray,
    ref_diameters: np.ndarray,
    excluded_points: np.ndarray | None = None,
    excluded_diameters: np.ndarray | None = None,
    min_radius_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Match one scan's candidates to its reference nodules (validated arrays).

    Args:
        cand_points: ``(C, 3)`` candidate centroids (mm).
        cand_scores: ``(C,)`` scores.
        ref_points: ``(R, 3)`` nodule centroids (mm).
        ref_diameters: ``(R,)`` nodule diameters (mm).
        excluded_points: ``(E, 3)`` centroids of references whose hits are ignored.
        excluded_diameters: ``(E,)`` their diameters.
        min_radius_mm: smallest hit radius.

    Returns:
        ``(nodule_scores (R,), fp_scores (F,))``: each nodule's highest hit score (``-inf`` when
        missed) and the scores of the candidates that hit nothing.
    """
    ex_p = np.zeros((0, 3)) if excluded_points is None else excluded_points
    ex_d = np.zeros(0) if excluded_diameters is None else excluded_diameters

    def hits(pts: np.ndarray, diam: np.ndarray) -> np.ndarray:
        radius = np.maximum(diam / 2.0, min_radius_mm)
        d = np.linalg.norm(cand_points[:, None, :] - pts[None, :, :], axis=-1)
        return np.asarray(d <= radius[None, :])  # (C, R)

    h = hits(ref_points, ref_diameters)
    he = hits(ex_p, ex_d)
    scores = np.where(h, cand_scores[:, None], -np.inf)
    nodule_scores = scores.max(axis=0) if len(cand_scores) else np.full(len(ref_points), -np.inf)
    fp = ~h.any(axis=1) & ~he.any(axis=1)
    return nodule_scores, cand_scores[fp]


def _curve(outcomes: Sequence[_ScanOutcome]) -> tuple[np.ndarray, np.ndarray, int]:
    """``(fps per scan (K,), sensitivity (K,), n_nodules)`` over the distinct thresholds, plus t = +inf."""
    nod = np.concatenate([o.nodule_scores for o in outcomes]) if outcomes else np.zeros(0)
    fps = np.concatenate([o.fp_scores for o in outcomes]) if outcomes else np.zeros(0)
    thresholds = np.unique(np.concatenate([nod[np.isfinite(nod)], fps]))[::-1]
    n_scans, n_nod = len(outcomes), len(nod)
    tp = np.array([0] + [int((nod >= t).sum()) for t in thresholds])
    fp = np.array([0] + [int((fps >= t).sum()) for t in thresholds])
    sens = tp / n_nod if n_nod else np.full(len(tp), np.nan)
    return fp / n_scans, sens, n_nod


def _read(curve_fps: np.ndarray, curve_sens: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Highest sensitivity with at most ``rate`` FPs per scan, for each rate."""
    return np.array([float(np.max(curve_sens[curve_fps <= r])) for r in rates])


def froc(
    cand_points: Sequence[Any],
    cand_scores: Sequence[Any],
    ref_points: Sequence[Any],
    ref_diameters: Sequence[Any],
    *,
    excluded_points: Sequence[Any] | None = None,
    excluded_diameters: Sequence[Any] | None = None,
    min_diameter_mm: float = 0.0,
    min_radius_mm: float = 0.0,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    n_boot: int = 0,
    ci_level: float = 0.95,
    seed: int = 0,
) -> FrocResult:
    """FROC curve, sensitivity at ``fp_rates`` and CPM over scans (LUNA16 protocol, see module doc).

    Args:
        cand_points: per scan, ``(C_i, 3)`` candidate centroids (LPS mm).
        cand_scores: per scan, ``(C_i,)`` candidate scores.
        ref_points: per scan, ``(R_i, 3)`` reference nodule centroids (LPS mm).
        ref_diameters: per scan, ``(R_i,)`` reference diameters (mm).
        excluded_points: per scan, ``(E_i, 3)`` references whose hits are neither TP nor FP.
        excluded_diameters: per scan, ``(E_i,)`` their diameters.
        min_diameter_mm: references smaller than this become excluded (LUNA16: 3 mm).
        min_radius_mm: smallest hit radius (0: LUNA16's ``diameter / 2``).
        fp_rates: average FPs per scan where the sensitivity is read (positive, increasing).
        n_boot: bootstrap resamples over scans (0: no interval).
        ci_level: bootstrap interval level in (0, 1).
        seed: bootstrap generator seed.

    Returns:
        The FROC summary; sensitivities are NaN when there is no reference nodule.

    Raises:
        FrocInputError: an array of a scan has the wrong shape or an invalid value, or the per-scan
            lists differ in length, or an argument is out of range.
    """
    n = len(cand_points)
    lists = {"cand_scores": cand_scores, "ref_points": ref_points, "ref_diameters": ref_diameters}
    if excluded_points is not None or excluded_diameters is not None:
        if excluded_points is None or excluded_diameters is None:
            raise FrocInputError("excluded_points and excluded_diameters must be given together")
        lists |= {"excluded_points": excluded_points, "excluded_diameters": excluded_diameters}
    for name, lst in lists.items():
        if len(lst) != n:
            raise FrocInputError(f"{name} has {len(lst)} scans, cand_points has {n}")
    if n == 0:
        raise FrocInputError("froc needs at least one scan, got 0")
    rates = [float(r) for r in fp_rates]
    if not rates or min(rates) <= 0 or any(b <= a for a, b in zip(rates, rates[1:], strict=False)):
        raise FrocInputError(f"fp_rates must be positive and increasing, got {list(fp_rates)!r}")
    if min_diameter_mm < 0 or min_radius_mm < 0:
        raise FrocInputError(f"min_diameter_mm/min_radius_mm must be >= 0, got {min_diameter_mm!r}/{min_radius_mm!r}")
    if n_boot < 0:
        raise FrocInputError(f"n_boot must be >= 0, got {n_boot!r}")
    if not 0.0 < ci_level < 1.0:
        raise FrocInputError(f"ci_level must be in (0, 1), got {ci_level!r}")
    outcomes = []
    for i in range(n):
        cp = _points(cand_points[i], "cand_points", i)
        cs = _values(cand_scores[i], "cand_scores", i, len(cp))
        rp = _points(ref_points[i], "ref_points", i)
        rd = _values(ref_diameters[i], "ref_diameters", i, len(rp), non_negative=True)
        ep, ed = np.zeros((0, 3)), np.zeros(0)
        if excluded_points is not None and excluded_diameters is not None:
            ep = _points(excluded_points[i], "excluded_points", i)
            ed = _values(excluded_diameters[i], "excluded_diameters", i, len(ep), non_negative=True)
        small = rd < min_diameter_mm
        ep, ed = np.concatenate([ep, rp[small]]), np.concatenate([ed, rd[small]])
        nod, fps = match_scan(cp, cs, rp[~small], rd[~small], ep, ed, min_radius_mm)
        outcomes.append(_ScanOutcome(nod, fps))
    curve_fps, curve_sens, n_nod = _curve(outcomes)
    sens = _read(curve_fps, curve_sens, rates)
    detected = int(sum(np.isfinite(o.nodule_scores).sum() for o in outcomes))
    n_fp = int(sum(len(o.fp_scores) for o in outcomes))
    result = FrocResult(
        fp_rates=tuple(rates),
        sensitivity=tuple(float(s) for s in sens),
        cpm=float(np.mean(sens)),
        curve_fps=curve_fps,
        curve_sensitivity=curve_sens,
        n_scans=n,
        n_nodules=n_nod,
        n_detected=detected,
        n_false_positives=n_fp,
    )
    if n_boot == 0:
        return result
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, len(rates)), np.nan)
    for b in range(n_boot):
        pick = rng.integers(0, n, size=n)
        f, s, k = _curve([outcomes[j] for j in pick])
        if k:
            boot[b] = _read(f, s, rates)
    alpha = (1.0 - ci_level) / 2.0
    ok = np.isfinite(boot[:, 0])
    if not ok.any():
        nan_ci = (float("nan"), float("nan"))
        return _with_ci(result, ci_level, tuple(nan_ci for _ in rates), nan_ci)
    lo, hi = np.quantile(boot[ok], [alpha, 1.0 - alpha], axis=0)
    cpm_lo, cpm_hi = np.quantile(boot[ok].mean(axis=1), [alpha, 1.0 - alpha])
    per_rate = tuple((float(a), float(c)) for a, c in zip(lo, hi, strict=True))
    return _with_ci(result, ci_level, per_rate, (float(cpm_lo), float(cpm_hi)))


def _with_ci(
    r: FrocResult, level: float, per_rate: tuple[tuple[float, float], ...], cpm_ci: tuple[float, float]
) -> FrocResult:
    return replace(r, ci_level=level, sensitivity_ci=per_rate, cpm_ci=cpm_ci)


def froc_from_studies(
    candidates: Sequence[Sequence[tuple[Sequence[float], float]]],
    ref_points: Sequence[Any],
    ref_diameters: Sequence[Any],
    **kwargs: Any,
) -> FrocResult:
    """:func:`froc` from per-study candidate lists as ``analyse_candidates`` returns them.

    Args:
        candidates: per study, ``[((x, y, z) LPS mm, score), ...]`` (its state's ``"candidates"``).
        ref_points: per study, ``(R_i, 3)`` reference centroids (``evaluate.reference_nodules``).
        ref_diameters: per study, ``(R_i,)`` reference diameters.
        **kwargs: passed to :func:`froc`.

    Returns:
        The FROC summary.
    """
    pts = [np.asarray([c[0] for c in cs], float).reshape(-1, 3) for cs in candidates]
    scores = [np.asarray([c[1] for c in cs], float) for cs in candidates]
    return froc(pts, scores, ref_points, ref_diameters, **kwargs)


def operating_threshold(
    candidates: Sequence[Sequence[tuple[Sequence[float], float]]],
    ref_points: Sequence[Any],
    ref_diameters: Sequence[Any],
    *,
    max_fp_per_scan: float = 1.0,
) -> float:
    """The lowest candidate score threshold whose false positives per scan stay within ``max_fp_per_scan``.

    The FROC operating point of a set of (validation) scans: keeping candidates with ``score >= t``
    gives the highest sensitivity that the budget allows (hits and false positives as in
    :func:`froc`, tied scores entering together).

    Args:
        candidates: per scan, ``[((x, y, z) LPS mm, score), ...]``.
        ref_points: per scan, ``(R_i, 3)`` reference centroids.
        ref_diameters: per scan, ``(R_i,)`` reference diameters.
        max_fp_per_scan: the false-positive budget (average per scan, >= 0).

    Returns:
        The threshold; ``inf`` when even the highest-scored false positive breaks the budget and no
        nodule scores above it, the lowest candidate score when every candidate fits the budget.

    Raises:
        FrocInputError: on malformed inputs (naming the scan) or a negative budget.
    """
    if not (np.isfinite(max_fp_per_scan) and max_fp_per_scan >= 0):
        raise FrocInputError(f"max_fp_per_scan must be a finite number >= 0, got {max_fp_per_scan!r}")
    if not (len(candidates) == len(ref_points) == len(ref_diameters)):
        raise FrocInputError(
            f"got {len(candidates)} candidate lists, {len(ref_points)} reference point sets and "
            f"{len(ref_diameters)} diameter sets: one of each per scan"
        )
    if not candidates:
        raise FrocInputError("no scans")
    outcomes = []
    for i, (cs, rp, rd) in enumerate(zip(candidates, ref_points, ref_diameters, strict=True)):
        pts = _points([c[0] for c in cs], "candidate points", i)
        scores = _values([c[1] for c in cs], "candidate scores", i, len(pts))
        ref = _points(rp, "reference points", i)
        diam = _values(rd, "reference diameters", i, len(ref), non_negative=True)
        outcomes.append(_ScanOutcome(*match_scan(pts, scores, ref, diam)))
    fps = np.concatenate([o.fp_scores for o in outcomes])
    nod = np.concatenate([o.nodule_scores for o in outcomes])
    budget = int(np.floor(max_fp_per_scan * len(outcomes) + 1e-9))
    best = np.inf
    for t in np.unique(np.concatenate([nod[np.isfinite(nod)], fps]))[::-1]:  # descending
        if int((fps >= t).sum()) > budget:
            break
        best = float(t)
    return best

"""Risk–coverage analysis of a deferral score (selective prediction; pure numpy + a matplotlib writer).

A deferral score ranks reports for hand-over to a radiologist: higher scores are deferred first.
Deferring every report whose score is ``>= s`` keeps the others; *coverage* is the kept fraction and
*risk* the error rate among kept reports. Reports with equal scores are always kept or deferred
together, so the curve has one point per distinct score (plus full coverage).

- :func:`risk_coverage_curve`: the curve, as a :class:`RiskCoverage`;
- :func:`aurc`: area under it (lower is better);
- :func:`selective_error`: the error of kept reports when at most a given fraction is deferred, and the
  ratio ``error_kept / error_all`` (the acceptance number of the deferral work: ``<= 0.5`` at
  ``<= 30 %`` deferral);
- :func:`plot_risk_coverage`: PNG writer (Agg backend).

Inputs: ``error`` ``(N,)`` bool (or 0/1), ``True`` when the report is wrong; ``score`` ``(N,)`` real,
not NaN (``+inf`` allowed, e.g. for hard-rule deferrals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RiskCoverage", "aurc", "plot_risk_coverage", "risk_coverage_curve", "selective_error"]


@dataclass(frozen=True)
class RiskCoverage:
    """A risk–coverage curve, one point per distinct score, by increasing coverage.

    Attributes:
        coverage: ``(K,)`` kept fraction in ``(0, 1]``, strictly increasing, last = 1.
        risk: ``(K,)`` error rate among the kept reports at each coverage.
        threshold: ``(K,)`` the score at and above which reports are deferred for that point
            (``+inf`` for the last point: nothing deferred).
        n: number of reports ``N``.
        error_all: error rate over all reports (``risk[-1]``).
    """

    coverage: np.ndarray
    risk: np.ndarray
    threshold: np.ndarray
    n: int
    error_all: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the infinite last threshold as ``None``)."""
        return {
            "coverage": self.coverage.tolist(),
            "risk": self.risk.tolist(),
            "threshold": [float(t) if math.isfinite(t) else None for t in self.threshold],
            "n": self.n,
            "error_all": self.error_all,
        }


def _inputs(error: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    e, s = np.asarray(error), np.asarray(score)
    if e.ndim != 1 or s.ndim != 1:
        raise ValueError(f"error and score must be 1-D, got shapes {e.shape} and {s.shape}")
    if e.size == 0:
        raise ValueError("error must not be empty")
    if e.size != s.size:
        raise ValueError(f"error and score must have the same length, got {e.size} and {s.size}")
    if e.dtype != np.bool_:
        bad = e[~np.isin(e, (0, 1))]
        if bad.size:
            raise ValueError(f"error must be boolean or 0/1, got value(s) {bad[:5].tolist()}")
    try:
        s = s.astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"score must be numeric, got dtype {s.dtype}") from err
    if np.isnan(s).any() or (s == -np.inf).any():
        raise ValueError(f"score must not be NaN or -inf, got {s[np.isnan(s) | (s == -np.inf)][:5].tolist()}")
    return e.astype(bool), s


def risk_coverage_curve(error: np.ndarray, score: np.ndarray) -> RiskCoverage:
    """Risk–coverage curve of a deferral score.

    Args:
        error: ``(N,)`` bool, the report is wrong.
        score: ``(N,)`` deferral score, higher deferred first.

    Returns:
        The :class:`RiskCoverage` (one point per distinct score value).

    Raises:
        ValueError: empty or non-1-D inputs, a length mismatch, non-binary ``error``, NaN or ``-inf`` scores.
    """
    e, s = _inputs(error, score)
    order = np.argsort(s, kind="stable")  # kept first
    s_sorted, e_sorted = s[order], e[order].astype(np.int64)
    last_of_value = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    n_kept = np.arange(1, s.size + 1)[last_of_value]
    n_err = np.cumsum(e_sorted)[last_of_value]
    values = s_sorted[last_of_value]
    threshold = np.r_[values[1:], np.inf]  # point j keeps every value <= values[j]: defers from the next one
    return RiskCoverage(
        coverage=n_kept / s.size,
        risk=n_err / n_kept,
        threshold=threshold,
        n=int(s.size),
        error_all=float(e.mean()),
    )


def aurc(curve: RiskCoverage) -> float:
    """Area under the risk–coverage curve, ``sum_j (c_j - c_{j-1}) * r_j`` with ``c_0 = 0``.

    Risk is held constant on ``(c_{j-1}, c_j]`` (a step function). Without ties this equals the usual
    ``(1/N) sum_k risk(k/N)`` over the ``N`` nested kept sets.

    Args:
        curve: from :func:`risk_coverage_curve`.

    Returns:
        AURC in ``[0, 1]``.
    """
    widths = np.diff(np.r_[0.0, curve.coverage])
    return float(np.sum(widths * curve.risk))


def selective_error(error: np.ndarray, score: np.ndarray, max_deferral_rate: float = 0.3) -> dict[str, float]:
    """Error of the kept reports when the highest scores are deferred, at most ``max_deferral_rate`` of them.

    The largest deferral whose rate is ``<= max_deferral_rate`` is taken (whole tie groups only, so the
    actual rate may be lower).

    Args:
        error: ``(N,)`` bool, the report is wrong.
        score: ``(N,)`` deferral score, higher deferred first.
        max_deferral_rate: in ``[0, 1)``.

    Returns:
        ``{"deferral_rate", "coverage", "error_all", "error_kept", "ratio", "threshold", "n"}``: ``ratio``
        is ``error_kept / error_all`` (``NaN`` when no report is wrong); ``threshold`` the score at and
        above which reports are deferred (``inf``: none).

    Raises:
        ValueError: invalid inputs (see :func:`risk_coverage_curve`) or ``max_deferral_rate`` outside [0, 1).
    """
    if isinstance(max_deferral_rate, bool) or not isinstance(max_deferral_rate, int | float):
        raise ValueError(f"max_deferral_rate must be a number in [0, 1), got {max_deferral_rate!r}")
    if not 0.0 <= max_deferral_rate < 1.0:
        raise ValueError(f"max_deferral_rate must be in [0, 1), got {max_deferral_rate!r}")
    curve = risk_coverage_curve(error, score)
    ok = np.nonzero(curve.coverage >= 1.0 - max_deferral_rate - 1e-12)[0]
    j = int(ok[0])  # smallest coverage that respects the rate: the full-coverage point always does
    err_kept = float(curve.risk[j])
    n_deferred = curve.n - round(float(curve.coverage[j]) * curve.n)
    return {
        "deferral_rate": n_deferred / curve.n,
        "coverage": float(curve.coverage[j]),
        "error_all": curve.error_all,
        "error_kept": err_kept,
        "ratio": err_kept / curve.error_all if curve.error_all > 0 else math.nan,
        "threshold": float(curve.threshold[j]),
        "n": curve.n,
    }


def plot_risk_coverage(
    curve: RiskCoverage, path: str | Path, *, max_deferral_rate: float | None = 0.3, title: str = "Risk–coverage"
) -> Path:
    """Write the risk–coverage curve to a PNG (matplotlib, Agg backend).

    Args:
        curve: from :func:`risk_coverage_curve`.
        path: output file (``.png``).
        max_deferral_rate: draw the coverage ``1 - rate`` as a vertical line (None: no line).
        title: plot title (the AURC is appended).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.step(np.r_[0.0, curve.coverage], np.r_[curve.risk[0], curve.risk], where="pre", label="deferral score")
    ax.axhline(curve.error_all, color="grey", linestyle="--", label=f"no deferral ({curve.error_all:.2f})")
    if max_deferral_rate is not None:
        ax.axvline(1.0 - max_deferral_rate, color="tab:red", linestyle=":", label=f"{max_deferral_rate:.0%} deferred")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, max(1e-3, float(curve.risk.max())) * 1.05)
    ax.set_xlabel("coverage (fraction of reports kept)")
    ax.set_ylabel("error among kept reports")
    ax.set_title(f"{title} (AURC {aurc(curve):.3f}, n={curve.n})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p

"""evaluate --validation with a candidate filter: the operating point first, then reports at that point."""

from __future__ import annotations

from typing import Any

import pytest

from lungvl_model.evaluation import evaluate as E
from lungvl_model.inference.calibration import CalibrationState


def test_deferral_is_fitted_on_reports_written_at_the_fitted_operating_point(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], dict[str, Any]]] = []
    fitted: dict[str, Any] = {}

    def run(model: Any, dirs: Any, kwargs: dict[str, Any], progress: Any) -> list[E.StudyResult]:
        calls.append((list(dirs), kwargs))
        return [E.StudyResult("1.2.3", "val", "screening", 1.0, {"pass": len(calls)})]

    def threshold(results: Any, fp: float) -> float:
        fitted["threshold_from_pass"] = results[0].values["pass"]
        fitted["fp"] = fp
        return 0.6

    def fit(results: Any, **kw: Any) -> CalibrationState:
        fitted["policy_from_pass"] = results[0].values["pass"]
        fitted["kw"] = kw
        return CalibrationState(finding_threshold=kw["finding_threshold"])

    monkeypatch.setattr(E, "_run_studies", run)
    monkeypatch.setattr(E, "fit_finding_threshold", threshold)
    monkeypatch.setattr(E, "fit_on_validation", fit)
    monkeypatch.setattr(E, "aggregate", lambda results: {"n": len(results)})
    out = E.evaluate(object(), ["test"], validation_dirs=["val"], candidate_filter=object(), finding_fp_per_scan=0.5)  # type: ignore[arg-type]
    (d1, k1), (d2, k2), (d3, k3) = calls
    assert d1 == d2 == ["val"] and d3 == ["test"]
    assert k1["calibration"] is None and k1["with_text"] is False  # every filtered candidate, no text
    assert k2["calibration"].finding_threshold == 0.6 and k2["with_text"] is True  # full reports at the point
    assert fitted == {
        "threshold_from_pass": 1,
        "fp": 0.5,
        "policy_from_pass": 2,
        "kw": {"max_deferral_rate": 0.3, "finding_threshold": 0.6},
    }
    assert k3["calibration"] is out["calibration_state"] and out["calibration_state"].finding_threshold == 0.6
    # without a filter there is no operating point to fit: one validation pass
    calls.clear()
    E.evaluate(object(), ["test"], validation_dirs=["val"])  # type: ignore[arg-type]
    assert len(calls) == 2 and calls[0][1]["calibration"] is None and calls[0][1]["with_text"] is True

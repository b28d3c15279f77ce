"""privacy.bench_dp_sgd: the DP-SGD step measured against the non-DP step (no timing is asserted)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from privacy.bench_dp_sgd import PEER_MODE, DPBenchResult, DPBenchRow, bench_dp_sgd


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage": "text"}, "stage must be one of"),
        ({"batch_size": 1}, "batch_size >= 2"),
        ({"modes": ("DP-SGD magic",)}, "modes must be among"),
        ({"input_size": (30, 32, 32)}, "multiples of 16"),
    ],
)
def test_invalid_args(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench_dp_sgd("tiny", **kwargs)


def test_ratios_and_markdown_from_rows() -> None:
    rows = [
        DPBenchRow(PEER_MODE, 1.0, 100.0, "cpu_peak_rss_growth", 10),
        DPBenchRow("DP-SGD hooks", 4.0, 150.0, "cpu_peak_rss_growth", 10),
        DPBenchRow("DP-SGD ghost", math.nan, math.nan, "cpu_peak_rss_growth", error="boom"),
    ]
    r = DPBenchResult(rows, {"preset": "tiny", "stage": "seg"})
    assert r.ratio("DP-SGD hooks", "time") == 4.0 and r.ratio("DP-SGD hooks", "memory") == 1.5
    assert math.isnan(r.ratio("DP-SGD ghost", "time"))
    md = r.to_markdown()
    assert "| DP-SGD hooks | 4.000 | 150.0 | 4.00x | 1.50x |" in md and "failed: boom" in md


def test_bench_runs_on_cpu_and_reports_ratios() -> None:
    res = bench_dp_sgd(
        "tiny", stage="seg", device="cpu", steps=1, warmup=0, batch_size=2, input_size=(32, 32, 32),
        modes=(PEER_MODE, "DP-SGD hooks", "DP-SGD microbatch"),
    )  # fmt: skip
    assert [r.mode for r in res.rows] == [PEER_MODE, "DP-SGD hooks", "DP-SGD microbatch"]
    assert all(r.error is None and r.step_s > 0 and r.params_trained > 0 for r in res.rows), res.rows
    assert len({r.params_trained for r in res.rows}) == 1  # the same frozen set in every mode
    assert math.isfinite(res.ratio("DP-SGD hooks", "time")) and math.isfinite(res.ratio("DP-SGD microbatch", "time"))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["meta"]["input_size"] == [32, 32, 32] and "DP-SGD hooks/time" in d["ratios"]

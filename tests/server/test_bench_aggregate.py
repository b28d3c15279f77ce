"""``server/bench_aggregate.py`` and ``lungvl bench aggregate``: tiny sizes only, never timings."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungvl.cli import app
from server.bench_aggregate import (
    METHODS,
    PEER,
    AggBenchConfig,
    Probe,
    Workload,
    bench_aggregate,
    layer_shapes,
    run_method,
    write_results,
)

runner = CliRunner()
LUNGVL = [m for m in METHODS if m != PEER]


def _inputs(w: Workload) -> dict:
    from server.bench_aggregate import keyed_record

    return {
        "replies": w.replies(),
        "record": keyed_record(w.weights),
        "flower_momentum": [-v for v in w.momentum],
        "deltas": [w.delta(k) for k in range(w.sites)],
    }


def _expected(w: Workload, lr: float, beta: float) -> list[np.ndarray]:
    """w + η(β v + Σ n_k Δ_k / Σ n_k), by hand in float64."""
    n = np.asarray(w.num_examples, dtype=np.float64)
    deltas = [w.delta(k) for k in range(w.sites)]
    out = []
    for i, (wi, vi) in enumerate(zip(w.weights, w.momentum, strict=True)):
        mean = sum(n[k] * deltas[k][i].astype(np.float64) for k in range(w.sites)) / n.sum()
        out.append(wi.astype(np.float64) + lr * (beta * vi.astype(np.float64) + mean))
    return out


@pytest.mark.parametrize("params", [1, 2, 19, 20, 21, 1000, 12_345, 10_000_000])
@pytest.mark.parametrize("layers", [1, 2, 20, 41])
def test_layer_shapes_add_up(params: int, layers: int) -> None:
    shapes = layer_shapes(params, layers)
    assert sum(math.prod(s) for s in shapes) == params
    assert 1 <= len(shapes) <= layers and all(min(s) >= 1 for s in shapes)


def test_workload_is_reproducible_and_about_half_the_sites_are_clipped() -> None:
    a, b = Workload(8, 5000, seed=3), Workload(8, 5000, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.delta(5), b.delta(5), strict=True))
    assert not np.array_equal(a.delta(4)[0], a.delta(5)[0])
    norms = [math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in a.delta(k))) for k in range(8)]
    assert 0 < sum(n > 1.0 for n in norms) < 8


@pytest.mark.parametrize(("lr", "beta"), [(1.0, 0.9), (0.5, 0.0), (2.0, 0.5)])
def test_lungvl_without_dp_equals_flower_fedavgm(lr: float, beta: float) -> None:
    w = Workload(3, 1000, layers=6, seed=1)
    cfg = AggBenchConfig(server_lr=lr, server_momentum=beta)
    inputs = _inputs(w)
    expected = _expected(w, lr, beta)
    flower = run_method(PEER, w, cfg, dp=False, probe=Probe(False), inputs=inputs)
    for got in [flower] + [run_method(m, w, cfg, dp=False, probe=Probe(False), inputs=inputs) for m in LUNGVL]:
        assert [a.shape for a in got] == [a.shape for a in w.weights]
        for a, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_mismatched_momentum_would_be_caught() -> None:
    w = Workload(3, 1000, layers=6, seed=1)
    inputs = _inputs(w)
    flower = run_method(PEER, w, AggBenchConfig(server_momentum=0.9), dp=False, probe=Probe(False), inputs=inputs)
    lungvl = run_method(LUNGVL[0], w, AggBenchConfig(server_momentum=0.5), dp=False, probe=Probe(False), inputs=inputs)
    assert not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(flower, lungvl, strict=True))


def test_dp_forms_agree_with_each_other_and_differ_from_fedavgm() -> None:
    w = Workload(4, 2000, layers=4, seed=2)
    cfg = AggBenchConfig(noise_multiplier=0.5)
    inputs = _inputs(w)
    runs = {m: run_method(m, w, cfg, dp=True, probe=Probe(False), inputs=inputs) for m in METHODS}
    for m in LUNGVL:  # same seeded noise; the unpacked form recovers Δ_k up to float32 rounding
        for a, b in zip(runs[m], runs["lungvl batch"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(runs["lungvl batch"][0], runs[PEER][0], atol=1e-4)


def test_probe_adds_up_spans_and_traces_beyond_held_input() -> None:
    import tracemalloc

    probe = Probe(trace=True)
    tracemalloc.start()
    try:
        held = np.ones(100_000)
        with probe.span(held=held.nbytes):
            tmp = np.ones(200_000)
            del tmp
    finally:
        tracemalloc.stop()
    assert probe.seconds > 0
    assert 200_000 * 8 <= probe.peak < 200_000 * 8 + 100_000


@pytest.mark.parametrize(
    "kwargs",
    [{"sites": ()}, {"sites": (0,)}, {"params": (0,)}, {"repeats": 0}, {"layers": 0}, {"dp": ()}, {"mem_fraction": 0}],
)
def test_invalid_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AggBenchConfig(**kwargs)


def test_bench_rows_and_files(tmp_path: Path) -> None:
    cfg = AggBenchConfig(sites=(2, 3), params=(1000,), repeats=1, layers=5)
    rows = bench_aggregate(cfg)
    assert len(rows) == 2 * (1 + 3 * 2)
    for r in rows:
        assert math.isfinite(r.time_s) and r.peak_mib > 0 and r.held_mib > 0 and not r.note
        if r.method == PEER:
            assert r.time_ratio == 1.0 and r.mem_ratio == 1.0 and r.dp is None
        elif r.dp:
            assert r.max_diff is None
        else:
            assert r.max_diff is not None and r.max_diff < 1e-5
    held = {(r.sites, r.label): r.held_mib for r in rows}
    assert held[(3, "lungvl stream")] == held[(2, "lungvl stream")] < held[(3, "lungvl batch")]
    paths = write_results(tmp_path / "out", cfg, rows, {"cpus": 2})
    assert [p.name for p in paths] == [
        "bench_aggregate.json", "bench_aggregate.csv", "bench_aggregate.png", "config.json"
    ]  # fmt: skip
    assert all(p.stat().st_size > 0 for p in paths)
    doc = json.loads(paths[0].read_text())
    assert doc["config"]["sites"] == [2, 3] and len(doc["rows"]) == len(rows)
    assert json.loads(paths[3].read_text()) == doc["config"]
    with paths[1].open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_too_big_is_reported_not_run(tmp_path: Path) -> None:
    cfg = AggBenchConfig(sites=(2,), params=(10**6,), repeats=1, dp=(False,), mem_fraction=1e-9)
    rows = bench_aggregate(cfg)
    assert len(rows) == 4 and all(r.note.startswith("skipped: needs") and math.isnan(r.time_s) for r in rows)
    doc = json.loads(write_results(tmp_path, cfg, rows, {})[0].read_text())
    assert doc["rows"][0]["time_s"] is None


def test_cli_writes_results(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "bench",
            "aggregate",
            "--sites",
            "2",
            "3",
            "--params",
            "1e3",
            "--repeats",
            "1",
            "--no-dp",
            "--out",
            str(tmp_path),
        ],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert PEER in res.stdout and "lungvl stream" in res.stdout and "3 x 1e+03" in res.stdout
    doc = json.loads((tmp_path / "bench_aggregate.json").read_text())
    assert doc["config"]["sites"] == [2, 3] and doc["config"]["params"] == [1000] and doc["config"]["dp"] == [False]
    assert (tmp_path / "bench_aggregate.png").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--sites", "x"], "positive integers"), (["--site", "2"], "no such option"), (["--params"], "at least one")],
)
def test_cli_rejects_bad_lists(args: list[str], match: str) -> None:
    res = runner.invoke(app, ["bench", "aggregate", *args])
    assert res.exit_code == 2 and match in res.stderr

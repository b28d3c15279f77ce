from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lungvl.cli import app
from lungvl_model.benchmarks import PEER_NAME, BenchResult, BenchRow, bench_train, synthetic_batch

runner = CliRunner()


def test_synthetic_batch_is_a_windowed_chest_with_a_nodule() -> None:
    b = synthetic_batch((32, 48, 48), 2, spacing_mm=(5.0, 5.0, 5.0))
    img, seg = b["image"], b["seg"]
    assert img.shape == seg.shape == b["lobes"].shape == (2, 1, 32, 48, 48)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert seg.sum() > 0 and set(b["lobes"].unique().tolist()) == {0, 1, 2, 3, 4, 5}
    # the nodule (~30 HU) is brighter than the lung around it (-850 HU) and lies in the RUL
    assert img[seg > 0].mean() > img[b["lobes"] == 1].mean() + 0.4
    assert (b["lobes"][seg > 0] == 1).all()
    assert len(b["text"]) == 2 and "right upper lobe" in b["text"][0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage": "ssl"}, "stage"),
        ({"steps": 0}, "steps"),
        ({"warmup": -1}, "warmup"),
        ({"batch_size": 0}, "batch_size"),
        ({"input_size": (30, 32, 32)}, "multiples of 16"),
        ({"input_size": (32, 32)}, "multiples of 16"),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench_train("tiny", device="cpu", **kwargs)


def test_unknown_preset_and_cli_rejects_bad_size() -> None:
    with pytest.raises(KeyError, match="did you mean 'tiny'"):
        bench_train("tinny", device="cpu")
    res = runner.invoke(app, ["bench", "train", "--device", "cpu", "--input-size", "30", "32", "32"])
    assert res.exit_code == 2 and "multiples of 16" in res.stderr


def test_result_ratios_and_markdown_from_rows() -> None:
    rows = [
        BenchRow(PEER_NAME, 10, 2.0, 0.5, 100.0, "cpu_peak_rss_growth"),
        BenchRow("LungVL (seg)", 20, 3.0, 1 / 3, 150.0, "cpu_peak_rss_growth"),
    ]
    r = BenchResult(rows, {"lungvl_seg/dynunet_time": 1.5, "lungvl_seg/dynunet_memory": 1.5}, {"preset": "tiny"})
    assert r.ratio("LungVL (seg)", "time") == 1.5 and r.ratio(PEER_NAME, "memory") == 1.0
    assert math.isnan(r.ratio("LungVL (vl)", "time"))
    assert "| LungVL (seg) / DynUNet | 1.50x | 1.50x |" in r.to_markdown()
    with pytest.raises(KeyError, match="rows"):
        r.row("nope")


def test_bench_train_tiny_seg_on_cpu() -> None:
    torch.manual_seed(0)
    res = bench_train("tiny", device="cpu", steps=1, warmup=0, input_size=(32, 32, 32), stage="seg")
    assert [r.name for r in res.rows] == [PEER_NAME, "LungVL (seg)"]
    for r in res.rows:
        assert r.params > 0 and 0 < r.params_trained <= r.params
        assert r.step_s > 0 and r.volumes_per_s == pytest.approx(1 / r.step_s)
        assert r.peak_mem_mb > 0 and r.mem_kind == "cpu_peak_rss_growth"
        assert len(r.step_s_all) == 1
    # the seg step leaves LungVL's report decoder and risk heads without gradients
    assert res.row("LungVL (seg)").params_trained < res.row("LungVL (seg)").params
    assert set(res.ratios) == {"lungvl_seg/dynunet_time", "lungvl_seg/dynunet_memory"}
    assert all(math.isfinite(v) and v > 0 for v in res.ratios.values())
    md = res.to_markdown()
    assert "LungVL (seg)" in md and PEER_NAME in md and "32x32x32" in md
    d = json.loads(json.dumps(res.to_dict()))
    assert d["meta"]["input_size"] == [32, 32, 32] and d["meta"]["device"] == "cpu" and len(d["rows"]) == 2


def test_cli_writes_json_and_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI wiring, with the measurement replaced by a canned result (the real one is tested above)."""
    import lungvl_model.benchmarks as benchmarks

    nan = float("nan")

    rows = [
        BenchRow(PEER_NAME, 10, 2.0, 0.5, 100.0, "cpu_peak_rss_growth", 10, (2.0,)),
        BenchRow("LungVL (seg)", 20, 3.0, 1 / 3, 150.0, "cpu_peak_rss_growth", 15, (3.0,)),
        BenchRow("LungVL (vl)", 0, nan, nan, nan, "cpu_peak_rss_growth", error="can't allocate memory"),
    ]
    meta = {
        "preset": "tiny",
        "device": "cpu",
        "device_name": "test cpu",
        "input_size": [32, 32, 32],
        "batch_size": 1,
        "steps": 1,
        "warmup": 0,
        "bf16_active": False,
        "gradient_checkpointing": False,
        "failed": ["LungVL (vl)"],
    }
    ratios = {"lungvl_seg/dynunet_time": 1.5, "lungvl_seg/dynunet_memory": nan, "lungvl_vl/dynunet_time": nan}
    canned = BenchResult(rows, ratios, meta)
    seen: dict = {}

    def fake(preset: str, **kw: object) -> BenchResult:
        seen.update(kw, preset=preset)
        return canned

    monkeypatch.setattr(benchmarks, "bench_train", fake)
    res = runner.invoke(
        app, ["bench", "train", "--preset", "tiny", "--input-size", "32", "32", "32", "--out", str(tmp_path)]
    )
    assert res.exit_code == 1, res.stderr  # a row did not fit: reported, files written, non-zero exit
    assert "can't allocate memory" in res.stderr
    assert seen["input_size"] == (32, 32, 32) and seen["preset"] == "tiny" and seen["stage"] == "vl"
    assert "test cpu" in res.stdout and "1.50x" in res.stdout
    d = json.loads((tmp_path / "bench_train.json").read_text())
    assert d["ratios"]["lungvl_seg/dynunet_memory"] is None  # NaN written as null
    assert d["rows"][2]["error"] == "can't allocate memory" and d["rows"][2]["step_s"] is None
    md = (tmp_path / "bench_train.md").read_text()
    assert "DynUNet" in md and "| LungVL (vl) | - | - | failed: can't allocate memory |" in md
    canned.rows.pop()
    canned.meta["failed"] = []
    res = runner.invoke(app, ["bench", "train", "--preset", "tiny"])
    assert res.exit_code == 0 and seen["input_size"] is None

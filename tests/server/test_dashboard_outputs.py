"""A deployment's end-of-run files: the same CSVs, plots and summary.md a simulation writes (server.run_outputs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from server.config import ServerConfig
from server.deploy import ADMITTED_FILE, ServerDeployConfig, write_deployment_outputs
from server.registry import Registry
from server.run_outputs import SitesTable, summary_markdown, write_run_outputs
from tests.server.test_registry import fill

PNG = b"\x89PNG\r\n\x1a\n"


def _deployment(tmp_path: Path) -> ServerDeployConfig:
    run_dir = tmp_path / "consortium"
    return ServerDeployConfig(
        server=ServerConfig(rounds=2, client_noise_multiplier=1.1, clip_norm=0.5),
        run_dir=run_dir,
        ca_cert=tmp_path / "ca.crt",
        server_cert=tmp_path / "server.crt",
        server_key=tmp_path / "server.key",
        init_model=tmp_path / "model",
        host="0.0.0.0",
        port=9093,
        run_name="consortium-2026",
    )


def test_deployment_writes_what_a_simulation_writes(tmp_path: Path) -> None:
    cfg = _deployment(tmp_path)
    with Registry(cfg.registry_url) as reg:
        run = fill(reg)
        reg.finish_run(run, "finished")
    admitted = {
        "f1": {"fingerprint": "f1aa", "key_file": "a.pub", "name": "alpha", "node_id": "1", "admitted_at": "t"},
        "f4": {"fingerprint": "f4dd", "key_file": "d.pub", "name": "delta", "node_id": "4", "admitted_at": "t"},
    }
    (cfg.run_dir / ADMITTED_FILE).write_text(json.dumps(admitted))
    files = write_deployment_outputs(cfg, run)
    names = sorted(p.name for p in files)
    assert names == sorted(
        ["metrics.csv", "metrics_global.csv", "metrics_site_alpha.csv", "convergence.png", "epsilon.png", "summary.md"]
    )
    assert all(p.parent == cfg.run_dir and p.stat().st_size > 0 for p in files)
    assert (cfg.run_dir / "convergence.png").read_bytes()[:8] == PNG == (cfg.run_dir / "epsilon.png").read_bytes()[:8]
    with (cfg.run_dir / "metrics_global.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["val_loss"]) for r in rows] == [("1", "1.0"), ("2", "0.5")]
    summary = (cfg.run_dir / "summary.md").read_text()
    assert summary.startswith("# consortium-2026\n")
    assert "run 1: **finished**, 2/2 rounds completed, 1 failed/rejected/timed-out site replies." in summary
    assert "client-level DP σ = 1.1, C = 0.5" in summary and "SuperLink on 0.0.0.0:9093" in summary
    assert "| alpha | f1aa | 2 | 0 | 80 |" in summary  # admitted and seen
    assert "| delta | f4dd | 0 | 0 | 0 |" in summary  # admitted, never replied
    assert "| gamma | (not admitted by this server.toml) | 1 | 1 | 10 |" in summary
    assert "| 2 | completed | 3 |" in summary
    assert "- round 2: gamma timeout: no reply within 600 s" in summary


def test_summary_of_a_simulation_layout(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.db")
    run = fill(reg)
    sites = SitesTable(("site", "cohort", "studies"), (("alpha", "screening", "3"), ("beta", "(existing)", "")))
    text = summary_markdown(
        reg, run, ServerConfig(rounds=2), title="tiny", sites=sites, preset="tiny", notes=["A note."]
    )
    lines = text.splitlines()
    assert lines[0] == "# tiny" and "A note." in lines
    assert "| site | cohort | studies |" in lines and "| beta | (existing) |  |" in lines
    assert "model preset tiny; seed 0." in text and "client-level DP off" in text
    written = write_run_outputs(reg, run, tmp_path / "out", ServerConfig(rounds=2), title="tiny", sites=sites)
    assert (tmp_path / "out" / "summary.md").read_text() == summary_markdown(
        reg, run, ServerConfig(rounds=2), title="tiny", sites=sites
    )
    assert written[-3:] == [tmp_path / "out" / n for n in ("convergence.png", "epsilon.png", "summary.md")]


def test_sites_table_rows_must_match_the_header() -> None:
    with pytest.raises(ValueError, match="has 1 cells"):
        SitesTable(("site", "cohort"), (("alpha",),))

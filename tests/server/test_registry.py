"""Run registry: a two-round run written, reopened and read back; resume helpers; validation.

Every test that touches a database runs on SQLite and on PostgreSQL (:func:`db_url`, a fresh database each).
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from server.registry import Registry, RegistryError, sqlalchemy_url
from tests.server.test_registry_backends import BACKENDS, fresh_database

SHA = hashlib.sha256(b"checkpoint").hexdigest()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty registry database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    with fresh_database(request.param, tmp_path / "db") as url:
        yield url


def fill(reg: Registry) -> int:
    """Two completed rounds, one failing site in round 2, growing ε, checkpoints."""
    run = reg.start_run("mix", {"rounds": 2, "dp": {"sigma": 1.1}}, seed=7)
    for rnd in (1, 2):
        reg.start_round(run, rnd, sampled=3)
        reg.record_participation(
            run,
            rnd,
            node_id=2**63 + rnd,
            site_name="alpha",
            status="ok",
            num_examples=40,
            seconds=1.5,
            update_norm=0.8,
            clipped=False,
            bytes_received=1000,
        )
        reg.record_participation(
            run,
            rnd,
            node_id=11,
            site_name="beta",
            status="ok",
            num_examples=25,
            seconds=2.0,
            update_norm=1.3,
            clipped=True,
            bytes_received=1000,
        )
        if rnd == 2:
            reg.record_participation(
                run, rnd, node_id=12, site_name="gamma", status="timeout", reason="no reply within 600 s"
            )
        else:
            reg.record_participation(run, rnd, node_id=12, site_name="gamma", status="ok", num_examples=10)
        reg.record_metrics(run, rnd, "global", {"val_loss": 1.0 / rnd, "val_auc": 0.6 + 0.1 * rnd})
        reg.record_metrics(run, rnd, "site:alpha", {"train_loss": 2.0 / rnd})
        reg.record_privacy(
            run,
            rnd,
            level="client",
            epsilon=0.5 * rnd,
            delta=1e-5,
            noise_multiplier=1.1,
            sample_rate=1.0,
            steps=rnd,
            accountant="rdp",
        )
        reg.record_privacy(
            run,
            rnd,
            level="sample",
            site_name="alpha",
            epsilon=1.0 * rnd,
            delta=1e-5,
            noise_multiplier=0.9,
            sample_rate=0.1,
            steps=20 * rnd,
            accountant="prv",
        )
        reg.end_round(
            run, rnd, replied=3 if rnd == 1 else 2, failed=0 if rnd == 1 else 1, status="completed", update_norm=0.4
        )
        reg.record_checkpoint(run, rnd, f"/ckpt/round_{rnd}.pt", SHA)
    return run


def check_filled(reg: Registry, run: int) -> None:
    assert reg.latest_run()["id"] == run and reg.latest_run("mix")["config"] == {"rounds": 2, "dp": {"sigma": 1.1}}
    rounds = reg.rounds(run)
    assert [(r["round"], r["status"], r["sites_replied"], r["sites_failed"]) for r in rounds] == [
        (1, "completed", 3, 0),
        (2, "completed", 2, 1),
    ]
    assert rounds[0]["ended_at"] >= rounds[0]["started_at"] and rounds[0]["started_at"].tzinfo is not None
    parts = reg.participation(run, 2)
    failed = [p for p in parts if p["status"] != "ok"]
    assert [(p["site_name"], p["status"], p["reason"]) for p in failed] == [
        ("gamma", "timeout", "no reply within 600 s")
    ]
    assert parts[0]["node_id"] == str(2**63 + 2) and parts[1]["clipped"] is True
    assert len(reg.participation(run)) == 6
    assert [m["value"] for m in reg.metrics(run, "global") if m["name"] == "val_loss"] == [1.0, 0.5]
    eps = [p["epsilon"] for p in reg.privacy(run) if p["level"] == "client"]
    assert eps == sorted(eps) and eps[-1] > eps[0]
    # each σ in the column named for it: the server's client-level σ, a site's DP-SGD σ
    sigmas = {(p["level"], p["client_noise_multiplier"], p["dp_sgd_noise_multiplier"]) for p in reg.privacy(run)}
    assert sigmas == {("client", 1.1, None), ("sample", None, 0.9)}
    assert [c["path"] for c in reg.checkpoints(run)] == ["/ckpt/round_1.pt", "/ckpt/round_2.pt"]
    s = reg.summary(run)
    assert s["rounds_done"] == 2 and s["sites_seen"] == ["alpha", "beta", "gamma"] and s["failures"] == 1
    assert s["latest_global_round"] == 2 and s["latest_global_metrics"] == pytest.approx(
        {"val_loss": 0.5, "val_auc": 0.8}
    )
    assert s["epsilon"] == 1.0 and s["max_site_epsilon"] == 2.0 and s["max_site_epsilon_site"] == "alpha"


def test_run_round_trip_and_persistence(db_url: str) -> None:
    reg = Registry(db_url)
    run = fill(reg)
    check_filled(reg, run)
    reg.finish_run(run, "finished")
    reg.close()
    with Registry(db_url) as again, Registry(db_url, read_only=True) as reader:
        for r in (again, reader):
            check_filled(r, run)
            assert r.run(run)["status"] == "finished" and r.run(run)["finished_at"] >= r.run(run)["created_at"]
        if again.engine.dialect.name == "sqlite":
            with again.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_file_in_new_folders(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "reg.db"
    with Registry(db) as reg:
        check_filled(reg, fill(reg))
    assert db.is_file() and make_url(Registry(db, read_only=True).url).database == str(db)


def test_resume_after_incomplete_round(db_url: str) -> None:
    reg = Registry(db_url)
    run = fill(reg)
    reg.start_round(run, 3, sampled=3)
    reg.record_participation(run, 3, node_id=11, site_name="beta", status="ok", num_examples=25)
    reg.record_metrics(run, 3, "site:beta", {"train_loss": 0.3})
    assert reg.last_completed_round(run) == 2
    assert reg.pending_rounds(run) == [3]
    with pytest.raises(RegistryError, match="already exists"):
        reg.start_round(run, 3, sampled=3)
    with pytest.raises(RegistryError, match="completed"):
        reg.delete_round(run, 2)
    reg.delete_round(run, 3)
    assert reg.pending_rounds(run) == [] and [r["round"] for r in reg.rounds(run)] == [1, 2]
    assert reg.participation(run, 3) == [] and reg.metrics(run, "site:beta") == []
    reg.start_round(run, 3, sampled=2)  # redo
    reg.end_round(run, 3, replied=0, failed=2, status="failed")
    assert reg.last_completed_round(run) == 2  # a failed round did not advance the model
    reg.delete_round(run, 2, force=True)
    assert reg.last_completed_round(run) == 1 and len(reg.checkpoints(run)) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "x"])
def test_non_finite_metric_rejected(db_url: str, bad: object) -> None:
    reg = Registry(db_url)
    run = reg.start_run("r", {}, seed=None)
    with pytest.raises(ValueError, match="val_auc"):
        reg.record_metrics(run, 1, "global", {"val_loss": 0.2, "val_auc": bad})  # type: ignore[dict-item]
    assert reg.metrics(run) == []  # nothing written


def test_invalid_args(db_url: str) -> None:
    reg = Registry(db_url)
    run = reg.start_run("r", {}, seed=1)
    with pytest.raises(RegistryError, match="no run with id 99"):
        reg.start_round(99, 1, sampled=1)
    with pytest.raises(ValueError, match="plain JSON"):
        reg.start_run("r", {"x": math.nan}, seed=1)
    with pytest.raises(ValueError, match="scope"):
        reg.record_metrics(run, 1, "site:", {"a": 1.0})
    with pytest.raises(ValueError, match="participation status"):
        reg.record_participation(run, 1, node_id=1, status="lost")
    with pytest.raises(ValueError, match="site_name"):
        reg.record_privacy(
            run,
            1,
            level="sample",
            epsilon=1,
            delta=1e-5,
            noise_multiplier=1,
            sample_rate=0.1,
            steps=1,
            accountant="rdp",
        )
    with pytest.raises(ValueError, match="sha256"):
        reg.record_checkpoint(run, 1, "x.pt", "abc")
    with pytest.raises(RegistryError, match="never started"):
        reg.end_round(run, 5, replied=1, failed=0, status="completed")
    with pytest.raises(ValueError, match="final run status"):
        reg.finish_run(run, "paused")
    # a rejected non-finite update is kept, its norm moved into the reason
    reg.record_participation(run, 1, node_id=3, status="rejected", reason="non-finite update", update_norm=math.nan)
    (row,) = reg.participation(run)
    assert row["update_norm"] is None and "update_norm=nan" in row["reason"]


def test_export_csv(db_url: str, tmp_path: Path) -> None:
    reg = Registry(db_url)
    run = fill(reg)
    files = reg.export_csv(run, tmp_path / "csv")
    assert sorted(p.name for p in files) == ["metrics.csv", "metrics_global.csv", "metrics_site_alpha.csv"]
    with (tmp_path / "csv" / "metrics_global.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], float(r["val_loss"])) for r in rows] == [("1", 1.0), ("2", 0.5)]


def test_url_of_plain_path() -> None:
    assert sqlalchemy_url("runs/x.db") == "sqlite:///runs/x.db"
    assert sqlalchemy_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"

"""The site's outbound audit ledger and the metric whitelist."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from client.ledger import LEDGER_FILENAME, METRIC_WHITELIST, AuditLedger, MetricNotAllowed, filter_metrics

DP = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.05, "steps": 40}


def test_size_and_sha256_match_the_payload(tmp_path: Path) -> None:
    ledger = AuditLedger(tmp_path / "state" / "ledger.db")
    payload = b"\x00model-bytes\xff" * 100
    entry_id = ledger.record(
        round=1,
        kind="train_reply",
        payload=payload,
        metrics={"train_loss": 0.5, "num_examples": 40},
        dp=DP,
        epsilon=0.7,
        delta=1e-5,
        run_id="run-1",
    )
    (entry,) = ledger.entries()
    assert entry["id"] == entry_id
    assert entry["size_bytes"] == len(payload) and entry["sha256"] == hashlib.sha256(payload).hexdigest()
    assert entry["metrics"] == {"train_loss": 0.5, "num_examples": 40} and entry["dp"] == DP
    assert (entry["round"], entry["kind"], entry["run_id"], entry["epsilon"], entry["delta"]) == (
        1,
        "train_reply",
        "run-1",
        0.7,
        1e-5,
    )
    assert entry["time"].tzinfo is not None


def test_filter_metrics_drops_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    assert {"train_loss", "num_examples", "epsilon", "val_auc", "val_dice", "val_lung_rads_acc"} <= METRIC_WHITELIST
    raw = {
        "train_loss": np.float32(0.25),
        "num_examples": np.int64(12),
        "val_auc": math.nan,
        "patient_id": 3.0,
        "val_dice": "0.8",
    }
    with caplog.at_level(logging.WARNING, logger="client.ledger"):
        kept = filter_metrics(raw)
    assert kept == {"train_loss": 0.25, "num_examples": 12}
    assert type(kept["num_examples"]) is int and type(kept["train_loss"]) is float
    text = caplog.text
    assert "'patient_id' is not in METRIC_WHITELIST" in text and "'val_auc' is not finite" in text
    assert "'val_dice' is not a real number" in text


def test_record_refuses_what_may_not_leave(tmp_path: Path) -> None:
    ledger = AuditLedger(tmp_path)  # a directory: the site's state dir
    assert (tmp_path / LEDGER_FILENAME).exists()
    with pytest.raises(MetricNotAllowed, match="study_uid"):
        ledger.record(
            round=1, kind="train_reply", payload=b"x", metrics={"study_uid": 1.0}, dp={}, epsilon=None, delta=None
        )
    with pytest.raises(MetricNotAllowed, match="inf"):
        ledger.record(
            round=1, kind="train_reply", payload=b"x", metrics={"val_loss": math.inf}, dp={}, epsilon=None, delta=None
        )
    with pytest.raises(ValueError, match="epsilon"):
        ledger.record(round=1, kind="train_reply", payload=b"x", metrics={}, dp={}, epsilon=-1.0, delta=1e-5)
    with pytest.raises(ValueError, match="dp"):
        ledger.record(
            round=1, kind="train_reply", payload=b"x", metrics={}, dp={"sigma": math.nan}, epsilon=None, delta=None
        )
    assert ledger.entries() == [] and ledger.total_bytes() == 0


def test_persistence_and_order(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    first = AuditLedger(path)
    for rnd in (1, 2):
        first.record(
            round=rnd,
            kind="train_reply",
            payload=bytes(10 * rnd),
            metrics={"epsilon": 0.5 * rnd},
            dp=DP,
            epsilon=0.5 * rnd,
            delta=1e-5,
        )
    first.close()
    second = AuditLedger(f"sqlite:///{path}")
    second.record(
        round=2, kind="evaluate_reply", payload=b"abc", metrics={"val_loss": 0.3}, dp={}, epsilon=1.0, delta=1e-5
    )
    entries = second.entries()
    assert [(e["round"], e["kind"]) for e in entries] == [(1, "train_reply"), (2, "train_reply"), (2, "evaluate_reply")]
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    assert [e["kind"] for e in second.entries(limit=2)] == ["train_reply", "evaluate_reply"]
    assert second.total_bytes() == 10 + 20 + 3

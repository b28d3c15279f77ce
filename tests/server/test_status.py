"""``lungvl server status`` tables rendered from a filled registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from server.registry import Registry
from server.status import render_status, status_rows
from tests.server.test_registry import fill
from tests.server.test_registry_backends import BACKENDS, fresh_database


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty registry database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    with fresh_database(request.param, tmp_path / "db") as url:
        yield url


def render(reg: Registry, run_id: int | None = None) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(*render_status(reg, run_id))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_status_shows_run_rounds_and_epsilon(db_url: str) -> None:
    reg = Registry(db_url)
    run = fill(reg)
    reg.start_round(run, 3, sampled=3)
    text = render(reg)
    assert "Run mix (#1)" in text
    assert "2 of 3 recorded" in text
    assert "1.000 (δ=1.0e-05)" in text  # latest client-level ε
    assert "2.000 (alpha)" in text  # max site ε
    assert "no reply within 600 s" in text and "gamma" in text
    with Registry(db_url, read_only=True) as reader:  # another process's view while the run goes on
        assert render(reader) == text
    rows = status_rows(reg, run)
    assert rows is not None and [r["epsilon"] for r in rows["rounds"]] == [0.5, 1.0, None]
    assert {s["site"]: (s["ok"], s["failed"]) for s in rows["sites"]} == {
        "alpha": (2, 0),
        "beta": (2, 0),
        "gamma": (1, 1),
    }
    assert rows["metric_names"] == ["val_auc", "val_loss"]


def test_status_of_an_empty_registry(db_url: str) -> None:
    reg = Registry(db_url)
    assert status_rows(reg) is None
    assert "no runs recorded" in render(reg)

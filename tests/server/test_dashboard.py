"""The coordinator dashboard's JSON API, SVG plots and page, through FastAPI's TestClient (no browser)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.dashboard import check_bind, create_app, is_loopback
from server.dashboard_svg import epsilon_chart, line_chart, metric_charts
from server.registry import Registry
from server.status import STATUS_SCHEMA_VERSION, runs_json, status_json
from tests.server.test_registry import fill
from tests.server.test_registry_backends import BACKENDS, fresh_database

SVG = "{http://www.w3.org/2000/svg}"
TOP_KEYS = {
    "schema_version",
    "registry",
    "run",
    "progress",
    "privacy",
    "rounds",
    "sites",
    "failures",
    "metric_names",
    "latest_global_round",
    "latest_global_metrics",
}


@pytest.fixture(params=BACKENDS)
def filled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A registry (SQLite or PostgreSQL) holding the ``fill`` run plus a second run with a budget."""
    with fresh_database(request.param, tmp_path) as url:
        with Registry(url) as reg:
            run = fill(reg)
            other = reg.start_run("budgeted", {"server": {"rounds": 4, "target_epsilon": 2.0}}, seed=1)
            reg.start_round(other, 1, sampled=2)
            reg.record_privacy(
                other, 1, level="client", epsilon=0.5, delta=1e-5, noise_multiplier=1.0, sample_rate=1.0, steps=1,
                accountant="rdp",
            )  # fmt: skip
        yield url, run


def test_api_is_the_status_json_of_the_cli(filled: tuple[str, int]) -> None:
    url, run = filled
    client = TestClient(create_app(url))
    with Registry(url, read_only=True) as reg:
        expected_runs = runs_json(reg)
        expected = status_json(reg, run)
        latest = status_json(reg)
    assert client.get("/api/runs").json() == json.loads(json.dumps(expected_runs))
    got = client.get(f"/api/runs/{run}").json()
    assert got == json.loads(json.dumps(expected))
    assert client.get("/api/runs/latest").json() == json.loads(json.dumps(latest))
    assert set(got) == TOP_KEYS and got["schema_version"] == STATUS_SCHEMA_VERSION
    assert [r["name"] for r in expected_runs["runs"]] == ["budgeted", "mix"]  # newest first
    assert expected_runs["runs"][0]["rounds_planned"] == 4 and expected_runs["runs"][1]["rounds_completed"] == 2
    # what the page shows, from the hand-filled registry
    assert got["run"]["status"] == "running" and not got["run"]["ended"]
    assert [(r["round"], r["status"], r["epsilon"]) for r in got["rounds"]] == [
        (1, "completed", 0.5),
        (2, "completed", 1.0),
    ]
    assert got["rounds"][1]["sites"] == {"alpha": "ok", "beta": "ok", "gamma": "timeout"}
    assert got["failures"] == [{"round": 2, "site": "gamma", "status": "timeout", "reason": "no reply within 600 s"}]
    assert {s["site"]: (s["ok"], s["not_ok"]) for s in got["sites"]} == {
        "alpha": (2, 0),
        "beta": (2, 0),
        "gamma": (1, 1),
    }
    assert got["privacy"]["epsilon"] == 1.0 and got["privacy"]["epsilon_budget"] is None
    assert got["metric_names"] == ["val_auc", "val_loss"]
    budgeted = latest
    assert budgeted is not None and budgeted["privacy"]["budget_used"] == pytest.approx(0.25)
    assert budgeted["progress"] == {
        "rounds_planned": 4,
        "rounds_completed": 0,
        "rounds_recorded": 1,
        "last_completed_round": 0,
    }


def test_unknown_run_and_empty_registry(tmp_path: Path) -> None:
    url = str(tmp_path / "r.db")
    Registry(url).close()  # tables, no run
    client = TestClient(create_app(url))
    assert client.get("/api/runs").json()["runs"] == []
    res = client.get("/api/runs/latest")
    assert res.status_code == 404 and res.json() == {"error": "no runs recorded yet"}
    res = client.get("/api/runs/7")
    assert res.status_code == 404 and "no run with id 7" in res.json()["error"]
    assert client.get("/plots/7/metrics.svg").status_code == 404
    assert client.get("/api/runs/x").status_code == 422


def test_each_request_reads_the_registry_afresh(tmp_path: Path) -> None:
    url = str(tmp_path / "r.db")
    writer = Registry(url)
    run = fill(writer)
    client = TestClient(create_app(url))
    assert len(client.get(f"/api/runs/{run}").json()["rounds"]) == 2
    writer.start_round(run, 3, sampled=3)  # a writer keeps going while the page is open
    doc = client.get(f"/api/runs/{run}").json()
    assert [r["status"] for r in doc["rounds"]] == ["completed", "completed", "running"]
    writer.end_round(run, 3, replied=3, failed=0, status="completed", update_norm=0.1)
    writer.finish_run(run, "finished")
    doc = client.get(f"/api/runs/{run}").json()
    assert doc["rounds"][-1]["status"] == "completed" and doc["run"]["ended"] and doc["run"]["finished_at"]


def test_never_writes_and_reports_an_unreadable_registry(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # no tables: a writer would create them, a reader must not
    client = TestClient(create_app(str(empty)))
    res = client.get("/api/runs")
    assert res.status_code == 503 and "registry unreadable" in res.json()["error"]
    assert empty.read_bytes() == b""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    assert TestClient(create_app(str(junk))).get("/api/runs").status_code == 503
    gone = TestClient(create_app(str(tmp_path / "gone.db"))).get("/api/runs/latest")
    assert gone.status_code == 503 and "no registry at" in gone.json()["error"]
    assert not (tmp_path / "gone.db").exists()


def test_page_and_assets_are_local(tmp_path: Path) -> None:
    url = str(tmp_path / "r.db")
    fill(Registry(url))
    client = TestClient(create_app(url))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in (
        'id="runs"',
        'id="rounds"',
        'id="participation"',
        'id="sites"',
        'id="epsilon"',
        'id="plot-metrics"',
    ):
        assert element in page.text
    js = client.get("/static/dashboard.js")
    css = client.get("/static/dashboard.css")
    assert js.status_code == css.status_code == 200 and "/api/runs" in js.text
    for text in (page.text, js.text, css.text):  # nothing fetched from elsewhere (no CDN)
        assert not re.search(r"(src|href)=\"(https?:)?//", text) and "cdn" not in text.lower()
        assert "https://" not in text and "http://" not in text
    assert client.get("/docs").status_code == 404  # no interactive API console on a coordinator's page


def _parse(svg: str) -> list[ET.Element]:
    """The ``<svg>`` elements of ``svg`` (one or more, concatenated), parsed as XML."""
    return list(ET.fromstring(f"<root>{svg}</root>"))


def test_plots_are_svg_from_the_same_numbers(tmp_path: Path) -> None:
    url = str(tmp_path / "r.db")
    reg = Registry(url)
    run = reg.start_run("a <b> & c", {"server": {"rounds": 3, "target_epsilon": 3.0}}, seed=0)
    for rnd, eps in ((1, 0.9), (2, 1.6)):
        reg.start_round(run, rnd, sampled=2)
        reg.end_round(run, rnd, replied=2, failed=0, status="completed", update_norm=0.5)
        reg.record_metrics(run, rnd, "global", {"val_loss": 2.0 / rnd, "val_auc": 0.5 + 0.1 * rnd})
        reg.record_privacy(
            run, rnd, level="client", epsilon=eps, delta=1e-5, noise_multiplier=1.0, sample_rate=1.0, steps=rnd,
            accountant="rdp",
        )  # fmt: skip
    client = TestClient(create_app(url))
    res = client.get(f"/plots/{run}/metrics.svg")
    assert res.status_code == 200 and res.headers["content-type"].startswith("image/svg+xml")
    losses, scores = _parse(res.text)
    assert losses.tag == scores.tag == f"{SVG}svg"
    series = {g.get("data-name"): g for g in losses.iter(f"{SVG}g")}
    assert set(series) == {"val_loss"} and series["val_loss"].get("data-points") == "2"
    assert "a <b> & c: losses" in ET.tostring(losses, encoding="unicode").replace("&lt;", "<").replace(
        "&gt;", ">"
    ).replace("&amp;", "&")
    (eps,) = _parse(client.get(f"/plots/{run}/epsilon.svg").text)
    assert [g.get("data-points") for g in eps.iter(f"{SVG}g")] == ["2"]
    budget = [t.text for t in eps.iter(f"{SVG}text") if t.get("class") == "budget-label"]
    assert budget == ["budget ε=3"]


def test_line_chart_edges() -> None:
    empty = line_chart({}, title="t", y_label="y")
    assert "no data yet" in empty and _parse(empty)
    chart = line_chart(
        {"x": [(1, float("nan")), (2, 1.0), (3, float("inf"))], "<y>": [(1, 5.0)]}, title="t", y_label="y"
    )
    (svg,) = _parse(chart)
    points = {g.get("data-name"): g.get("data-points") for g in svg.iter(f"{SVG}g")}
    assert points == {"x": "1", "<y>": "1"}  # non-finite points dropped, names escaped
    flat = line_chart({"c": [(1, 2.0), (2, 2.0)]}, title="t", y_label="y", hline=(2.0, "budget"))
    assert _parse(flat) and "NaN" not in flat and "inf" not in flat


def _doc(rounds: list[dict[str, Any]], budget: float | None = None) -> dict[str, Any]:
    return {"run": {"name": "n"}, "rounds": rounds, "privacy": {"epsilon_budget": budget, "delta": None}}


def test_charts_of_a_run_without_dp_or_metrics() -> None:
    doc = _doc([{"round": 1, "metrics": {}, "epsilon": None}])
    assert metric_charts(doc).count("no data yet") == 2
    assert "no data yet" in epsilon_chart(doc)


@pytest.mark.parametrize(
    ("host", "cert", "key", "error"),
    [
        ("127.0.0.1", None, None, None),
        ("localhost", None, None, None),
        ("::1", None, None, None),
        ("0.0.0.0", None, None, "not loopback"),
        ("10.1.2.3", None, None, "not loopback"),
        ("127.0.0.1", "c.pem", None, "give both"),
        ("0.0.0.0", "c.pem", "k.pem", None),
        ("0.0.0.0", "c.pem", "missing.pem", "does not exist"),
    ],
)
def test_check_bind(tmp_path: Path, host: str, cert: str | None, key: str | None, error: str | None) -> None:
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    paths = [None if p is None else tmp_path / p for p in (cert, key)]
    if error is None:
        check_bind(host, paths[0], paths[1])
    else:
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            check_bind(host, paths[0], paths[1])


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org") and not is_loopback("::")

"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

uvicorn serves :func:`server.dashboard.create_app` on a free loopback port in a thread while the registry
is written: by a thread appending rounds through the Registry API (fast test), or by a real ``lungvl
simulate`` of the tiny scenario in a subprocess (slow test). The page must show each round as it
completes, without a reload. Set ``LUNGVL_DASHBOARD_SCREENSHOT=path.png`` to keep the slow test's
screenshot (docs/dashboard.png comes from it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.registry import Registry
from tests.conftest import chromium_paths

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dashboard_url(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Start the dashboard of a registry with uvicorn in a thread; returns its base URL (stopped afterwards)."""
    import uvicorn

    from server.dashboard import create_app

    servers: list[tuple[Any, threading.Thread]] = []

    def start(registry_url: str) -> str:
        port = _free_port()
        config = uvicorn.Config(create_app(registry_url), host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (skips locally when Debian's chromium/chromedriver are absent; fails in CI)."""
    chrome, driver = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _rounds_shown(drv: Any) -> list[tuple[str, str]]:
    """``(round, status)`` of every row of the page's rounds table (read in one script: rows are redrawn)."""
    rows = drv.execute_script(
        "return [...document.querySelectorAll('#rounds tbody tr')].map(r => [r.dataset.round, r.dataset.status]);"
    )
    return [(str(r), str(s)) for r, s in rows]


def _texts(drv: Any, selector: str) -> list[str]:
    """Text of every element matching ``selector``, read in one script."""
    return [
        str(t)
        for t in drv.execute_script(f"return [...document.querySelectorAll({selector!r})].map(e => e.textContent);")
    ]


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout:.0f} s")
        time.sleep(0.2)


def _append_rounds(url: str, run_id: int, rounds: int, pause: float) -> None:
    """What a server writes per round, through the Registry API, ``pause`` seconds apart."""
    with Registry(url) as reg:
        for rnd in range(1, rounds + 1):
            time.sleep(pause)
            reg.start_round(run_id, rnd, sampled=2)
            time.sleep(pause)
            for site, status in (("hospital-a", "ok"), ("hospital-b", "ok" if rnd != 2 else "timeout")):
                reason = "" if status == "ok" else "no reply within 600 s"
                reg.record_participation(
                    run_id, rnd, node_id=site, site_name=site, status=status, reason=reason, num_examples=8
                )
            reg.end_round(
                run_id, rnd, replied=2 - (rnd == 2), failed=int(rnd == 2), status="completed", update_norm=0.3
            )
            reg.record_metrics(run_id, rnd, "global", {"val_loss": 2.0 / rnd, "val_auc": 0.5 + 0.05 * rnd})
            reg.record_privacy(
                run_id, rnd, level="client", epsilon=0.6 * rnd, delta=1e-5, noise_multiplier=1.0, sample_rate=1.0,
                steps=rnd, accountant="rdp",
            )  # fmt: skip
        reg.finish_run(run_id, "finished")


def test_page_shows_rounds_as_they_complete(tmp_path: Path, browser: Any, dashboard_url: Callable[[str], str]) -> None:
    from selenium.webdriver.common.by import By

    db = str(tmp_path / "registry.db")
    with Registry(db) as reg:
        run_id = reg.start_run("live", {"server": {"rounds": 3, "target_epsilon": 3.0}}, seed=0)
    browser.get(dashboard_url(db))
    _wait("the run", lambda: browser.find_element(By.ID, "run-name").text == "live (#1)", 20)
    assert _rounds_shown(browser) == []
    # each round stays "running" 2.5 s, longer than the page's 2 s poll, so every round can be seen running
    writer = threading.Thread(target=_append_rounds, args=(db, run_id, 3, 2.5), daemon=True)
    writer.start()
    seen: list[list[tuple[str, str]]] = []
    deadline = time.monotonic() + 60
    final = [("1", "completed"), ("2", "completed"), ("3", "completed")]
    while time.monotonic() < deadline:
        # the status first: the rows read after it come from the same poll or a later one (reading the rows
        # first could pair an earlier poll's rows with a later poll's "finished")
        finished = browser.find_element(By.ID, "run-status").text == "finished"
        shown = _rounds_shown(browser)
        if not seen or shown != seen[-1]:
            seen.append(shown)
        if finished and shown == final:
            break
        time.sleep(0.2)
    writer.join(timeout=30)
    assert seen[-1] == final, seen
    completed = [sum(s == "completed" for _, s in shown) for shown in seen]
    assert completed == sorted(completed) and {1, 2} <= set(completed), seen  # one round after another, live
    assert any(status == "running" for shown in seen for _, status in shown), seen  # a round seen in progress
    assert browser.find_element(By.ID, "progress-text").text.startswith("3 of 3 rounds completed")
    assert browser.find_element(By.ID, "epsilon").text == "1.8"
    assert "budget ε = 3" in browser.find_element(By.ID, "epsilon-budget").text
    _wait(
        "the metrics plot",
        lambda: 'data-points="3"' in browser.find_element(By.ID, "plot-metrics").get_attribute("innerHTML"),
        10,
    )
    assert _texts(browser, "#participation tbody td.cell.bad") == ["timeout"]
    assert "hospital-b timeout: no reply within 600 s" in browser.find_element(By.ID, "failures").text
    assert browser.find_element(By.ID, "error").is_displayed() is False
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@pytest.mark.slow
def test_page_follows_a_real_simulation(tmp_path: Path, browser: Any, dashboard_url: Callable[[str], str]) -> None:
    """`lungvl simulate` of the tiny scenario (2 sites, 2 rounds; minutes on 2 cores) watched live."""
    from selenium.webdriver.common.by import By

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    log = (tmp_path / "simulate.log").open("w")
    cmd = [
        sys.executable,
        "-m",
        "lungvl.cli",
        "simulate",
        str(ROOT / "simulations/scenarios/tiny.toml"),
        "--out",
        str(out),
    ]
    sim = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        browser.get(dashboard_url(str(out / "registry.db")))  # the page waits (and says so) until the registry exists
        seen: list[list[tuple[str, str]]] = []
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            shown = _rounds_shown(browser)
            if not seen or shown != seen[-1]:
                seen.append(shown)
            if sim.poll() is not None and browser.find_element(By.ID, "run-status").text != "running" and shown:
                time.sleep(2.5)  # one more poll after the run ended
                seen.append(_rounds_shown(browser))
                break
            time.sleep(0.5)
        assert sim.wait(timeout=60) == 0, (tmp_path / "simulate.log").read_text()[-3000:]
    finally:
        if sim.poll() is None:
            sim.kill()
        log.close()
    assert seen[-1] == [("1", "completed"), ("2", "completed")], seen
    # followed live: the page showed rounds before the final state (which earlier state a loaded machine's polls
    # catch, round 1 alone or round 2 running, depends on timing: a fresh-clone run caught only the latter)
    assert any(shown and shown != seen[-1] for shown in seen[:-1]), seen
    assert browser.find_element(By.ID, "run-status").text == "finished"
    shot = tmp_path / "dashboard.png"
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1400, min(height + 120, 4000))  # the whole page in one picture
    time.sleep(0.5)
    browser.save_screenshot(str(shot))
    if os.environ.get("LUNGVL_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LUNGVL_DASHBOARD_SCREENSHOT"])

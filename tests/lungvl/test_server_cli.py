"""``lungvl server status --json/--watch``, ``server dashboard`` refusals and ``server start --db``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lungvl.cli import run
from lungvl.errors import BAD_INPUT, CORRUPT_STATE, FAILED, MISSING_DEPENDENCY, OK
from server.registry import Registry
from server.status import status_json
from tests.server.test_registry import fill


def lungvl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_json_is_the_dashboard_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    reg = Registry(db)
    run_id = fill(reg)
    code, out, err = lungvl(capsys, "server", "status", "--db", str(db), "--json")
    assert code == OK, err
    with Registry(db, read_only=True) as ro:
        assert json.loads(out) == json.loads(json.dumps(status_json(ro, run_id)))
    reg.finish_run(run_id, "failed")
    code, out, _ = lungvl(capsys, "server", "status", "--db", str(db), "--json")
    assert code == FAILED and json.loads(out)["run"]["status"] == "failed"
    code, out, _ = lungvl(capsys, "server", "status", "--db", str(db))
    assert code == FAILED and "Run mix (#1)" in out and "failed" in out


def test_status_of_an_empty_registry_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    Registry(db).close()
    code, out, _ = lungvl(capsys, "server", "status", "--db", str(db), "--json")
    assert code == OK and json.loads(out) == {"schema_version": 1, "registry": f"sqlite:///{db}", "run": None}


def test_status_bad_registry_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lungvl(capsys, "server", "status", "--db", str(tmp_path / "nope.db"))
    assert code == BAD_INPUT and "no registry at" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 50)
    code, _, err = lungvl(capsys, "server", "status", "--db", str(junk), "--json")
    assert code == CORRUPT_STATE and str(junk) in err and len(err.strip().splitlines()) == 1
    code, _, err = lungvl(capsys, "server", "status")
    assert code == BAD_INPUT and "--db" in err
    code, _, err = lungvl(capsys, "server", "status", "--db", str(junk), "--config", str(tmp_path / "s.toml"))
    assert code == BAD_INPUT and "not both" in err
    code, _, err = lungvl(capsys, "server", "status", "--db", str(junk), "--watch", "0")
    assert code == BAD_INPUT and "SECONDS must be > 0" in err


def _finish_later(db: Path, run_id: int) -> threading.Thread:
    def work() -> None:
        with Registry(db) as reg:
            time.sleep(0.6)
            reg.start_round(run_id, 3, sampled=3)
            time.sleep(0.6)
            reg.end_round(run_id, 3, replied=3, failed=0, status="completed", update_norm=0.2)
            reg.finish_run(run_id, "finished")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_watch_json_follows_the_run_until_it_ends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    run_id = fill(Registry(db))
    writer = _finish_later(db, run_id)
    code, out, err = lungvl(capsys, "server", "status", "--db", str(db), "--watch", "0.2", "--json")
    writer.join()
    assert code == OK, err
    docs: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert [len(d["rounds"]) for d in docs][0] == 2 and docs[-1]["run"]["ended"]
    statuses = [tuple(r["status"] for r in d["rounds"]) for d in docs]
    assert ("completed", "completed", "running") in statuses  # the round in progress was seen
    assert statuses[-1] == ("completed",) * 3 and len(set(map(json.dumps, docs))) == len(docs)  # one line per change


def test_watch_tables_end_with_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    run_id = fill(Registry(db))
    writer = _finish_later(db, run_id)
    t0 = time.monotonic()
    code, out, err = lungvl(capsys, "server", "status", "--db", str(db), "--watch", "0.2")
    writer.join()
    assert code == OK, err
    assert "3 of 3 recorded" in out and "finished" in out and time.monotonic() - t0 < 30
    # --watch without SECONDS (the default interval) before another option; an ended run returns at once
    code, out, err = lungvl(capsys, "server", "status", "--watch", "--db", str(db), "--json")
    assert code == OK, err
    assert json.loads(out)["run"]["status"] == "finished"


def _server_toml(tmp_path: Path) -> Path:
    toml = tmp_path / "server.toml"
    toml.write_text(
        '[server]\nrounds = 2\n[deployment]\nrun_dir = "run"\nca_cert = "ca.crt"\nserver_cert = "server.crt"\n'
        'server_key = "server.key"\ninit_model = "model"\n'
    )
    return toml


def test_dashboard_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    fill(Registry(db))
    code, _, err = lungvl(capsys, "server", "dashboard", "--db", str(db), "--host", "0.0.0.0")
    assert code == BAD_INPUT and "not loopback" in err and len(err.strip().splitlines()) == 1
    # --config supplies the coordinator's certificate for a non-loopback host; here it does not exist
    toml = _server_toml(tmp_path)
    code, _, err = lungvl(capsys, "server", "dashboard", "--config", str(toml), "--host", "0.0.0.0")
    assert code == BAD_INPUT and "server.crt does not exist" in err
    code, _, err = lungvl(capsys, "server", "dashboard", "--db", str(tmp_path / "missing.db"))
    assert code == BAD_INPUT and "missing.db" in err
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 50)
    code, _, err = lungvl(capsys, "server", "dashboard", "--db", str(junk))
    assert code == CORRUPT_STATE and len(err.strip().splitlines()) == 1
    code, _, err = lungvl(capsys, "server", "dashboard", "--db", str(db), "--port", "0")
    assert code == BAD_INPUT


def test_start_db_overrides_the_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.deploy

    seen: dict[str, Any] = {}

    def fake_start(cfg: server.deploy.ServerDeployConfig, **_: Any) -> dict[str, Any]:
        seen["registry"] = cfg.registry_url  # only the option's plumbing is under test here
        return {"status": "finished"}

    monkeypatch.setattr(server.deploy, "start_server", fake_start)
    toml = _server_toml(tmp_path)
    assert lungvl(capsys, "server", "start", "--config", str(toml))[0] == OK
    assert seen["registry"] == str((tmp_path / "run" / "registry.db").resolve())
    url = "postgresql+psycopg://u@db.example/lungvl"
    assert lungvl(capsys, "server", "start", "--config", str(toml), "--db", url)[0] == OK
    assert seen["registry"] == url
    monkeypatch.chdir(tmp_path)
    assert lungvl(capsys, "server", "start", "--config", str(toml), "--db", "elsewhere.db")[0] == OK
    assert seen["registry"] == str(tmp_path / "elsewhere.db")


def test_dashboard_without_the_extra_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "server.dashboard", None)  # as if FastAPI/uvicorn were not installed
    code, _, err = lungvl(capsys, "server", "dashboard", "--db", str(tmp_path / "r.db"))
    assert code == MISSING_DEPENDENCY and "lungvl[dashboard]" in err

"""Consecutive failed rounds abort a run: the engine decides, the strategy raises, the ServerApp records it
``failed``; and the ServerApp's run config resolves paths against the app directory and builds a missing
initial model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from federation.records import arrays_to_record
from server.app import ServerRunSpec, app_dir, build_init_model, run_server
from server.config import ServerConfig
from server.registry import Registry
from server.round_engine import RoundEngine
from server.round_types import DEFAULT_MAX_FAILED_ROUNDS, RunAborted, SiteReply
from server.strategy import DPFedAvgM
from tests.server.test_strategy import FEDAVG, W0, LocalGrid, delta, play_round, toy_client

ROOT = Path(__file__).resolve().parents[2]
OK = {1: SiteReply(1, arrays=delta(1.0), num_examples=4), 2: SiteReply(2, arrays=delta(3.0), num_examples=4)}
FAIL = {1: SiteReply(1, error="[code 2] boom"), 2: SiteReply(2, error="[code 2] boom")}


def engine(max_failed_rounds: int) -> RoundEngine:
    return RoundEngine(ServerConfig.from_dict(FEDAVG), W0, log=lambda _: None, max_failed_rounds=max_failed_rounds)


def test_engine_aborts_after_n_failed_rounds_in_a_row() -> None:
    """Hand-computed: F F C F F F with N = 3; the streak is 1 2 0 1 2 3 and only round 6 aborts."""
    eng = engine(3)
    streaks, reasons = [], []
    for rnd, replies in enumerate([FAIL, FAIL, OK, FAIL, FAIL, FAIL], start=1):
        play_round(eng, rnd, replies)
        streaks.append(eng.failed_streak)
        reasons.append(eng.abort_reason())
    assert streaks == [1, 2, 0, 1, 2, 3]
    assert reasons[:5] == [None] * 5
    assert reasons[5] == (
        "3 consecutive failed rounds (rounds 4-6) reached max-consecutive-failed-rounds = 3; the run is aborted"
    )
    np.testing.assert_allclose(eng.weights[0], 2.0)  # only round 3 moved the model: mean of 1 and 3


def test_zero_never_aborts() -> None:
    eng = engine(0)
    for rnd in range(1, 6):
        play_round(eng, rnd, FAIL)
    assert eng.failed_streak == 5 and eng.abort_reason() is None


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_invalid_args(bad: object) -> None:
    with pytest.raises(ValueError, match="max_failed_rounds must be an integer >= 0"):
        engine(bad)  # type: ignore[arg-type]


def test_strategy_raises_after_the_last_failed_round_is_committed(tmp_path: Path, task_identity: None) -> None:
    grid = LocalGrid(toy_client(lambda name, rnd: "error" if rnd >= 2 else "ok"), {1: "a", 2: "b"})
    reg = Registry(tmp_path / "reg.db")
    cfg = ServerConfig.from_dict({**FEDAVG, "rounds": 10, "round_timeout_s": 5.0, "fraction_evaluate": 0.0})
    run = reg.start_run("abort", cfg.to_dict(), seed=0)
    closed: list[int] = []
    strategy = DPFedAvgM(
        cfg, registry=reg, run_id=run, log=lambda _: None, on_round_end=lambda e, o: closed.append(o.round),
        max_failed_rounds=2,
    )  # fmt: skip
    with pytest.raises(RunAborted, match=r"2 consecutive failed rounds \(rounds 2-3\)"):
        strategy.start(grid, arrays_to_record(W0))
    assert closed == [1, 2, 3]
    assert [r["status"] for r in reg.rounds(run)] == ["completed", "failed", "failed"]  # all committed
    assert DPFedAvgM(cfg).max_failed_rounds == DEFAULT_MAX_FAILED_ROUNDS == 3


def test_run_server_builds_the_missing_init_model_and_records_an_aborted_run_failed(
    tmp_path: Path, task_identity: None
) -> None:
    (tmp_path / "server.toml").write_text("[strategy]\nrounds = 6\nmin_sites = 2\nfraction_evaluate = 0.0\n")
    spec = ServerRunSpec.from_run_config(
        {
            "server-config": "server.toml",
            "init-model": "models/init",
            "model-config": str(ROOT / "simulations/scenarios/tiny.toml"),
            "run-dir": "runs/x",
            "max-consecutive-failed-rounds": 2,
        },
        base=tmp_path,
    )
    assert spec.init_model == tmp_path / "models/init" and spec.registry == str(tmp_path / "runs/x/registry.db")
    grid = LocalGrid(toy_client(lambda name, rnd: "error"), {1: "a", 2: "b"})
    with pytest.raises(RunAborted):
        run_server(grid, spec, log=lambda _: None)
    assert (tmp_path / "models/init/model.pt").is_file()
    assert not list((tmp_path / "models").glob(".init.tmp-*"))
    with Registry(spec.registry) as reg:
        summary = reg.summary(1)
        assert summary["run"]["status"] == "failed" and summary["rounds_done"] == 0
        assert [r["status"] for r in reg.rounds(1)] == ["failed", "failed"]


def test_run_config_paths_resolve_against_the_app(tmp_path: Path) -> None:
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra/s.toml").write_text("rounds = 4\n")
    rc = {"server-config": "infra/s.toml", "init-model": "/abs/model", "registry": "postgresql://h/db"}
    spec = ServerRunSpec.from_run_config({**rc, "num-server-rounds": 2}, base=tmp_path)
    assert spec.config.rounds == 2 and spec.init_model == Path("/abs/model")
    assert spec.run_dir == tmp_path / "runs/server" and spec.registry == "postgresql://h/db"
    assert spec.max_failed_rounds == 3 and spec.model_config is None
    assert ServerRunSpec.from_run_config(rc, base=tmp_path).config.rounds == 4
    with pytest.raises(ValueError, match="'max-consecutive-failed-rounds' must be an integer >= 0, got -1"):
        ServerRunSpec.from_run_config({**rc, "max-consecutive-failed-rounds": -1}, base=tmp_path)


def test_failed_round_limit_comes_from_the_server_toml_unless_the_run_config_sets_it(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text("[strategy]\nrounds = 4\nmax_failed_rounds = 5\n")
    rc = {"server-config": "s.toml", "init-model": "/abs/model"}
    assert ServerRunSpec.from_run_config(rc, base=tmp_path).max_failed_rounds == 5
    assert (
        ServerRunSpec.from_run_config({**rc, "max-consecutive-failed-rounds": ""}, base=tmp_path).max_failed_rounds == 5
    )
    assert (
        ServerRunSpec.from_run_config({**rc, "max-consecutive-failed-rounds": 0}, base=tmp_path).max_failed_rounds == 0
    )
    (tmp_path / "bad.toml").write_text("[strategy]\nmax_failed_rounds = -2\n")
    with pytest.raises(ValueError, match=r"max_failed_rounds must be >= 0 \(0 = never abort\), got -2"):
        ServerRunSpec.from_run_config({**rc, "server-config": "bad.toml"}, base=tmp_path)
    cfg = ServerConfig.from_toml(ROOT / "infra" / "server.toml")
    assert cfg.max_failed_rounds == 3 and ServerConfig.from_mapping(cfg.to_tables()).max_failed_rounds == 3
    assert cfg.to_tables()["strategy"]["max_failed_rounds"] == 3


def test_app_dir_is_the_flower_app_this_code_runs_from() -> None:
    assert app_dir() == ROOT  # the repository's pyproject.toml has a [tool.flwr.app] table


def test_model_config_without_a_model_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text("rounds = 1\n")
    rc = {"server-config": "s.toml", "init-model": "m", "model-config": "s.toml"}
    with pytest.raises(KeyError, match=r"model-config .*s\.toml has no \[model\] table"):
        build_init_model(ServerRunSpec.from_run_config(rc, base=tmp_path))
    assert not (tmp_path / "m").exists()

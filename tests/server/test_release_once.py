"""Release once: a round is checkpointed and committed before its model leaves the server, every release
(failed rounds too) is charged to ε once, and a resumed run never draws a released round again.

The ServerApp's :func:`server.app.run_server` runs here on an in-process grid (``LocalGrid`` of
``test_strategy``) with a micro LungVL model, so checkpoints, registry and resume are the real ones.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from lungvl_model.training.checkpoint import sha256_file
from privacy.budget import ClientLevelAccountant
from server.app import ServerRunSpec, load_round_checkpoint, run_server
from server.config import ServerConfig
from server.registry import Registry
from server.round_engine import RoundEngine
from server.round_types import RoundOutcome, SiteReply
from server.strategy import DPFedAvgM
from tests.server.test_strategy import W0, LocalGrid, toy_client

NODES = {1: "a", 2: "b"}
PRIVATE = {"strategy": "fedavg", "server_momentum": 0.0, "min_sites": 2, "clip_norm": 1.0}
PRIVATE |= {"client_noise_multiplier": 0.5, "round_timeout_s": 5.0, "seed": 4}


class RecordingGrid(LocalGrid):
    """A LocalGrid that logs every train/evaluate push ``(type, round)``, notes what the registry held
    for a round when its evaluate messages went out, and can crash right after a push."""

    def __init__(
        self,
        client_app: ClientApp,
        db: Path,
        *,
        crash_after_evaluate: int | None = None,
        crash_before_train: int | None = None,
    ) -> None:
        super().__init__(client_app, NODES)
        self.db, self.crash_after_evaluate, self.crash_before_train = db, crash_after_evaluate, crash_before_train
        self.pushed: list[tuple[str, int]] = []
        self.at_evaluate: dict[int, tuple[str, bool]] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        batch = list(messages)
        kinds = {(m.metadata.message_type, int(m.metadata.group_id or 0)) for m in batch}
        if ("train", self.crash_before_train) in kinds:
            raise RuntimeError("server crash before round's train messages")
        for kind, rnd in kinds:
            if kind == "evaluate":
                with Registry(self.db) as reg:
                    run = reg.latest_run()
                    assert run is not None
                    status = {r["round"]: r["status"] for r in reg.rounds(run["id"])}.get(rnd, "missing")
                    checkpointed = rnd in {c["round"] for c in reg.checkpoints(run["id"])}
                self.at_evaluate[rnd] = (status, checkpointed)
        self.pushed += [(m.metadata.message_type, int(m.metadata.group_id)) for m in batch if m.metadata.group_id]
        ids = super().push_messages(batch)
        if ("evaluate", self.crash_after_evaluate) in kinds:
            raise RuntimeError("server crash after the evaluation broadcast")
        return ids


def serve(run_dir: Path, cfg: ServerConfig, init: Path, grid: LocalGrid, *, resume: bool = False) -> dict[str, Any]:
    spec = ServerRunSpec(cfg, init, run_dir, str(run_dir / "registry.db"), "release-once", resume=resume)
    return run_server(grid, spec, log=lambda _: None)


def epsilon_after(cfg: ServerConfig, rounds: int, sites: int = 2) -> float:
    acc = ClientLevelAccountant(
        total_sites=sites,
        expected_sites=cfg.expected_sites(sites),
        noise_multiplier=cfg.client_noise_multiplier,
        delta=cfg.delta,
    )
    for _ in range(rounds):
        acc.step_round()
    return acc.epsilon


def client_ledger(db: Path) -> list[tuple[int, int]]:
    with Registry(db) as reg:
        run = reg.latest_run()
        assert run is not None
        return [(p["round"], p["steps"]) for p in reg.privacy(run["id"]) if p["level"] == "client"]


def test_a_crash_after_the_evaluation_broadcast_does_not_release_the_round_again(
    tmp_path: Path, init_model: Path, task_identity: None
) -> None:
    cfg = ServerConfig.from_dict({**PRIVATE, "rounds": 3})
    db = tmp_path / "registry.db"
    grid = RecordingGrid(toy_client(lambda n, r: "ok"), db, crash_after_evaluate=2)
    with pytest.raises(RuntimeError, match="after the evaluation broadcast"):
        serve(tmp_path, cfg, init_model, grid)
    assert grid.pushed == [(t, r) for r in (1, 2) for t in ("train", "train", "evaluate", "evaluate")]
    # the new model went out for evaluation only once its round was committed and checkpointed
    assert grid.at_evaluate == {1: ("completed", True), 2: ("completed", True)}
    with Registry(db) as reg:
        run = reg.latest_run()
        assert run is not None and run["status"] == "failed"
        assert [(r["round"], r["status"]) for r in reg.rounds(run["id"])] == [(1, "completed"), (2, "completed")]
    released = sha256_file(tmp_path / "checkpoints" / "round_2" / "model.pt")
    assert client_ledger(db) == [(1, 1), (2, 2)]

    again = RecordingGrid(toy_client(lambda n, r: "ok"), db)
    summary = serve(tmp_path, cfg, init_model, again, resume=True)
    assert [r for t, r in again.pushed if t == "train"] == [3, 3]  # round 2 is not run (nor noised) again
    assert summary["status"] == "finished" and summary["rounds_done"] == 3
    assert sha256_file(tmp_path / "checkpoints" / "round_2" / "model.pt") == released
    assert client_ledger(db) == [(1, 1), (2, 2), (3, 3)]  # each release charged once
    assert summary["epsilon"] == pytest.approx(epsilon_after(cfg, 3), rel=1e-9)


def test_a_failed_round_is_charged_checkpointed_and_resumed_after(
    tmp_path: Path, init_model: Path, task_identity: None
) -> None:
    cfg = ServerConfig.from_dict({**PRIVATE, "rounds": 3})
    db = tmp_path / "registry.db"
    client = toy_client(lambda n, r: "error" if (n, r) == ("b", 2) else "ok")
    grid = RecordingGrid(client, db, crash_before_train=3)
    with pytest.raises(RuntimeError, match="before round's train"):
        serve(tmp_path, cfg, init_model, grid)
    with Registry(db) as reg:
        run = reg.latest_run()
        assert run is not None
        statuses = [(r["round"], r["status"]) for r in reg.rounds(run["id"])]
    assert statuses == [(1, "completed"), (2, "failed"), (3, "running")]
    assert client_ledger(db) == [(1, 1), (2, 2)]  # the failed round 2 is a release: charged
    weights_2, state_2 = load_round_checkpoint(tmp_path / "checkpoints" / "round_2")
    weights_1, _ = load_round_checkpoint(tmp_path / "checkpoints" / "round_1")
    assert state_2["round"] == 2 and all(np.array_equal(a, b) for a, b in zip(weights_1, weights_2, strict=True))

    again = RecordingGrid(toy_client(lambda n, r: "ok"), db)
    summary = serve(tmp_path, cfg, init_model, again, resume=True)
    assert [r for t, r in again.pushed if t == "train"] == [3, 3]  # after the failed round, not before it
    assert client_ledger(db) == [(1, 1), (2, 2), (3, 3)]
    assert summary["rounds_done"] == 2 and summary["epsilon"] == pytest.approx(epsilon_after(cfg, 3), rel=1e-9)


def test_a_poisson_draw_below_min_sites_asks_nobody_and_is_charged(
    monkeypatch: pytest.MonkeyPatch, task_identity: None
) -> None:
    monkeypatch.setattr(RoundEngine, "sample", lambda self, nodes, rnd: sorted(nodes)[:1])  # one of two sites
    cfg = ServerConfig.from_dict({**PRIVATE, "rounds": 2, "fraction_train": 0.5, "min_sites": 2})
    grid = RecordingGrid(toy_client(lambda n, r: "ok"), Path("unused.db"))
    closed: list[RoundOutcome] = []
    strategy = DPFedAvgM(cfg, log=lambda _: None, on_round_end=lambda e, o: closed.append(o))
    from federation.records import arrays_to_record

    strategy.start(grid, arrays_to_record(W0))
    assert grid.pushed == []  # nobody trained for a round that could not complete
    assert [(o.round, o.status, o.sampled) for o in closed] == [(1, "failed", 1), (2, "failed", 1)]
    eng = strategy.engine
    assert eng is not None and eng.accountant is not None and eng.accountant.rounds == 2
    assert eng.accountant.sample_rate == 0.5 and closed[-1].epsilon == pytest.approx(epsilon_after(cfg, 2))


def test_a_round_with_too_few_replies_is_charged(tmp_path: Path) -> None:
    cfg = ServerConfig.from_dict({**PRIVATE, "min_sites": 3})
    reg = Registry(tmp_path / "reg.db")
    run = reg.start_run("failed", cfg.to_dict(), seed=0)
    eng = RoundEngine(cfg, W0, registry=reg, run_id=run, log=lambda _: None)
    eng.begin_round(1, [1, 2, 3], total_sites=3)
    eng.fold(SiteReply(1, arrays=[np.ones_like(w) for w in W0], num_examples=1))
    eng.fold(SiteReply(2, error="site refused"))
    out = eng.close_round()
    eng.commit_round(out)
    assert out.status == "failed" and out.epsilon is not None and out.epsilon > 0
    assert eng.accountant is not None and eng.accountant.rounds == 1
    assert [(p["round"], p["steps"]) for p in reg.privacy(run) if p["level"] == "client"] == [(1, 1)]
    assert [r["status"] for r in reg.rounds(run)] == ["failed"]


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_resumed_private_run_draws_fresh_noise(
    tmp_path: Path, init_model: Path, task_identity: None, reproducible: bool
) -> None:
    """Two resumptions of one interrupted run: fresh noise each (private), or bit-identical (reproducible)."""
    cfg = ServerConfig.from_dict({**PRIVATE, "rounds": 2, "reproducible_noise": reproducible})
    ok = toy_client(lambda n, r: "ok")
    serve(tmp_path / "full", cfg, init_model, LocalGrid(ok, NODES))
    serve(tmp_path / "a", cfg.with_updates(rounds=1), init_model, LocalGrid(ok, NODES))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for copy in ("a", "b"):
        serve(tmp_path / copy, cfg, init_model, LocalGrid(ok, NODES), resume=True)
    full, a, b = (load_round_checkpoint(tmp_path / d / "checkpoints" / "round_2")[0] for d in ("full", "a", "b"))
    same_ab = all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    same_full = all(x.tobytes() == y.tobytes() for x, y in zip(a, full, strict=True))
    assert same_ab == same_full == reproducible
    if not reproducible:  # the resumed round 2 differs by noise of std σ·C/2 per coordinate, not by rounding
        diff = np.concatenate([(x - y).reshape(-1) for x, y in zip(a, b, strict=True)])
        assert float(np.std(diff)) == pytest.approx(np.sqrt(2) * 0.5 * 1.0 / 2, rel=0.1)

"""``flwr run`` on the simulation engine: each partition id maps to a site (the run config's ``sites`` list,
else a synthetic site generated once, safely when several node processes start together)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app, resolve_endpoint, simulated_endpoint, synthetic_site
from federation.protocol import CONFIG, QUERY_KEY, SITE_NAME_KEY

SMALL = {"synthetic-studies": 1, "synthetic-matrix": 32, "synthetic-z-extent-mm": 60.0, "synthetic-seed": 5}


def context(partition_id: int, run_config: dict[str, object]) -> Context:
    node = {"partition-id": partition_id, "num-partitions": 3}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def test_sites_list_maps_partitions_relative_to_the_app(tmp_path: Path) -> None:
    rc = {"sites": " data/a , /abs/b ", "run-dir": "out", "init-model": "m"}
    a, b = (simulated_endpoint(rc, i, tmp_path) for i in (0, 1))
    assert (a.site_dir, b.site_dir) == (tmp_path / "data/a", Path("/abs/b"))
    assert a.model_dir == tmp_path / "m" and a.state_dir == tmp_path / "out/state/partition-0"
    with pytest.raises(KeyError, match="'sites' lists 2 site\\(s\\), none for partition-id 2"):
        simulated_endpoint(rc, 2, tmp_path)


def test_synthetic_sites_cycle_cohorts_and_are_generated_once(tmp_path: Path) -> None:
    rc = {**SMALL, "run-dir": str(tmp_path / "run")}
    first = resolve_endpoint(context(1, rc))
    cfg = first.client_config()
    assert cfg.name == "sim-1-referral" and cfg.cohort == "referral"
    assert first.site_dir.parent == tmp_path / "run/synthetic_sites"
    stamp = (first.site_dir / "site.toml").stat().st_mtime_ns
    assert resolve_endpoint(context(1, rc)) == first  # reused, not generated again
    assert (first.site_dir / "site.toml").stat().st_mtime_ns == stamp
    other = simulated_endpoint({**rc, "synthetic-seed": 6}, 1, tmp_path)  # other settings: another folder
    assert other.site_dir != first.site_dir and other.client_config().cohort == "referral"
    assert simulated_endpoint(rc, 3, tmp_path).client_config().cohort == "screening"


def _generate(args: tuple[str, int]) -> str:
    return str(synthetic_site(SMALL, args[1], Path(args[0])))


def test_concurrent_processes_generate_one_site(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(3) as pool:  # fork: no re-import of torch per process
        paths = pool.map(_generate, [(str(tmp_path), 2)] * 3)
    assert len(set(paths)) == 1 and Path(paths[0]).name.startswith("sim-2-low_resource-")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([Path(paths[0]).name, f".{Path(paths[0]).name}.lock"])  # no temp folder left


def test_bad_synthetic_setting_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'synthetic-studies' must be int, got 'three'"):
        synthetic_site({"synthetic-studies": "three"}, 0, tmp_path)
    with pytest.raises(ValueError, match="synthetic-\\* settings: SynthConfig.matrix must be an integer >= 32"):
        synthetic_site({"synthetic-matrix": 8}, 0, tmp_path)


def test_a_node_without_a_site_answers_with_an_error(tmp_path: Path, task_identity: None) -> None:
    app = make_client_app()
    msg = Message(RecordDict({CONFIG: ConfigRecord({QUERY_KEY: SITE_NAME_KEY})}), 7, MessageType.QUERY)
    reply = app(msg, context(0, {"sites": str(tmp_path / "missing"), "run-dir": str(tmp_path / "run")}))
    assert reply.has_error()
    assert reply.error.reason == "site setup failed (FileNotFoundError; see the node's log)"

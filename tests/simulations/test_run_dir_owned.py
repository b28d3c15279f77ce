"""A run directory held by another process is refused at once, before anything is written (exit code 3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungvl.cli import app
from lungvl_model.training.checkpoint import sha256_file
from server.run_lock import RunDirBusy, RunDirLock
from simulations.scenario import Scenario
from simulations.simulate import run_simulation

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"
STUDY = ROOT / "simulations" / "studies" / "screening_vs_referral_small.toml"


def files(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (sha256_file(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def held(tmp_path: Path) -> tuple[Path, RunDirLock]:
    """A run directory with a previous run's files, held by "another" lungvl process (this one)."""
    run_dir = tmp_path / "a [b]"  # rich markup in the path must come out as it is
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"run_id": 1}')
    (run_dir / "config.json").write_text("{}")
    lock = RunDirLock(run_dir, what="lungvl simulate tiny").acquire()
    yield run_dir, lock
    lock.release()


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", str(TINY), "--out", "{dir}"],
        ["simulate", str(TINY), "--out", "{dir}", "--resume"],
        ["study", "run", str(STUDY), "--out", "{dir}"],
    ],
)
def test_a_held_run_directory_is_refused_with_exit_code_3(held: tuple[Path, RunDirLock], argv: list[str]) -> None:
    run_dir, lock = held
    before = files(run_dir)
    res = CliRunner().invoke(app, [a.replace("{dir}", str(run_dir)) for a in argv])
    assert res.exit_code == 3, res.output
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in res.output
    assert f"{run_dir} is in use by PID {os.getpid()}" in line and "(lungvl simulate tiny, command:" in line
    assert f"since {lock.note['since']}" in line
    assert files(run_dir) == before  # nothing written, the holder's note untouched


def test_run_simulation_into_a_held_directory_raises_before_writing(held: tuple[Path, RunDirLock]) -> None:
    run_dir, _ = held
    before = files(run_dir)
    with pytest.raises(RunDirBusy) as busy:
        run_simulation(Scenario.from_toml(TINY), run_dir, resume=True, progress=lambda _: None)
    assert busy.value.run_dir == run_dir and busy.value.holder["pid"] == os.getpid()
    assert files(run_dir) == before

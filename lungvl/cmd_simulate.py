"""``lungvl simulate``: a scenario as a Flower simulation (one simulated site per ``[[sites]]`` entry)."""

from __future__ import annotations

from pathlib import Path

import typer

from lungvl.console import err, print_error
from lungvl.errors import naming


def simulate(
    scenario: Path = typer.Argument(..., exists=True, dir_okay=False, help="scenario TOML (simulations/scenarios/)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory (outputs, checkpoints, registry.db)"),
    db: str | None = typer.Option(None, "--db", help="registry SQLAlchemy URL (default RUN_DIR/registry.db)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in RUN_DIR from its last completed round"),
    local_only: bool = typer.Option(
        False, "--local-only", help="baseline: every site trains alone for the same rounds (no federation)"
    ),
    init: Path | None = typer.Option(
        None,
        "--init",
        file_okay=False,
        help="model package the federation starts from (a lungvl checkpoint directory, e.g. models/lungvl-tiny-v1, "
        "to fine-tune) instead of a fresh model built from the scenario's [model]",
    ),
    reproducible_noise: bool = typer.Option(
        False,
        "--reproducible-noise",
        help="research only, NOT PRIVATE: seed the client-level noise and site sample from the run's seed "
        "(bit-exact reruns and resumes); pass it again with --resume",
    ),
) -> None:
    """Run a federated simulation; one line per round on stdout, outputs and summary.md in --out.

    Exit codes: 0 finished, or stopped at the privacy budget; 1 the run failed; 2 it cannot start or resume
    as asked (the message says why); 3 another process holds --out.
    """
    from server.app import ResumeRefused
    from server.run_lock import RunDirBusy
    from simulations.scenario import Scenario
    from simulations.simulate import run_simulation

    try:
        spec = Scenario.from_toml(scenario)
    except (KeyError, ValueError) as e:
        print_error(e.args[0] if e.args else e)
        raise typer.Exit(2) from e
    if init is not None and not (init / "model.pt").is_file():
        print_error(f"--init {init}: no model.pt there (give a lungvl checkpoint directory)")
        raise typer.Exit(2)
    if local_only:
        if reproducible_noise:
            print_error("--reproducible-noise applies to federated runs; --local-only adds no server noise")
            raise typer.Exit(2)
        if resume:
            print_error("--local-only runs cannot be resumed; start it again in a new --out directory")
            raise typer.Exit(2)
        from simulations.local_only import run_local_only

        with naming(out_dir):
            run_local_only(spec, out_dir, db_url=db, init_model=init, progress=lambda line: print(line, flush=True))
        return
    try:
        with naming(out_dir):  # a full disk names the run directory (lungvl.errors: exit 4)
            result = run_simulation(
                spec,
                out_dir,
                db_url=db,
                resume=resume,
                init_model=init,
                progress=lambda line: print(line, flush=True),
                reproducible_noise=reproducible_noise,
            )
    except RunDirBusy as e:
        print_error(e)
        raise typer.Exit(3) from e
    except (FileExistsError, FileNotFoundError, ResumeRefused) as e:  # CheckpointMismatch too: names the file
        print_error(e)
        raise typer.Exit(2) from e
    err.print((Path(result["out_dir"]) / "summary.md").read_text(), highlight=False, markup=False)
    if result["status"] not in ("finished", "stopped_budget"):
        raise typer.Exit(1)

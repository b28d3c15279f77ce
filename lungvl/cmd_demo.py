"""``lungvl demo``: the README's main job."""

from __future__ import annotations

from pathlib import Path

import typer

from lungvl.console import err, progress_callback


def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", help="output directory"),
    studies: int = typer.Option(4, "--studies", min=1, help="studies per synthetic site"),
    matrix: int = typer.Option(128, "--matrix", min=32, help="in-plane matrix of the synthetic CT"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Synthesise one site per cohort, check them, and summarise the cohorts (see README)."""
    from simulations.demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=out_dir, studies_per_site=studies, matrix=matrix, seed=seed)
    with progress_callback("studies") as cb:
        run_demo(cfg, log=lambda m: err.print(m, highlight=False, markup=False), progress=cb)
    err.print((out_dir / "summary.md").read_text(), highlight=False, markup=False)

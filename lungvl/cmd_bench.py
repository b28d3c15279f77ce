"""``lungvl bench``: speed and memory as ratios against a peer measured in the same run (DESIGN.md section 6).

``lungvl bench train`` compares LungVL's local training step with MONAI DynUNet at the same input
size. Further sub-commands (e.g. ``bench aggregate``) register on the same ``app``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from lungvl.console import err, out

app = typer.Typer(help="Benchmarks reported as ratios against a peer measured in the same run.", no_args_is_help=True)


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats by None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _ratio(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}x"


@app.command("train")
def train(
    preset: str = typer.Option("tiny", "--preset", help="LungVL preset: tiny | base"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    steps: int = typer.Option(5, "--steps", min=1, help="timed steps (median reported)"),
    warmup: int = typer.Option(2, "--warmup", min=0, help="untimed steps first"),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    input_size: tuple[int, int, int] | None = typer.Option(
        None, "--input-size", help="D H W (multiples of 16); default: the preset's input size"
    ),
    stage: str = typer.Option("vl", "--stage", help="seg: like-for-like step only | vl: also the full VL step"),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast on CUDA"),
    out_dir: Path | None = typer.Option(None, "--out", help="write bench_train.json and bench_train.md here"),
) -> None:
    """Time a training step of LungVL and of the MONAI DynUNet peer at the same input size."""
    from lungvl_model.benchmarks import PEER_NAME, bench_train

    try:
        result = bench_train(
            preset,
            device=device,
            steps=steps,
            warmup=warmup,
            batch_size=batch_size,
            stage=stage,
            bf16=bf16,
            input_size=input_size,
            log=lambda m: err.print(m, highlight=False, markup=False),
        )
    except (ValueError, KeyError) as e:
        err.print(f"[red]{escape(str(e))}")
        raise typer.Exit(2) from e
    except RuntimeError as e:
        err.print(f"[red]{escape(str(e))}")
        raise typer.Exit(1) from e
    m = result.meta
    size = "x".join(str(s) for s in m["input_size"])
    t = Table(
        title=f"training step, preset {m['preset']}, {m['batch_size']} x {size} on {m['device']} ({m['device_name']})",
        caption=(
            f"x = ratio to {PEER_NAME} measured in the same run; median of {m['steps']} steps after "
            f"{m['warmup']} warm-up; bf16 {m['bf16_active']}; LungVL checkpointing {m['gradient_checkpointing']}; "
            f"memory: {result.rows[0].mem_kind}"
        ),
    )
    t.add_column("model", no_wrap=True)
    for col in ("params", "step s", "vol/s", "peak MiB", "time x", "mem x"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in result.rows:
        if r.error:
            t.add_row(r.name, "-", "[red]failed", "-", "-", "-", "-")
            continue
        t.add_row(
            r.name,
            f"{r.params / 1e6:.2f}M",
            f"{r.step_s:.3f}",
            f"{r.volumes_per_s:.3f}",
            f"{r.peak_mem_mb:.0f}",
            _ratio(result.ratio(r.name, "time")),
            _ratio(result.ratio(r.name, "memory")),
        )
    out.print(t)
    for r in result.rows:
        if r.error:
            err.print(f"[red]{escape(r.name)}: {escape(r.error)}", highlight=False)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_train.json").write_text(json.dumps(_finite(result.to_dict()), indent=2) + "\n")
        (out_dir / "bench_train.md").write_text(result.to_markdown())
        err.print(f"wrote {out_dir / 'bench_train.json'} and {out_dir / 'bench_train.md'}", highlight=False)
    if m.get("failed"):
        raise typer.Exit(1)

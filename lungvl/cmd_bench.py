"""``lungvl bench``: speed and memory as ratios against a peer measured in the same run (DESIGN.md section 6).

``lungvl bench train`` compares LungVL's local training step with MONAI DynUNet at the same input
size; ``lungvl bench aggregate`` compares lungvl's DP-FedAvgM aggregation (batch and streaming) with
Flower's FedAvgM on the same updates (``server/bench_aggregate.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from lungvl.console import err, out, print_error
from lungvl.params import BENCH_STAGES, DEVICE, PRESETS, choice

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
    preset: str = typer.Option("tiny", "--preset", click_type=choice(PRESETS), help="LungVL preset"),
    device: str = typer.Option("auto", "--device", click_type=DEVICE, help="auto: CUDA when available"),
    steps: int = typer.Option(5, "--steps", min=1, help="timed steps (median reported)"),
    warmup: int = typer.Option(2, "--warmup", min=0, help="untimed steps first"),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    input_size: tuple[int, int, int] | None = typer.Option(
        None, "--input-size", help="D H W (multiples of 16); default: the preset's input size"
    ),
    stage: str = typer.Option(
        "vl",
        "--stage",
        click_type=choice(BENCH_STAGES),
        help="seg: like-for-like step only; vl: also the full VL step; fine: the native-resolution detector "
        "on its training patch",
    ),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast on CUDA"),
    dp: bool = typer.Option(
        False, "--dp", help="instead: the DP-SGD step (Opacus hooks, ghost clipping) against the non-DP step"
    ),
    out_dir: Path | None = typer.Option(None, "--out", help="write bench_train.json and bench_train.md here"),
) -> None:
    """Time a training step of LungVL and of the MONAI DynUNet peer at the same input size.

    With --dp: LungVL's DP-SGD step (Opacus per-study gradients by hooks, and by ghost clipping) against
    its own non-DP step, same model, batch and run (a --batch-size below 2 becomes 4 there: Opacus needs
    a batch to tell per-study gradients apart).

    Exit codes: 0 measured; 1 a model's step failed (e.g. out of memory: the others are still reported;
    with --dp, when every mode failed).
    """
    if dp:
        _bench_dp(preset, device, steps, warmup, batch_size, stage, input_size, out_dir)
        return
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
        print_error(e)
        raise typer.Exit(2) from e
    except RuntimeError as e:
        print_error(e)
        raise typer.Exit(1) from e
    m = result.meta
    size = "x".join(str(s) for s in m["input_size"])
    t = Table(
        title=escape(
            f"training step, preset {m['preset']}, {m['batch_size']} x {size} on {m['device']} ({m['device_name']})"
        ),
        caption=escape(
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
            t.add_row(escape(r.name), "-", "[red]failed", "-", "-", "-", "-")
            continue
        t.add_row(
            escape(r.name),
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
            print_error(f"{r.name}: {r.error}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_train.json").write_text(json.dumps(_finite(result.to_dict()), indent=2) + "\n")
        (out_dir / "bench_train.md").write_text(result.to_markdown())
        err.print(f"wrote {out_dir / 'bench_train.json'} and {out_dir / 'bench_train.md'}", markup=False)
    if m.get("failed"):
        raise typer.Exit(1)


def _bench_dp(
    preset: str,
    device: str,
    steps: int,
    warmup: int,
    batch_size: int,
    stage: str,
    input_size: tuple[int, int, int] | None,
    out_dir: Path | None,
) -> None:
    """``lungvl bench train --dp``: privacy.bench_dp_sgd, printed as a table of ratios to the non-DP step."""
    from privacy.bench_dp_sgd import bench_dp_sgd

    try:
        result = bench_dp_sgd(
            preset,
            stage=stage,
            device=device,
            steps=steps,
            warmup=warmup,
            batch_size=batch_size if batch_size >= 2 else 4,
            input_size=input_size,
            log=lambda m: err.print(m, highlight=False, markup=False),
        )
    except (ValueError, KeyError) as e:
        print_error(e)
        raise typer.Exit(2) from e
    m = result.meta
    t = Table(
        title=escape(
            f"DP-SGD step vs the non-DP step, preset {m['preset']}, stage {m['stage']}, batch {m['batch_size']} "
            f"on {m['device']} ({m['device_name']})"
        ),
        caption=escape(
            f"x = ratio to the non-DP step measured in the same run; σ {m['sigma']}, C {m['clip']}; "
            f"median of {m['steps']} steps after {m['warmup']} warm-up; memory: {result.rows[0].mem_kind}"
        ),
    )
    for col in ("mode", "step s", "peak MiB", "time x", "mem x"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for r in result.rows:
        if r.error:
            t.add_row(escape(r.mode), "failed", "-", "-", "-")
            continue
        t.add_row(
            escape(r.mode),
            f"{r.step_s:.3f}",
            f"{r.peak_mem_mb:.0f}",
            _ratio(result.ratio(r.mode, "time")),
            _ratio(result.ratio(r.mode, "memory")),
        )
    out.print(t)
    for r in result.rows:
        if r.error:
            err.print(f"{r.mode}: {r.error}", style="red", highlight=False, markup=False)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_dp_sgd.json").write_text(json.dumps(_finite(result.to_dict()), indent=2) + "\n")
        (out_dir / "bench_dp_sgd.md").write_text(result.to_markdown())
        err.print(f"wrote {out_dir / 'bench_dp_sgd.json'} and {out_dir / 'bench_dp_sgd.md'}", markup=False)
    if m["failed"] == [r.mode for r in result.rows]:
        raise typer.Exit(1)


def _number_lists(args: list[str], defaults: dict[str, list[int]]) -> dict[str, list[int]]:
    """Parse ``--sites 10 50 --params 1e6 1e7`` (several values after one flag) out of the extra args.

    Raises:
        typer.BadParameter: an unknown option, a flag without values, or a value that is not a positive integer.
    """
    got: dict[str, list[int]] = {}
    flag: str | None = None
    for tok in args:
        if tok.startswith("--"):
            flag, _, inline = tok.partition("=")
            if flag not in defaults:
                raise typer.BadParameter(f"no such option {tok!r} (several values: {', '.join(defaults)})")
            got[flag] = []
            tok = inline
            if not tok:
                continue
        if flag is None:
            raise typer.BadParameter(f"unexpected argument {tok!r}")
        for part in filter(None, tok.split(",")):
            try:
                value = float(part)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value >= 1 and value == int(value)):
                raise typer.BadParameter(f"{flag} takes positive integers (1e6 is fine), got {part!r}")
            got[flag].append(int(value))
    for name, values in got.items():
        if not values:
            raise typer.BadParameter(f"{name} needs at least one value")
    return {k: got.get(k, v) for k, v in defaults.items()}


@app.command("aggregate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def aggregate(
    ctx: typer.Context,
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed runs per method (median reported)"),
    dp: bool | None = typer.Option(
        None, "--dp/--no-dp", help="lungvl only with / without client-level DP (default: both)"
    ),
    layers: int = typer.Option(20, "--layers", min=1, help="arrays the parameters are split into"),
    server_lr: float = typer.Option(1.0, "--server-lr", help="η, for lungvl and FedAvgM alike"),
    server_momentum: float = typer.Option(0.9, "--server-momentum", help="β, for lungvl and FedAvgM alike"),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="C with DP; update norms are drawn around it"),
    noise_multiplier: float = typer.Option(1.0, "--noise-multiplier", help="σ with DP"),
    seed: int = typer.Option(0, "--seed"),
    out_dir: Path | None = typer.Option(None, "--out", help="write bench_aggregate.{json,csv,png} + config.json"),
) -> None:
    """Time and memory of lungvl's DP-FedAvgM aggregation next to Flower's FedAvgM on the same updates.

    --sites N [N ...] and --params P [P ...] take several values each, every combination is measured
    (default: --sites 10 50 --params 1e6 1e7).
    """
    from server.bench_aggregate import HELD, PEER, AggBenchConfig, bench_aggregate, machine_info, write_results

    try:
        lists = _number_lists(list(ctx.args), {"--sites": [10, 50], "--params": [1_000_000, 10_000_000]})
        cfg = AggBenchConfig(
            sites=tuple(lists["--sites"]), params=tuple(lists["--params"]), repeats=repeats,
            dp=(False, True) if dp is None else (dp,), layers=layers, server_lr=server_lr,
            server_momentum=server_momentum, clip_norm=clip_norm, noise_multiplier=noise_multiplier, seed=seed,
        )  # fmt: skip
    except (typer.BadParameter, ValueError) as e:
        print_error(e)
        raise typer.Exit(2) from e
    rows = bench_aggregate(cfg, log=lambda m: err.print(m, highlight=False, markup=False))
    meta = machine_info()
    t = Table(
        title=escape(f"aggregation of one round: lungvl vs {PEER} (flwr {meta['flwr']}), same updates, same run"),
        caption=escape(
            f"x = lungvl / {PEER} measured in the same run. time: median of {cfg.repeats}, aggregation only "
            f"(inputs built outside). memory (tracemalloc): peak = allocated beyond the inputs; total = held + peak. "
            f"β={cfg.server_momentum}, η={cfg.server_lr}; dp: clip C={cfg.clip_norm}, σ={cfg.noise_multiplier}. "
            f"max|Δw| = largest difference of w_t+1 from {PEER} (no DP). held: "
            + "; ".join(f"{k}: {v}" for k, v in HELD.items())
            + f". machine: {meta['cpus']} CPUs, OMP_NUM_THREADS={meta['omp_num_threads']}, numpy {meta['numpy']}"
        ),
    )
    t.add_column("sites x params", no_wrap=True)
    t.add_column("method", no_wrap=True)
    t.add_column("dp")
    for col in ("time s", "time x", "held MiB", "peak MiB", "total MiB", "mem x", "max|Δw|"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        head = [f"{r.sites} x {r.params:.0e}", r.method, {None: "-", False: "off", True: "on"}[r.dp]]
        if r.note:
            t.add_row(*head, f"[yellow]{escape(r.note)}", *["-"] * 6)
            continue
        t.add_row(
            *head, f"{r.time_s:.3f}", _ratio(r.time_ratio), f"{r.held_mib:.1f}", f"{r.peak_mib:.1f}",
            f"{r.total_mib:.1f}", _ratio(r.mem_ratio), "-" if r.max_diff is None else f"{r.max_diff:.1e}",
        )  # fmt: skip
    out.print(t)
    if out_dir is not None:
        paths = write_results(out_dir, cfg, rows, meta)
        err.print("wrote " + ", ".join(str(p) for p in paths), highlight=False, markup=False)

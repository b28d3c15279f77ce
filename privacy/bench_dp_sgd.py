"""What DP-SGD costs a site: the DP-SGD training step against the non-DP step of the same model, same run.

:func:`bench_dp_sgd` measures one optimisation step of the LungVL model on one synthetic batch
(:func:`~lungvl_model.benchmarks.train_bench.synthetic_batch`) four ways, each in a fresh ``spawn``
child process (so peak memory belongs to one mode; the frozen set all modes share is found first, by an
Opacus pass in a process of its own):

* ``non-DP`` (the peer): ``loss.backward()`` + AdamW, the model prepared exactly as for DP-SGD
  (:func:`~privacy.dp_sgd.dp_sgd_ready`: InfoNCE off, the same parameters frozen), so the ratio isolates
  the price of per-study clipping and noise;
* ``DP-SGD hooks``: Opacus ``GradSampleModule`` (per-study gradients materialised for every parameter)
  + ``DPOptimizer`` — what :func:`~privacy.dp_sgd_train.dp_sgd_steps` runs with ``clipping="hooks"``;
* ``DP-SGD ghost``: Opacus fast gradient clipping (``GradSampleModuleFastGradientClipping`` with ghost
  clipping where Opacus has it): per-study gradient *norms* from a first backward of the per-study
  losses, then a second backward of the clipped-weighted sum; it needs the per-study loss vector
  ``LungVLOutput.study_losses`` (B,), which exists because every loss term is per study;
* ``DP-SGD microbatch``: :class:`~privacy.dp_sgd_microbatch.MicrobatchDPSGD`, what
  ``dp_sgd_steps(clipping="microbatch")`` runs: each study forwarded and backwarded alone (a batch of
  one), its gradient clipped and added to a float32 sum, noise, ÷ the batch. Here it trains the same
  parameters as the other modes (the frozen set is shared for fairness); in ``dp_sgd_steps`` it also
  trains the parameters Opacus' hooks cannot give a per-study gradient (only the stage's unused ones
  stay frozen).

Figures are ratios to ``non-DP`` (DESIGN.md section 6); no test asserts on them.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

import torch

from lungvl_model.benchmarks.train_bench import (
    SYNTH_REPORTS,
    current_rss,
    device_name,
    peak_rss,
    synthetic_batch,
)
from lungvl_model.models.config import LungVLConfig, get_preset
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.text.tokenizer import train_tokenizer
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import build_optimizer, resolve_device, to_device
from privacy.dp_sgd import dp_sgd_ready, per_sample_parameters, reset_opacus_state
from privacy.dp_sgd_microbatch import MicrobatchDPSGD

__all__ = ["MODES", "PEER_MODE", "DPBenchResult", "DPBenchRow", "bench_dp_sgd"]

PEER_MODE: Final = "non-DP"
MODES: Final = (PEER_MODE, "DP-SGD hooks", "DP-SGD ghost", "DP-SGD microbatch")
_STAGES: Final = ("ssl", "seg", "vl")
_MB: Final = float(2**20)


@dataclass(frozen=True)
class DPBenchRow:
    """One mode's training step.

    Attributes:
        mode: one of :data:`MODES`.
        step_s: median seconds per step.
        peak_mem_mb: memory beyond the batch (CUDA: max allocated; CPU: peak RSS growth), MiB.
        mem_kind: how memory was measured.
        params_trained: parameters that received a gradient.
        error: why the mode failed (figures NaN), else None.
    """

    mode: str
    step_s: float
    peak_mem_mb: float
    mem_kind: str
    params_trained: int = 0
    error: str | None = None


@dataclass
class DPBenchResult:
    """Rows (the peer first) and their ratios to the peer.

    Attributes:
        rows: one per mode.
        meta: preset, stage, device, device name, input size, batch size, steps, warm-up, σ, C, threads.
    """

    rows: list[DPBenchRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def ratio(self, mode: str, kind: str) -> float:
        """``mode`` over the non-DP step for ``kind`` ``"time"`` or ``"memory"`` (NaN when either failed)."""
        by = {r.mode: r for r in self.rows}
        if mode not in by or PEER_MODE not in by:
            return math.nan
        attr = "step_s" if kind == "time" else "peak_mem_mb"
        peer, row = getattr(by[PEER_MODE], attr), getattr(by[mode], attr)
        return row / peer if peer > 0 and math.isfinite(row) else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``bench_dp_sgd.json``)."""
        ratios = {f"{r.mode}/{k}": self.ratio(r.mode, k) for r in self.rows for k in ("time", "memory")}
        return {"meta": dict(self.meta), "rows": [asdict(r) for r in self.rows], "ratios": ratios}

    def to_markdown(self) -> str:
        """Markdown report (``bench_dp_sgd.md``)."""
        m = self.meta
        lines = [
            f"## DP-SGD training step vs the non-DP step: preset {m.get('preset')}, stage {m.get('stage')}",
            "",
            f"- device: {m.get('device')} ({m.get('device_name')}), {m.get('threads')} CPU threads; batch "
            f"{m.get('batch_size')} x {'x'.join(map(str, m.get('input_size', ())))}; σ {m.get('sigma')}, "
            f"C {m.get('clip')}; median of {m.get('steps')} steps after {m.get('warmup')} warm-up, "
            "one process per mode",
            "",
            "| mode | step (s) | peak memory (MiB) | time x non-DP | memory x non-DP | trained params |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            if r.error:
                lines.append(f"| {r.mode} | failed: {r.error.replace('|', '/')} | - | - | - | - |")
                continue
            lines.append(
                f"| {r.mode} | {r.step_s:.3f} | {r.peak_mem_mb:.1f} | {self.ratio(r.mode, 'time'):.2f}x "
                f"| {self.ratio(r.mode, 'memory'):.2f}x | {r.params_trained:,} |"
            )
        return "\n".join(lines) + "\n"


def _step_fn(mode: str, model: LungVLModel, batch: dict[str, Any], spec: dict[str, Any]) -> Callable[[], float]:
    """A closure running one optimisation step of ``mode``; returns the loss."""
    from opacus.grad_sample import (  # type: ignore[import-untyped]
        GradSampleModule,
        GradSampleModuleFastGradientClipping,
    )
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # type: ignore[import-untyped]
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # type: ignore[import-untyped]

    stage, b = spec["stage"], spec["batch_size"]
    base = build_optimizer(model, TrainConfig(stage=stage))
    dp = {"noise_multiplier": spec["sigma"], "max_grad_norm": spec["clip"], "expected_batch_size": b}
    if mode == PEER_MODE:

        def plain() -> float:
            base.zero_grad(set_to_none=True)
            loss = model(batch, stage=stage).loss
            loss.backward()
            base.step()
            return float(loss.detach())

        return plain
    if mode == "DP-SGD hooks":
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(base, loss_reduction="mean", **dp)

        def hooks() -> float:
            opt.zero_grad(set_to_none=True)
            reset_opacus_state(gsm)
            loss = gsm(batch, stage=stage).loss
            loss.backward()
            opt.step()
            return float(loss.detach())

        return hooks
    if mode == "DP-SGD microbatch":
        micro = MicrobatchDPSGD(
            [p for p in model.parameters() if p.requires_grad],
            base,
            noise_multiplier=spec["sigma"],
            max_grad_norm=spec["clip"],
            expected_batch_size=b,
            noise_generator=torch.Generator(device=batch["image"].device).manual_seed(spec["seed"]),
        )

        def microbatch() -> float:
            base.zero_grad(set_to_none=True)
            return micro.step(model, batch, stage=stage)["loss"]

        return microbatch
    ghost = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=spec["clip"], use_ghost_clipping=True
    )
    opt_fgc = DPOptimizerFastGradientClipping(base, loss_reduction="mean", **dp)

    def ghost_step() -> float:
        opt_fgc.zero_grad(set_to_none=True)
        out = ghost(batch, stage=stage)
        per_study = getattr(out, "study_losses", None)
        if per_study is None:
            raise RuntimeError("ghost clipping needs LungVLOutput.study_losses (the per-study loss vector)")
        DPTensorFastGradientClipping(ghost, opt_fgc, per_study, loss_reduction="mean").backward()
        opt_fgc.step()
        return float(per_study.detach().mean())

    return ghost_step


def _inputs(spec: dict[str, Any], device: torch.device) -> tuple[LungVLConfig, dict[str, Any], Any]:
    """The config, the synthetic batch (on ``device``) and the tokenizer of a measurement."""
    torch.manual_seed(spec["seed"])
    config = LungVLConfig.from_dict(spec["config"])
    batch = to_device(
        synthetic_batch(
            config.input.size,  # type: ignore[arg-type]
            spec["batch_size"],
            spacing_mm=config.input.spacing_mm,
            hu_window=config.input.hu_window,
            seed=spec["seed"],
        ),
        device,
    )
    return config, batch, train_tokenizer(list(SYNTH_REPORTS) * 4, vocab_size=config.text.vocab_size)


def _probe(spec: dict[str, Any]) -> list[str]:
    """The parameters every mode trains: those with a per-study hook gradient (child process).

    Its own process, so that no mode's peak memory includes this Opacus pass over the whole batch.
    """
    device = torch.device(spec["device"])
    config, batch, tokenizer = _inputs(spec, device)
    model = LungVLModel(config, tokenizer).to(device)
    model.train()
    with dp_sgd_ready(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        kept, _ = per_sample_parameters(model, batch, stage=spec["stage"])
    return sorted(kept)


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode in a fresh process: build, warm up, time the steps (child process)."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    config, batch, tokenizer = _inputs(spec, device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    else:
        mem0 = current_rss()
    model = LungVLModel(config, tokenizer).to(device)
    model.train()
    times: list[float] = []
    with dp_sgd_ready(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        kept = set(spec["kept"])  # the same frozen set in every mode (_probe)
        for name, p in model.named_parameters():
            p.requires_grad_(name in kept)
        step = _step_fn(spec["mode"], model, batch, spec)
        for i in range(spec["warmup"] + spec["steps"]):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = step()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{spec['mode']}: loss became {loss} at step {i + 1}")
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return {
        "row": {
            "mode": spec["mode"],
            "step_s": statistics.median(times),
            "peak_mem_mb": max(0, peak - mem0) / _MB,
            "mem_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss_growth",
            "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
    }


def _failure(e: BaseException) -> str:
    """``Type: first line`` of a failure of a measuring process (at most 200 characters of message)."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if isinstance(e, BrokenProcessPool):
        msg = f"measuring process died (killed for memory?): {msg}"
    return f"{type(e).__name__}: {msg}"


def bench_dp_sgd(
    preset: str = "tiny",
    *,
    stage: str = "seg",
    device: str = "auto",
    steps: int = 3,
    warmup: int = 1,
    batch_size: int = 4,
    sigma: float = 1.0,
    clip: float = 1.0,
    modes: tuple[str, ...] = MODES,
    input_size: tuple[int, int, int] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> DPBenchResult:
    """Time and measure the DP-SGD step (hooks, ghost clipping, microbatches) against the non-DP step.

    One process per mode.

    Args:
        preset: LungVL preset.
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        steps: timed steps (median reported).
        warmup: untimed steps first.
        batch_size: studies per step (>= 2: Opacus needs a batch to tell per-study gradients apart).
        sigma: DP-SGD noise multiplier.
        clip: per-study clip C.
        modes: which of :data:`MODES` to run (the peer is always run first).
        input_size: ``(D, H, W)`` (multiples of 16); the preset's by default.
        seed: weights and batch seed (the same in every mode).
        log: progress callback.

    Returns:
        The rows (a mode that fails has NaN figures and ``error`` set) and the run's settings.

    Raises:
        ValueError: a bad argument (named with its value).
    """
    if stage not in _STAGES:
        raise ValueError(f"bench_dp_sgd stage must be one of {_STAGES}, got {stage!r}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"bench_dp_sgd modes must be among {MODES}, got {unknown}")
    if steps < 1 or warmup < 0 or batch_size < 2 or not (sigma >= 0 and clip > 0):
        raise ValueError(
            "bench_dp_sgd needs steps >= 1, warmup >= 0, batch_size >= 2, sigma >= 0, clip > 0; got "
            f"{steps}, {warmup}, {batch_size}, {sigma}, {clip}"
        )
    config = get_preset(preset)
    size = tuple(int(s) for s in (input_size if input_size is not None else config.input.size or ()))
    if len(size) != 3 or any(s < 16 or s % 16 for s in size):
        raise ValueError(f"bench_dp_sgd input_size must be 3 positive multiples of 16 (D, H, W), got {size}")
    config = replace(config, input=replace(config.input, size=size))
    dev = resolve_device(device)
    spec = {"config": config.to_dict(), "device": str(dev), "steps": steps, "warmup": warmup, "stage": stage}
    spec |= {"batch_size": batch_size, "sigma": sigma, "clip": clip, "seed": seed}
    ctx = multiprocessing.get_context("spawn")
    rows: list[DPBenchRow] = []
    child: dict[str, Any] = {}
    probe_error: str | None = None
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            spec["kept"] = pool.submit(_probe, spec).result()
    except Exception as e:  # noqa: BLE001 - every mode then fails with this reason
        probe_error = f"frozen-set probe: {_failure(e)}"
    for mode in [PEER_MODE, *(m for m in modes if m != PEER_MODE)]:
        if log is not None:
            log(f"measuring {mode} ({stage}) on {dev} at {'x'.join(map(str, size))} ...")
        try:
            if probe_error is not None:
                raise RuntimeError(probe_error)
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                out = pool.submit(_measure, {**spec, "mode": mode}).result()
        except Exception as e:  # noqa: BLE001 - any failure of one mode is a failed row, not a failed run
            if log is not None:
                log(f"{mode} failed: {_failure(e)}")
            kind = "cuda_max_allocated" if dev.type == "cuda" else "cpu_peak_rss_growth"
            rows.append(DPBenchRow(mode, math.nan, math.nan, kind, error=_failure(e)))
            continue
        rows.append(DPBenchRow(**out["row"]))
        child = child or out
    meta = {
        "preset": preset,
        "stage": stage,
        "device": str(dev),
        "device_name": child.get("device_name") or device_name(dev),
        "threads": child.get("threads"),
        "torch": torch.__version__,
        "input_size": list(size),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "sigma": sigma,
        "clip": clip,
        "failed": [r.mode for r in rows if r.error],
    }
    with contextlib.suppress(ImportError):
        import opacus  # type: ignore[import-untyped]

        meta["opacus"] = opacus.__version__
    return DPBenchResult(rows=rows, meta=meta)

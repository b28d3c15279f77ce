"""Local training-step benchmark: LungVL against the MONAI DynUNet peer at the same input size.

:func:`bench_train` times one forward + backward + AdamW step of

* ``LungVL (seg)``: the LungVL model's ``stage="seg"`` step (encoder + segmentation head + Dice/boundary
  loss), the like-for-like comparison with the peer;
* ``LungVL (vl)``: the full end-to-end ``stage="vl"`` step (report decoder, contrastive, grounding and
  risk heads on top), when ``stage="vl"``;
* ``DynUNet``: :func:`~lungvl_model.models.peers.build_dynunet_peer` with ``filters=config.vision.channels``
  and the same :class:`~lungvl_model.losses.segmentation.SegmentationLoss` as LungVL's seg stage,
* with ``stage="fine"`` instead: ``LungVL (fine)``, the cascade's native-resolution detector
  (:class:`~lungvl_model.models.fine_detector.FineDetector`, its default config) on its training patch
  (``patch``³) with its training loss, against a DynUNet of the detector's widths
  with the same loss,

on one synthetic batch (a sphere nodule in a noisy chest phantom, HU-windowed to ``[0, 1]`` like the
real preprocessing). Each model runs in a fresh ``spawn`` child process doing exactly the same
sequence (imports, batch, memory baseline, build, warm-up, timed steps), so that peak memory is per
model and the ratios compare like with like. Speed and memory are reported as ratios
LungVL / DynUNet (DESIGN.md section 6); no test asserts on them.

Memory (``BenchRow.mem_kind``):

* ``"cuda_max_allocated"``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus what was allocated at the reset (the input batch): parameters, gradients, AdamW state,
  activations and workspace of the caching allocator's tensors.
* ``"cpu_peak_rss_growth"``: the child's peak resident set size (``resource.getrusage(...).ru_maxrss``)
  minus its current RSS just before the model is built (after every import and the batch). It
  covers the same things as on CUDA plus allocator overhead and any buffers the CPU kernels
  (oneDNN) keep; ``tracemalloc`` is not used because it does not see tensor storage.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from lungvl_model.losses.segmentation import SegmentationLoss
from lungvl_model.models.config import LungVLConfig, get_preset
from lungvl_model.models.fine_detector import FineDetector, FineDetectorConfig
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.models.peers import build_dynunet_peer
from lungvl_model.text.tokenizer import train_tokenizer
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import build_optimizer, resolve_device, to_device

__all__ = [
    "PEER_NAME",
    "SYNTH_REPORTS",
    "BenchResult",
    "BenchRow",
    "bench_train",
    "current_rss",
    "device_name",
    "peak_rss",
    "synthetic_batch",
]

PEER_NAME = "DynUNet"
_LUNGVL_NAME = "LungVL ({stage})"
_STAGES = ("seg", "vl", "fine")
_STRIDE = 16  # five scales: D, H, W must be divisible by 2**4
_MB = float(2**20)

#: Built-in report sentences: the tokenizer of the benchmark model is trained on these.
SYNTH_REPORTS: tuple[str, ...] = (
    "A 9 mm solid nodule in the right upper lobe with spiculated margins. Lung-RADS 4A.",
    "No pulmonary nodules. Mild centrilobular emphysema. Lung-RADS 1.",
    "A 5 mm ground-glass nodule in the left lower lobe. Lung-RADS 2.",
    "Part-solid nodule in the right lower lobe measuring 12 mm. Lung-RADS 4B.",
    "Calcified granuloma in the right middle lobe, benign. Lung-RADS 1.",
    "A 7 mm juxtapleural solid nodule in the left upper lobe, unchanged. Lung-RADS 3.",
)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRow:
    """One model's training step.

    Attributes:
        name: ``"LungVL (seg)"``, ``"LungVL (vl)"``, ``"LungVL (fine)"`` or ``"DynUNet"``.
        params: parameters of the whole model.
        step_s: median seconds of forward + backward + AdamW step over the timed steps.
        volumes_per_s: ``batch_size / step_s``.
        peak_mem_mb: peak memory of the step in MiB (see the module docstring for what it covers).
        mem_kind: ``"cuda_max_allocated"`` or ``"cpu_peak_rss_growth"``.
        params_trained: parameters that received a gradient in the step (LungVL's ``seg`` step
            leaves the report decoder and risk heads untouched).
        step_s_all: every timed step, in seconds.
        error: why the measurement failed (out of memory, process killed); the figures are then NaN
            and ``params`` is 0.
    """

    name: str
    params: int
    step_s: float
    volumes_per_s: float
    peak_mem_mb: float
    mem_kind: str
    params_trained: int = 0
    step_s_all: tuple[float, ...] = ()
    error: str | None = None


@dataclass
class BenchResult:
    """Rows of one benchmark run and their ratios against the peer.

    Attributes:
        rows: the peer first, then the LungVL rows.
        ratios: ``"<lungvl row key>/dynunet_time"`` and ``".../dynunet_memory"`` for every LungVL
            row (``lungvl_seg``, ``lungvl_vl``): LungVL divided by DynUNet, > 1 means LungVL is
            slower / needs more memory. NaN when either row failed or the peer's figure is not positive.
        meta: preset, device, device name, input size, batch size, steps, warm-up, bf16 (asked and
            active), gradient checkpointing, torch version, threads and ``failed`` (names of failed rows).
    """

    rows: list[BenchRow]
    ratios: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> BenchRow:
        """The row called ``name``; ``KeyError`` naming the rows present otherwise."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def ratio(self, name: str, kind: str) -> float:
        """Row ``name`` over the peer, ``kind`` ``"time"`` or ``"memory"`` (1.0 for the peer, NaN if absent)."""
        if name == PEER_NAME:
            return math.nan if self.row(PEER_NAME).error else 1.0
        return self.ratios.get(f"{_row_key(name)}/dynunet_{kind}", math.nan)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``bench_train.json``)."""
        return {"meta": dict(self.meta), "rows": [asdict(r) for r in self.rows], "ratios": dict(self.ratios)}

    def to_markdown(self) -> str:
        """Markdown report (``bench_train.md``): settings, one table of rows, one of ratios."""
        m = self.meta
        size = "x".join(str(s) for s in m.get("input_size", ()))
        lines = [
            f"## Training step: LungVL (preset {m.get('preset')}) vs MONAI {PEER_NAME}",
            "",
            f"- device: {m.get('device')} ({m.get('device_name')}), torch {m.get('torch')}, "
            f"{m.get('threads')} CPU threads",
            f"- input: batch {m.get('batch_size')} x 1 x {size} voxels; bf16 autocast: {m.get('bf16_active')}; "
            f"LungVL gradient checkpointing: {m.get('gradient_checkpointing')}",
            f"- median of {m.get('steps')} steps after {m.get('warmup')} warm-up, each model in a fresh process",
            "",
            "| model | params | trained params | step (s) | volumes/s | peak memory (MiB) | memory measured as |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            if r.error:
                lines.append(f"| {r.name} | - | - | failed: {r.error.replace('|', '/')} | - | - | {r.mem_kind} |")
                continue
            lines.append(
                f"| {r.name} | {r.params:,} | {r.params_trained:,} | {r.step_s:.3f} | {r.volumes_per_s:.3f} "
                f"| {r.peak_mem_mb:.1f} | {r.mem_kind} |"
            )
        lines += ["", f"| ratio vs {PEER_NAME} | step time | peak memory |", "|---|---:|---:|"]
        for r in self.rows:
            if r.name == PEER_NAME:
                continue
            lines.append(
                f"| {r.name} / {PEER_NAME} | {_fmt_ratio(self.ratio(r.name, 'time'))} "
                f"| {_fmt_ratio(self.ratio(r.name, 'memory'))} |"
            )
        return "\n".join(lines) + "\n"


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "-"


def _row_key(name: str) -> str:
    """``"LungVL (seg)"`` → ``"lungvl_seg"``."""
    return name.lower().replace(" (", "_").replace(")", "")


# --------------------------------------------------------------------------------------------------
# Synthetic input
# --------------------------------------------------------------------------------------------------
def synthetic_batch(
    size: tuple[int, int, int],
    batch_size: int = 1,
    *,
    spacing_mm: tuple[float, float, float] = (2.5, 2.5, 2.5),
    hu_window: tuple[float, float] = (-1000.0, 400.0),
    seed: int = 0,
) -> dict[str, Any]:
    """A collated batch of chest phantoms, each with one solid sphere nodule in the right upper lobe.

    Air (-1000 HU) around an elliptic body (40 HU) with two lungs (-850 HU), 25 HU Gaussian noise,
    windowed to ``[0, 1]`` with ``hu_window`` as :mod:`~lungvl_model.data.preprocess` does.

    Args:
        size: ``(D, H, W)``.
        batch_size: studies.
        spacing_mm: voxel size, used for the diameter written in the report and the targets.
        hu_window: HU range mapped to ``[0, 1]``.
        seed: noise seed.

    Returns:
        ``image``/``seg`` float and ``lobes`` long ``(B, 1, D, H, W)``, ``has_mask``/``has_lobes``
        ``(B,)``, ``text`` (B reports) and ``targets`` as in
        :func:`~lungvl_model.data.dataset.collate`.
    """
    d, h, w = size
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.linspace(-1.0, 1.0, n) for n in size], indexing="ij")
    body = (y / 0.75) ** 2 + (x / 0.9) ** 2 <= 1.0
    right = ((x + 0.42) / 0.33) ** 2 + (y / 0.55) ** 2 + (z / 0.95) ** 2 <= 1.0
    left = ((x - 0.42) / 0.33) ** 2 + (y / 0.55) ** 2 + (z / 0.95) ** 2 <= 1.0
    lobes = torch.zeros(size, dtype=torch.long)
    lobes[right & (z < -0.3)] = 1  # RUL (index 0 = cranial)
    lobes[right & (z >= -0.3) & (z < 0.2)] = 2  # RML
    lobes[right & (z >= 0.2)] = 3  # RLL
    lobes[left & (z < 0.0)] = 4  # LUL
    lobes[left & (z >= 0.0)] = 5  # LLL
    base = torch.full(size, -1000.0)
    base[body] = 40.0
    base[right | left] = -850.0
    radius = max(2.0, 0.06 * min(size))
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    images, segs, texts = [], [], []
    diameter_mm = 2 * radius * float(sum(spacing_mm)) / 3
    for i in range(batch_size):
        centre = (0.25 * d + (i % 3) * 0.03 * d, 0.5 * h, 0.29 * w)  # inside the RUL
        blob = sum((c - o) ** 2 for c, o in zip(grid, centre, strict=True)) <= radius**2
        hu = base.clone()
        hu[blob] = 30.0
        hu += 25.0 * torch.randn(size, generator=g)
        lo, hi = hu_window
        images.append(((hu - lo) / (hi - lo)).clamp(0.0, 1.0))
        segs.append(blob.float())
        texts.append(f"A {round(diameter_mm)} mm solid nodule in the right upper lobe. Lung-RADS 4A.")
    b = batch_size
    return {
        "image": torch.stack(images)[:, None],
        "seg": torch.stack(segs)[:, None],
        "lobes": lobes.expand(b, 1, d, h, w).clone(),
        "has_mask": torch.ones(b, dtype=torch.bool),
        "has_lobes": torch.ones(b, dtype=torch.bool),
        "text": texts,
        "targets": {
            "malignant": torch.tensor([float(i % 2) for i in range(b)]),
            "lung_rads": torch.full((b,), 3, dtype=torch.long),  # 4A
            "growth_mm": torch.zeros(b),
            "nodule_type": torch.zeros(b, dtype=torch.long),  # solid
            "spiculated": torch.zeros(b),
            "calcified": torch.zeros(b),
            "juxtapleural": torch.zeros(b),
            "roundness": torch.ones(b),
            "diameter_mm": torch.full((b,), diameter_mm),
        },
    }


# --------------------------------------------------------------------------------------------------
# Measurement (runs in a spawned child)
# --------------------------------------------------------------------------------------------------
def device_name(device: torch.device | str) -> str:
    """``torch.cuda.get_device_name`` on CUDA, else the CPU model from ``/proc/cpuinfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def current_rss() -> int:
    """Current resident set size in bytes (``/proc/self/statm``; the peak so far where unavailable)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one model, run warm-up + timed training steps, return the row's fields (child process)."""
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
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
    is_peer = spec["model"] == PEER_NAME
    fine = spec["stage"] == "fine"
    tokenizer = None if is_peer or fine else train_tokenizer(list(SYNTH_REPORTS) * 4, vocab_size=config.text.vocab_size)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    else:
        mem0 = current_rss()

    model: torch.nn.Module
    loss_fn: Callable[[], torch.Tensor]
    fine_cfg = FineDetectorConfig()
    if fine:  # the detector's training loss (fine_detector.DetectorTrainConfig defaults), for both rows
        seg_loss = SegmentationLoss(boundary_weight=0.0, pos_weight=3.0).to(device)
    else:
        seg_loss = SegmentationLoss(dice_weight=1.0, boundary_weight=0.05).to(device)  # as LungVLModel's
    if is_peer or fine:
        if is_peer:
            widths = fine_cfg.vision.channels if fine else config.vision.channels
            model = build_dynunet_peer(config.vision.in_channels, 1, widths).to(device)
        else:
            model = FineDetector(fine_cfg).to(device)
        net = model

        def loss_fn() -> torch.Tensor:
            return seg_loss(net(batch["image"]).float(), batch["seg"], batch["has_mask"])

        ckpt = False
    else:
        lungvl = LungVLModel(config, tokenizer).to(device)
        ckpt = bool(config.vision.gradient_checkpointing and cuda)
        lungvl.vision.gradient_checkpointing = ckpt
        model = lungvl

        def loss_fn() -> torch.Tensor:
            return lungvl(batch, stage=spec["stage"]).loss

    model.train()
    optimizer = build_optimizer(model, TrainConfig(stage="seg" if is_peer or fine else spec["stage"]))
    amp = bool(spec["bf16"] and cuda)
    times: list[float] = []
    for i in range(spec["warmup"] + spec["steps"]):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{spec['model']} loss became {float(loss.detach())} at step {i + 1}")
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    step_s = statistics.median(times)
    return {
        "row": {
            "name": spec["model"],
            "params": sum(p.numel() for p in model.parameters()),
            "step_s": step_s,
            "volumes_per_s": spec["batch_size"] / step_s,
            "peak_mem_mb": max(0, peak - mem0) / _MB,
            "mem_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss_growth",
            "params_trained": sum(p.numel() for p in model.parameters() if p.grad is not None),
            "step_s_all": tuple(times),
        },
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "bf16_active": amp,
        "gradient_checkpointing": ckpt,
    }


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _failed_row(name: str, error: str, device: torch.device) -> BenchRow:
    """A row for a model whose measurement failed (NaN figures, ``error`` set)."""
    kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
    return BenchRow(name, 0, math.nan, math.nan, math.nan, kind, error=error)


def _check_args(stage: str, steps: int, warmup: int, batch_size: int, size: tuple[int, ...]) -> None:
    if stage not in _STAGES:
        raise ValueError(f"bench_train stage must be one of {_STAGES}, got {stage!r}")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(
            f"bench_train needs steps >= 1, warmup >= 0, batch_size >= 1; got {steps}, {warmup}, {batch_size}"
        )
    if len(size) != 3 or any(s < _STRIDE or s % _STRIDE for s in size):
        raise ValueError(f"bench_train input_size must be 3 positive multiples of {_STRIDE} (D, H, W), got {size}")


def bench_train(
    preset: str,
    *,
    device: str = "auto",
    steps: int = 5,
    warmup: int = 2,
    batch_size: int = 1,
    stage: str = "vl",
    bf16: bool = True,
    input_size: tuple[int, int, int] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time and measure a training step of LungVL and of the DynUNet peer, each in a fresh process.

    A model whose measurement runs out of memory (or whose process is killed) does not abort the run:
    its row has NaN figures and ``error`` set, its ratios are NaN, and ``meta["failed"]`` names it.

    Args:
        preset: LungVL preset (``"tiny"``, ``"base"``); the peer gets ``filters=config.vision.channels``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        steps: timed steps (the median is reported).
        warmup: untimed steps before them.
        batch_size: volumes per step.
        stage: ``"seg"`` measures LungVL's segmentation step only (like for like with the peer);
            ``"vl"`` also measures the full end-to-end step as a second LungVL row; ``"fine"`` the
            native-resolution detector's step against a DynUNet of its widths on its patch.
        bf16: bf16 autocast on CUDA (ignored on CPU).
        input_size: ``(D, H, W)``, multiples of 16; defaults to the preset's ``config.input.size`` (``"fine"``:
            the detector's training patch).
        seed: seed of weights and synthetic batch (the same for every model).
        log: optional progress callback, called before each model.

    Returns:
        A :class:`BenchResult` with the rows ``DynUNet``, ``LungVL (seg)`` [, ``LungVL (vl)``] (``"fine"``:
        ``DynUNet``, ``LungVL (fine)``).

    Raises:
        ValueError: on an invalid argument (the offending value is named).
        KeyError: on an unknown preset.
    """
    config = get_preset(preset)
    default = (FineDetectorConfig().patch,) * 3 if stage == "fine" else config.input.size or ()
    size = tuple(int(s) for s in (input_size if input_size is not None else default))
    _check_args(stage, steps, warmup, batch_size, size)
    config = replace(config, input=replace(config.input, size=size))
    dev = resolve_device(device)
    spec = {
        "config": config.to_dict(),
        "device": str(dev),
        "steps": steps,
        "warmup": warmup,
        "batch_size": batch_size,
        "bf16": bf16,
        "seed": seed,
        "stage": "fine" if stage == "fine" else "seg",
    }
    runs = [{**spec, "model": PEER_NAME}, {**spec, "model": _LUNGVL_NAME.format(stage=spec["stage"])}]
    if stage == "vl":
        runs.append({**spec, "model": _LUNGVL_NAME.format(stage="vl"), "stage": "vl"})
    ctx = multiprocessing.get_context("spawn")
    rows: list[BenchRow] = []
    child: dict[str, Any] = {}
    for run in runs:
        if log is not None:
            log(f"measuring {run['model']} on {dev} at {'x'.join(map(str, size))} ...")
        # a fresh interpreter per model: peak RSS / CUDA allocator state belong to that model alone
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            try:
                out = pool.submit(_measure, run).result()
            except (BrokenProcessPool, RuntimeError, MemoryError) as e:  # OOM, killed child: a row that did not fit
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                if isinstance(e, BrokenProcessPool):
                    msg = f"measuring process died (killed for memory?): {msg}"
                if log is not None:
                    log(f"{run['model']} failed: {msg}")
                rows.append(_failed_row(run["model"], msg, dev))
                continue
        rows.append(BenchRow(**out["row"]))
        child = child or out
    peer = rows[0]
    ratios: dict[str, float] = {}
    for r in rows[1:]:
        key = _row_key(r.name)
        ratios[f"{key}/dynunet_time"] = r.step_s / peer.step_s if peer.step_s > 0 else math.nan
        ratios[f"{key}/dynunet_memory"] = r.peak_mem_mb / peer.peak_mem_mb if peer.peak_mem_mb > 0 else math.nan
    cuda = dev.type == "cuda"
    meta = {
        "preset": preset,
        "device": str(dev),
        # taken from a child so that the parent never creates a CUDA context of its own
        "device_name": child["device_name"] if child else device_name(dev),
        "torch": torch.__version__,
        "threads": child["threads"] if child else torch.get_num_threads(),
        "input_size": list(size),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "bf16": bf16,
        "bf16_active": bool(bf16 and cuda),
        "gradient_checkpointing": bool(config.vision.gradient_checkpointing and cuda),
        "stage": stage,
        "failed": [r.name for r in rows if r.error],
    }
    return BenchResult(rows=rows, ratios=ratios, meta=meta)

"""The framework-free training loop: the same function runs centrally and inside a site client.

:func:`run_steps` takes a ready model, loader and optimizer (so the site client can hand in an
Opacus-wrapped optimizer and Poisson-sampled loader) and runs a number of steps of one stage.
:func:`train_stage` builds the loader and AdamW + warm-up/cosine schedule and calls it.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lungvl_model.data.dataset import collate
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.training.config import TrainConfig

StepCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a stage run did.

    Attributes:
        stage: the stage.
        steps: optimisation steps run.
        examples: studies seen (with repeats).
        seconds: wall time.
        history: one dict of loss terms (+ ``loss``, ``lr``) per step.
        device: where it ran.
    """

    stage: str
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"

    def summary(self, last: int = 10) -> dict[str, float]:
        """Mean of each logged term over the first and the last ``last`` steps."""
        out: dict[str, float] = {"steps": float(self.steps), "examples": float(self.examples), "seconds": self.seconds}
        if not self.history:
            return out
        keys = sorted({k for h in self.history for k in h})
        for k in keys:
            head = [h[k] for h in self.history[:last] if k in h]
            tail = [h[k] for h in self.history[-last:] if k in h]
            out[f"first_{k}"] = float(np.mean(head)) if head else math.nan
            out[f"final_{k}"] = float(np.mean(tail)) if tail else math.nan
        return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; explicit CUDA without a GPU raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available here")
    return torch.device(name)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a (nested) batch to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


def make_loader(dataset: Dataset[Any], cfg: TrainConfig) -> DataLoader[Any]:
    """Shuffled loader with a seeded generator (reproducible order)."""
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=g,
        drop_last=len(dataset) > cfg.batch_size,  # type: ignore[arg-type]
    )


def cycle(loader: DataLoader[Any]) -> Iterator[dict[str, Any]]:
    """Endless iteration over a loader (reshuffled each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batch (empty dataset?)")


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10 % of the peak."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def run_steps(
    model: LungVLModel,
    batches: Iterator[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    *,
    stage: str,
    steps: int,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float = 0.0,
    bf16: bool = True,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Run ``steps`` optimisation steps of ``stage``.

    Args:
        model: the model (already on ``device``).
        batches: an iterator of collated batches (e.g. :func:`cycle` of a loader).
        optimizer: any optimizer (plain AdamW, or an Opacus ``DPOptimizer``).
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        steps: number of steps.
        device: where tensors go.
        scheduler: optional LR scheduler stepped after each optimizer step.
        grad_clip: global grad-norm clip (0 = off; leave 0 under DP-SGD).
        bf16: autocast to bf16 on CUDA.
        seed: seed of the SSL mask generator.
        on_step: ``on_step(step, steps, losses)`` after each step.

    Returns:
        The per-step history.
    """
    model.train()
    result = TrainResult(stage=stage, device=str(device))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    t0 = time.perf_counter()
    use_amp = bf16 and device.type == "cuda"
    for step in range(steps):
        batch = to_device(next(batches), device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with ctx:
            out = model(batch, stage=stage, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.float().backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        logged = dict(out.losses)
        logged["loss"] = float(out.loss.detach())
        logged["lr"] = float(optimizer.param_groups[0]["lr"])
        if not math.isfinite(logged["loss"]):
            raise FloatingPointError(f"{stage} loss became {logged['loss']} at step {step + 1}: {out.losses}")
        result.history.append(logged)
        result.steps += 1
        result.examples += int(batch["image"].shape[0])
        if on_step is not None:
            on_step(step + 1, steps, logged)
    result.seconds = time.perf_counter() - t0
    return result


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters (no weight decay on norms and biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


def train_stage(
    model: LungVLModel, dataset: Dataset[Any], cfg: TrainConfig, *, on_step: StepCallback | None = None
) -> TrainResult:
    """Train one image stage (``ssl``/``seg``/``vl``) centrally on ``dataset``.

    Args:
        model: the model (moved to the configured device).
        dataset: a :class:`~lungvl_model.data.dataset.SiteDataset` (or anything yielding its items).
        cfg: training settings.
        on_step: progress callback.

    Returns:
        The run's history.
    """
    if cfg.stage == "text":
        raise ValueError("stage 'text' is the report warm-up; use lungvl_model.training.stages.run_stage")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"no usable studies to train stage {cfg.stage!r} on")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    model.vision.gradient_checkpointing = cfg.gradient_checkpointing and device.type == "cuda"
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return run_steps(
        model,
        cycle(make_loader(dataset, cfg)),
        optimizer,
        stage=cfg.stage,
        steps=cfg.max_steps,
        device=device,
        scheduler=scheduler,
        grad_clip=cfg.grad_clip,
        bf16=cfg.bf16,
        seed=cfg.seed,
        on_step=on_step,
    )

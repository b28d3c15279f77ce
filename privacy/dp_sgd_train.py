"""Local DP-SGD steps of the LungVL model with Opacus (the wiring; the model plumbing is :mod:`privacy.dp_sgd`).

:func:`dp_sgd_steps` runs ``steps`` DP-SGD steps: Poisson sampling at rate ``q``, per-study gradients
clipped to ``max_grad_norm``, Gaussian noise ``N(0, (σ·C)²)`` on their sum, division by the expected
batch. The noise and the sample come from OS entropy (:mod:`secrets`), never from a seed the server
knows. Which parameters have a correct per-study gradient is decided once per stage by
:func:`~privacy.dp_sgd.per_sample_parameters`; the others are frozen for the steps.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any, cast

import torch
from opacus.grad_sample import GradSampleModule  # type: ignore[import-untyped]
from opacus.optimizers import DPOptimizer  # type: ignore[import-untyped]
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # type: ignore[import-untyped]
from torch.utils.data import DataLoader, Dataset

from lungvl_model.data.dataset import collate
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.training.loop import TrainResult, cycle, run_steps, seed_everything, to_device
from privacy.dp_sgd import (
    EmptyBatchSafe,
    PoissonCollate,
    dp_sgd_ready,
    empty_like,
    per_sample_parameters,
    reset_opacus_state,
)

__all__ = ["dp_sgd_steps"]

logger = logging.getLogger(__name__)


def dp_sgd_steps(
    *,
    model: LungVLModel,
    dataset: Dataset[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    stage: str,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    device: torch.device,
    bf16: bool,
    seed: int,
    num_workers: int = 0,
    trainable: MutableMapping[str, set[str]] | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run DP-SGD steps on ``model`` in place.

    Args:
        model: the model (on ``device``); parameters' ``requires_grad`` is restored afterwards.
        dataset: the training studies (``len(dataset)`` items).
        optimizer: the base optimizer over ``model``'s parameters (wrapped in a ``DPOptimizer``).
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        steps: DP-SGD steps.
        sample_rate: Poisson rate ``q`` of each study per step.
        noise_multiplier: DP-SGD σ.
        max_grad_norm: per-study clip ``C``.
        device: where tensors go.
        bf16: autocast on CUDA.
        seed: seed of the non-private randomness (SSL masks, dropout); never the noise or the sample.
        num_workers: DataLoader workers.
        trainable: cache stage -> names of the parameters with a per-study gradient (filled on first use).
        on_steps: called once with the number of noisy steps that ran (also when a step fails midway),
            for the accountant.

    Returns:
        The steps' history.
    """
    n = len(dataset)  # type: ignore[arg-type]
    cache = trainable if trainable is not None else {}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    steps_done = 0

    def count(_optimizer: DPOptimizer) -> None:  # after the noise of each step: what the accountant counts
        nonlocal steps_done
        steps_done += 1

    with dp_sgd_ready(model):
        if stage not in cache:
            probe = to_device(collate([dataset[i] for i in range(min(2, n))]), device)
            cache[stage], dropped = per_sample_parameters(model, probe, stage=stage)
            logger.info(
                "DP-SGD stage %s: %d parameter tensors frozen (no per-study gradient): %s",
                stage,
                len(dropped),
                sorted(dropped),
            )
        kept = cache[stage]
        if not kept:
            raise RuntimeError(f"no parameter has a per-study gradient in stage {stage!r}")
        for name, p in model.named_parameters():
            p.requires_grad_(before[name] and name in kept)
        seed_everything(seed)
        reset_opacus_state(model, params=True)
        noise_gen = torch.Generator(device=device)
        noise_gen.manual_seed(secrets.randbits(63))
        sample_gen = torch.Generator()
        sample_gen.manual_seed(secrets.randbits(63))
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            dp_optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=max(1, round(sample_rate * n)),
                loss_reduction="mean",
                generator=noise_gen,
            )
            dp_optimizer.attach_step_hook(count)
            sampler = UniformWithReplacementSampler(
                num_samples=n, sample_rate=sample_rate, generator=sample_gen, steps=steps
            )
            loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                collate_fn=PoissonCollate(empty_like(collate([dataset[0]]))),
                num_workers=num_workers,
            )
            module = EmptyBatchSafe(gsm, [p for p in model.parameters() if p.requires_grad])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return run_steps(
                    cast(LungVLModel, module),
                    cycle(loader),
                    dp_optimizer,
                    stage=stage,
                    steps=steps,
                    device=device,
                    grad_clip=0.0,
                    bf16=bf16,
                    seed=seed,
                )
        finally:
            gsm.to_standard_module()  # removes the hooks
            reset_opacus_state(model, params=True)
            model.zero_grad(set_to_none=True)
            for name, p in model.named_parameters():
                p.requires_grad_(before[name])
            if on_steps is not None and steps_done:  # spent even if the round then failed: record what ran
                on_steps(steps_done)

"""Microbatch DP-SGD: each study's gradient from a forward/backward of that study alone, clipped, summed, noised.

The LungVL model has no batch coupling under DP-SGD (GroupNorm, every loss term per study with fixed
weights ``1/B``, InfoNCE off: :mod:`lungvl_model.models.lungvl`, :func:`privacy.dp_sgd.dp_sgd_ready`),
so a study's per-sample gradient is exactly the gradient of its own loss in a batch of one. A DP-SGD
step here is therefore, for a Poisson batch of ``B`` studies (``B`` may be 0):

* for each study ``i``: forward it alone, backward its loss ``ℓ_i``, ``g_i = ∇ℓ_i`` over the clipped
  parameters, ``s += g_i · min(1, C / (‖g_i‖₂ + 1e-6))`` (Opacus' clip factor) into float32 buffers;
* ``ĝ = (s + N(0, σ²C²·I)) / E`` with ``E`` the expected batch (``q · patients``), put into ``.grad``;
* the base optimizer's ``step()``.

This is the mechanism of Opacus' ``GradSampleModule`` + ``DPOptimizer`` (``loss_reduction="mean"``)
without its per-sample gradient hooks (the unfold-based Conv3d ones dominate on CPU): the same
sensitivity ``C`` per sampled patient, the same noise, the same division. Every parameter the stage
uses gets an exact per-study gradient, also those Opacus' hooks cannot see (read through ``.weight``
outside their module's forward). Memory is that of a batch of one plus two float32 copies of the
clipped parameters (the study's gradient and the running sum).

Which parameters are clipped and noised is decided once per stage by :func:`stage_parameters` on a
*public* batch, never per study or per batch: a parameter set that depended on the sampled studies
would show in the released update (noise on some coordinates, none on others).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.training.loop import TrainResult, to_device

__all__ = ["MicrobatchDPSGD", "microbatch_steps", "split_studies", "stage_parameters"]

_EPS = 1e-6  # Opacus' clip factor: C / (‖g‖ + 1e-6), capped at 1


def _take(value: Any, i: int) -> Any:
    """Study ``i`` of one batch field, kept batched (``[i:i+1]``)."""
    if isinstance(value, torch.Tensor):
        return value[i : i + 1] if value.ndim > 0 else value
    if isinstance(value, Mapping):
        return {k: _take(v, i) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return list(value[i : i + 1])
    return value


def split_studies(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The studies of a collated batch as ``B`` batches of one.

    Args:
        batch: a collated batch; ``image`` is ``(B, 1, D, H, W)`` and every tensor/list field has ``B``
            rows (nested dicts such as ``targets`` included).

    Returns:
        ``B`` batches, each with tensors ``(1, ...)`` and lists of one item (``[]`` when ``B == 0``).
    """
    return [_take(batch, i) for i in range(int(batch["image"].shape[0]))]


def stage_parameters(model: LungVLModel, batch: dict[str, Any], *, stage: str) -> set[str]:
    """Names of the trainable parameters that ``stage`` uses: a gradient after one dry pass on ``batch``.

    Run it on a public batch (a synthetic phantom), inside :func:`~privacy.dp_sgd.dp_sgd_ready`, so
    that the set is fixed before any site study is seen.

    Args:
        model: the model.
        batch: a collated public batch.
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.

    Returns:
        The names of the parameters with ``requires_grad`` whose ``.grad`` the pass set.
    """
    model.zero_grad(set_to_none=True)
    try:
        gen = torch.Generator(device=batch["image"].device).manual_seed(0)
        model(batch, stage=stage, generator=gen).loss.backward()
        return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)


class MicrobatchDPSGD:
    """One DP-SGD step by microbatches of one study: clip each study's gradient, sum, noise, divide, step.

    Args:
        params: the clipped and noised parameters (a fixed, data-independent set; the others must not
            receive gradients: freeze them).
        optimizer: the base optimizer (e.g. AdamW) over (at least) ``params``.
        noise_multiplier: σ; the noise is ``N(0, (σ·C)²)`` per coordinate of the sum.
        max_grad_norm: ``C``, the per-study clip of the L2 norm over all of ``params``.
        expected_batch_size: ``E``, the divisor of the noisy sum (``q · patients``, as Opacus'
            ``expected_batch_size``).
        noise_generator: the noise randomness, on the parameters' device (seed it from OS entropy).
        autocast: bf16 autocast of the forward on CUDA.
        on_noised: called once per step right after the noise is drawn (what the accountant counts).

    Raises:
        ValueError: σ < 0, ``C <= 0``, ``E < 1`` or no parameter.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_generator: torch.Generator,
        autocast: bool = False,
        on_noised: Callable[[], None] | None = None,
    ) -> None:
        if not (noise_multiplier >= 0 and max_grad_norm > 0 and expected_batch_size >= 1 and params):
            raise ValueError(
                "MicrobatchDPSGD needs noise_multiplier >= 0, max_grad_norm > 0, expected_batch_size >= 1 and "
                f"parameters; got {noise_multiplier}, {max_grad_norm}, {expected_batch_size}, {len(params)} parameters"
            )
        self.params = list(params)
        self.optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.noise_generator = noise_generator
        self.autocast = autocast
        self.on_noised = on_noised

    def clipped_sum(
        self, model: nn.Module, batch: Mapping[str, Any], *, stage: str, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """``Σ_i clip_C(∇ℓ_i)`` over the studies of ``batch``, one forward/backward per study.

        Args:
            model: the model (on the batch's device); its ``.grad`` are overwritten and left ``None``.
            batch: a collated batch of ``B >= 0`` studies.
            stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
            generator: RNG of the SSL masks (drawn study after study).

        Returns:
            ``(sums, logged)``: one float32 tensor per parameter (its shape), and the batch means of the
            studies' loss terms and ``loss`` (``{"loss": 0.0}`` for an empty batch).
        """
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        terms: dict[str, float] = {}
        total, studies = 0.0, split_studies(batch)
        use_amp = self.autocast and self.params[0].device.type == "cuda"
        for one in studies:
            for p in self.params:
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext():
                out = model(one, stage=stage, generator=generator)
            out.loss.float().backward()
            present = [(s, p.grad) for s, p in zip(sums, self.params, strict=True) if p.grad is not None]
            if present:
                norms = torch._foreach_norm([g.float() for _, g in present])
                norm = torch.linalg.vector_norm(torch.stack(norms))
                factor = float((self.max_grad_norm / (norm + _EPS)).clamp(max=1.0))
                torch._foreach_add_([s for s, _ in present], [g.float() for _, g in present], alpha=factor)
            total += float(out.loss.detach())
            for k, v in out.losses.items():
                terms[k] = terms.get(k, 0.0) + float(v)
        for p in self.params:
            p.grad = None
        b = max(1, len(studies))
        logged = {k: v / b for k, v in terms.items()}
        logged["loss"] = total / b
        return sums, logged

    def step(
        self, model: nn.Module, batch: Mapping[str, Any], *, stage: str, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """One noisy step: :meth:`clipped_sum`, ``+ N(0, σ²C²)``, ``/ E`` into ``.grad``, base ``step()``.

        An empty batch is a noise-only step. The gradients stay in ``.grad`` after the step.

        Returns:
            The logged losses of :meth:`clipped_sum`.
        """
        sums, logged = self.clipped_sum(model, batch, stage=stage, generator=generator)
        std = self.noise_multiplier * self.max_grad_norm
        for s in sums:
            if std > 0:
                s.add_(torch.normal(0.0, std, size=s.shape, device=s.device, generator=self.noise_generator))
            s.div_(self.expected_batch_size)
        if self.on_noised is not None:
            self.on_noised()
        for p, s in zip(self.params, sums, strict=True):
            p.grad = s.to(p.dtype)
        self.optimizer.step()
        return logged


def microbatch_steps(
    model: LungVLModel,
    batches: Iterator[dict[str, Any]],
    dp: MicrobatchDPSGD,
    *,
    stage: str,
    steps: int,
    device: torch.device,
    seed: int = 0,
) -> TrainResult:
    """Run ``steps`` microbatch DP-SGD steps (the loop of :func:`~lungvl_model.training.loop.run_steps`).

    Args:
        model: the model (on ``device``).
        batches: collated (Poisson) batches; an empty one is a noise-only step.
        dp: the step.
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        steps: steps to run.
        device: where tensors go.
        seed: seed of the SSL mask generator.

    Returns:
        The per-step history (``loss``, the loss terms, ``lr``).

    Raises:
        FloatingPointError: a step's loss is not finite.
    """
    model.train()
    result = TrainResult(stage=stage, device=str(device))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = to_device(next(batches), device)
        logged = dp.step(model, batch, stage=stage, generator=gen)
        logged["lr"] = float(dp.optimizer.param_groups[0]["lr"])
        if not math.isfinite(logged["loss"]):
            raise FloatingPointError(f"{stage} loss became {logged['loss']} at step {step + 1}: {logged}")
        result.history.append(logged)
        result.steps += 1
        result.examples += int(batch["image"].shape[0])
    result.seconds = time.perf_counter() - t0
    return result

"""DP-SGD plumbing of the site trainer: making the LungVL model per-study separable for Opacus.

DP-SGD needs every trainable parameter to have a *per-study* gradient. Three adjustments make the
model fit that, each undone after the round (see :func:`dp_sgd_ready` and
:func:`per_sample_parameters`):

* GPT-2 embeds positions with ``position_ids`` of shape ``(1, T)`` broadcast over the batch, so
  Opacus would see a batch of one for ``wpe``; a forward pre-hook passes ``(B, T)`` ids instead.
* the image–report InfoNCE term couples the studies of a batch (each study's loss depends on the
  others' embeddings), so no per-study clip bounds a study's influence; its weight is 0 under DP-SGD.
* parameters without a per-study gradient in the stage (unused by it, or read through ``.weight``
  outside their module's forward, e.g. the visual scale embedding) are frozen for the round; they are
  found once per stage by a dry forward/backward through a ``GradSampleModule``.

Every loss term of the model is a per-study quantity with fixed weights ``1/B`` (a study's per-sample
gradient depends on that study alone; :mod:`lungvl_model.models.lungvl`), and the sampling unit is the
patient (:class:`privacy.dp_sgd_train.PatientPoissonSampler`: at most one study of a patient per step),
so one patient moves a step's clipped sum by at most ``C``.

Poisson sampling can draw an empty batch; :class:`PoissonCollate` and :class:`EmptyBatchSafe` turn it into
a noise-only DP step, as Opacus' own data loader does.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule  # type: ignore[import-untyped]
from torch import nn

from lungvl_model.data.dataset import collate
from lungvl_model.models.lungvl import LungVLModel, LungVLOutput

__all__ = [
    "EmptyBatchSafe",
    "PoissonCollate",
    "dp_sgd_ready",
    "empty_like",
    "per_sample_parameters",
    "reset_opacus_state",
]


def empty_like(batch: Any) -> Any:
    """The same batch structure with batch size 0 (tensors sliced, lists emptied)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0].clone()
    if isinstance(batch, Mapping):
        return {k: empty_like(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return []
    return batch


def reset_opacus_state(model: nn.Module, *, params: bool = False) -> None:
    """Drop what Opacus' hooks leave on modules (and, with ``params``, on parameters).

    A forward stores ``module.activations`` and the backward pops them; a module that ran forward but
    got no backward (outputs unused by the loss) keeps them, and the next pass would size its
    per-sample gradients (and the mean-reduction scale) by that stale batch. Parameters keep the
    ``DPOptimizer``'s ``summed_grad`` and per-sample attributes.
    """
    for m in model.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(m, attr):
                delattr(m, attr)
    if params:
        for p in model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


class PoissonCollate:
    """``collate`` that turns the empty index lists of Poisson sampling into an empty batch."""

    def __init__(self, empty: dict[str, Any]) -> None:
        self.empty = empty

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``items``; an empty list gives the empty batch."""
        return collate(items) if items else empty_like(self.empty)


class EmptyBatchSafe(nn.Module):
    """Forwards to the ``GradSampleModule``; on an empty Poisson batch skips the model.

    The DP step of an empty batch is noise only: the loss is a constant whose backward sets every
    trainable parameter's ``grad_sample`` to a ``(0, *shape)`` tensor, which the ``DPOptimizer``
    clips (nothing), noises and scales by the expected batch size.
    """

    def __init__(self, gsm: GradSampleModule, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.gsm = gsm
        self._trainable = tuple(params)

    def forward(self, batch: dict[str, Any], stage: str = "vl", generator: torch.Generator | None = None) -> Any:
        """The model's output, or a zero loss with empty per-sample gradients when ``B == 0``."""
        reset_opacus_state(self.gsm)  # each step starts from no stored activations
        if batch["image"].shape[0] > 0:
            return self.gsm(batch, stage=stage, generator=generator)
        loss = torch.zeros((), device=batch["image"].device, requires_grad=True) * 1.0
        loss.register_hook(self._empty_grad_samples)  # type: ignore[no-untyped-call]
        return LungVLOutput(loss=loss, losses={})

    def _empty_grad_samples(self, grad: torch.Tensor) -> torch.Tensor:
        for p in self._trainable:
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
        return grad


@contextlib.contextmanager
def dp_sgd_ready(model: LungVLModel) -> Iterator[None]:
    """Make ``model`` per-study separable for DP-SGD while inside the block; restored on exit.

    Passes ``(B, T)`` position ids to GPT-2 (its own ``(1, T)`` ids give ``wpe`` a batch of one under
    Opacus' hooks), switches the cross-study InfoNCE term off and gradient checkpointing off.
    """

    def per_sample_positions(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ids = args[0] if args else kwargs.get("input_ids")
        if kwargs.get("position_ids") is not None or ids is None:
            return None
        kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        return args, kwargs

    config, checkpointing = model.config, model.vision.gradient_checkpointing
    handle = model.decoder.lm.transformer.register_forward_pre_hook(per_sample_positions, with_kwargs=True)
    model.config = replace(config, loss=replace(config.loss, contrastive=0.0))
    model.vision.gradient_checkpointing = False
    try:
        yield
    finally:
        handle.remove()
        model.config = config
        model.vision.gradient_checkpointing = checkpointing


def per_sample_parameters(
    model: LungVLModel, batch: dict[str, Any], *, stage: str, rtol: float = 1e-3
) -> tuple[set[str], set[str]]:
    """Which trainable parameters get a correct per-study gradient in ``stage`` (one dry pass).

    Runs ``batch`` forward and backward through a temporary Opacus ``GradSampleModule`` (hooks). A
    parameter is kept when its ``grad_sample`` exists, has the batch size as first dimension and
    sums (over studies, ÷ B for the mean reduction) to its ordinary gradient within ``rtol``.

    Args:
        model: the model (inside :func:`dp_sgd_ready` for a DP-SGD run).
        batch: a collated batch of at least 2 studies (a batch of one cannot reveal a broadcast).
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        rtol: relative tolerance of the sum check.

    Returns:
        ``(kept, dropped)`` parameter names; ``dropped`` are trainable parameters without a correct
        per-study gradient (unused in the stage, or used outside their module's forward).
    """
    b = int(batch["image"].shape[0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    reset_opacus_state(model, params=True)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    kept: set[str] = set()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            gsm(batch, stage=stage).loss.backward()
        for name, p in model.named_parameters():
            gs = getattr(p, "grad_sample", None)
            if name not in trainable or p.grad is None or not isinstance(gs, torch.Tensor) or gs.shape[0] != b:
                continue
            summed = gs.detach().float().sum(0) / b
            if torch.allclose(summed, p.grad.float(), rtol=rtol, atol=rtol * float(p.grad.abs().max()) + 1e-12):
                kept.add(name)
    finally:
        gsm.to_standard_module()
        reset_opacus_state(model, params=True)
        model.zero_grad(set_to_none=True)
    return kept, trainable - kept

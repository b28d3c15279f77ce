"""Domain-generalisation penalties across subgroups inside local training (V-REx variance, group DRO).

A site's studies fall into subgroups (here: slice-thickness groups, :func:`slice_thickness_group`);
the risk of a group is its mean loss. Two ways of shrinking the gap between groups, both applied to
the group risks ``L_g`` of each step:

* variance penalty (V-REx, Krueger et al. 2021): ``Σ_g a_g L_g + λ · Var_g(L_g)`` with ``a_g`` the
  groups' shares of the batch;
* group DRO (Sagawa et al. 2020): ``a`` are adversarial weights, updated every step by
  ``a_g ← a_g · exp(η · L_g)`` and renormalised, so the worst group gets more weight over time.

Both reduce to the plain example-weighted mean with ``λ = 0`` and ``η = 0``. They couple the studies
of a batch (a study's loss term depends on the others'), so DP-SGD's per-study clipping does not
bound a study's influence: the site trainer refuses them together with DP-SGD.

:class:`GroupPenalized` wraps any model whose ``forward(batch, stage=..., generator=...)`` returns an
output dataclass with ``loss`` and ``losses`` (e.g. ``LungVLModel``): it splits the batch by group,
runs the model on each part and combines the group losses with :class:`GroupRiskLoss`, so the
framework-free training loop (``run_steps``) runs it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import torch
from torch import nn

__all__ = [
    "SLICE_GROUPS",
    "GroupPenalized",
    "GroupRiskLoss",
    "dro_update",
    "group_risks",
    "slice_thickness_group",
    "take_batch",
    "variance_penalty",
]

#: Slice-thickness subgroups: thin (< 2 mm, screening), medium (2–4 mm), thick (>= 4 mm, older scanners).
SLICE_GROUPS: Final = ("thin", "medium", "thick")
_REDUCTIONS: Final = ("none", "mean", "sum")


def slice_thickness_group(thickness_mm: float | str | None) -> str | None:
    """The subgroup of a slice thickness: ``thin`` (< 2 mm), ``medium`` (2–4 mm), ``thick`` (>= 4 mm).

    Args:
        thickness_mm: the DICOM SliceThickness (a number or its string), or None.

    Returns:
        One of :data:`SLICE_GROUPS`, or None when the thickness is unknown or not a positive number.
    """
    try:
        mm = float(thickness_mm)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mm) or mm <= 0:
        return None
    return "thin" if mm < 2.0 else "medium" if mm < 4.0 else "thick"


def group_risks(losses: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and size of each group.

    Args:
        losses: ``(N,)`` per-item losses.
        groups: ``(N,)`` group indices in ``[0, n_groups)``.
        n_groups: number of groups ``G``.

    Returns:
        ``(risks (G,), counts (G,))``; an empty group has risk 0 and count 0.

    Raises:
        ValueError: shapes that differ, or an index outside ``[0, n_groups)``.
    """
    if losses.ndim != 1 or groups.shape != losses.shape:
        raise ValueError(f"losses and groups must both be (N,), got {tuple(losses.shape)} and {tuple(groups.shape)}")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"group indices must lie in [0, {n_groups}), got {groups.tolist()}")
    idx = groups.long()
    counts = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(0, idx, torch.ones_like(losses))
    sums = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(0, idx, losses)
    return sums / counts.clamp_min(1), counts


def variance_penalty(risks: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Population variance of the risks of the groups present (0 with fewer than two groups).

    Args:
        risks: ``(G,)`` group risks.
        present: ``(G,)`` bool mask of the groups to include (default all).

    Returns:
        A scalar tensor (differentiable in ``risks``).
    """
    r = risks if present is None else risks[present]
    if r.numel() < 2:
        return risks.sum() * 0.0
    return ((r - r.mean()) ** 2).mean()


def dro_update(
    weights: torch.Tensor, risks: torch.Tensor, step: float, present: torch.Tensor | None = None
) -> torch.Tensor:
    """One exponentiated-gradient step of the group-DRO weights: ``a_g ∝ a_g · exp(η · L_g)``.

    Args:
        weights: ``(G,)`` current weights (non-negative, summing to 1).
        risks: ``(G,)`` group risks (detached before use).
        step: step size ``η >= 0``.
        present: ``(G,)`` groups seen in this step; the others keep their weight.

    Returns:
        The new ``(G,)`` weights, summing to 1.

    Raises:
        ValueError: a negative or non-finite step.
    """
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"group-DRO step must be a finite number >= 0, got {step!r}")
    mask = torch.ones_like(weights, dtype=torch.bool) if present is None else present
    boost = torch.where(mask, torch.exp(step * risks.detach().to(weights.dtype)), torch.ones_like(weights))
    new = weights * boost
    return new / new.sum()


class GroupRiskLoss(nn.Module):
    """``Σ_g a_g L_g + λ · Var_g(L_g)`` over the groups present in a step.

    ``a`` are the groups' shares of the step's items when ``dro_step = 0``, else the group-DRO weights
    (a buffer, updated in training mode, renormalised over the groups present).

    Args:
        n_groups: number of groups ``G``.
        penalty: variance weight ``λ >= 0``.
        dro_step: group-DRO step size ``η >= 0`` (0: example-weighted mean).
        reduction: ``"sum"`` (the objective), ``"mean"`` (the objective / G) or ``"none"`` (the
            ``(G,)`` per-group terms ``a_g L_g + λ (L_g − L̄)² / G_present``, which sum to it).

    Raises:
        ValueError: bad ``n_groups``, ``penalty``, ``dro_step`` or ``reduction``.
    """

    def __init__(self, n_groups: int, *, penalty: float = 0.0, dro_step: float = 0.0, reduction: str = "sum") -> None:
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        for name, value in (("penalty", penalty), ("dro_step", dro_step)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"GroupRiskLoss {name} must be a finite number >= 0, got {value!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.n_groups, self.reduction = n_groups, reduction
        self.penalty, self.dro_step = float(penalty), float(dro_step)
        self.register_buffer("dro_weights", torch.full((n_groups,), 1.0 / n_groups))

    def forward(self, risks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Combine group risks.

        Args:
            risks: ``(G,)`` mean loss per group.
            counts: ``(G,)`` items per group in the step (0 = absent).

        Returns:
            The reduced objective (scalar) or the ``(G,)`` per-group terms.
        """
        if risks.shape != (self.n_groups,) or counts.shape != (self.n_groups,):
            raise ValueError(
                f"risks and counts must be ({self.n_groups},), got {tuple(risks.shape)} and {tuple(counts.shape)}"
            )
        present = counts > 0
        if not bool(present.any()):
            raise ValueError("GroupRiskLoss needs at least one non-empty group")
        if self.dro_step > 0:
            if self.training:
                self.dro_weights = dro_update(self.dro_weights, risks, self.dro_step, present)
            w = torch.where(present, self.dro_weights.to(risks.dtype), torch.zeros_like(risks))
            share = w / w.sum()
        else:
            share = counts.to(risks.dtype) / counts.sum()
        terms = share * torch.where(present, risks, torch.zeros_like(risks))
        if self.penalty > 0 and int(present.sum()) > 1:
            centred = torch.where(present, risks - risks[present].mean(), torch.zeros_like(risks))
            terms = terms + self.penalty * centred**2 / present.sum()
        if self.reduction == "none":
            return terms
        return terms.sum() if self.reduction == "sum" else terms.sum() / self.n_groups


def take_batch(batch: Any, index: Sequence[int]) -> Any:
    """The items ``index`` of a collated batch (tensors indexed on dim 0, lists picked, nested dicts kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[torch.as_tensor(list(index), dtype=torch.long, device=batch.device)]
    if isinstance(batch, Mapping):
        return {k: take_batch(v, index) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return [batch[i] for i in index]
    return batch


class GroupPenalized(nn.Module):
    """A model whose loss is :class:`GroupRiskLoss` over the batch's subgroups.

    The batch is split by ``group_of(batch)`` (one group index per item, or -1 for "unknown", which
    joins no group and is trained with the plain mean); the model runs once per group part and the
    group losses (each the model's mean loss over the part) are combined. A batch with fewer than two
    known groups is a plain forward. Only ``loss`` and ``losses`` of the returned output describe the
    whole batch (the other fields are those of the first group's part): it is meant for training.

    Args:
        model: the wrapped model, ``model(batch, stage=..., generator=...)`` returning a dataclass
            with ``loss`` (scalar tensor) and ``losses`` (dict of floats).
        group_of: ``(batch) -> list[int]``, group index in ``[0, n_groups)`` or -1 per item.
        n_groups: number of groups.
        penalty: variance weight ``λ``.
        dro_step: group-DRO step size ``η``.
    """

    def __init__(
        self,
        model: nn.Module,
        group_of: Callable[[dict[str, Any]], Sequence[int]],
        *,
        n_groups: int = len(SLICE_GROUPS),
        penalty: float = 0.0,
        dro_step: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.group_of = group_of
        self.objective = GroupRiskLoss(n_groups, penalty=penalty, dro_step=dro_step)

    def forward(self, batch: dict[str, Any], stage: str = "vl", generator: torch.Generator | None = None) -> Any:
        """The wrapped model's output with ``loss`` replaced by the group objective.

        ``losses`` holds each logged term as the item-weighted mean over the parts, plus
        ``group_variance`` (variance of the group risks) when more than one group is present.
        """
        labels = [int(g) for g in self.group_of(batch)]
        n = int(batch["image"].shape[0])
        if len(labels) != n:
            raise ValueError(f"group_of returned {len(labels)} labels for a batch of {n}")
        parts: dict[int, list[int]] = {}
        for i, g in enumerate(labels):
            parts.setdefault(g, []).append(i)
        known = [g for g in parts if g >= 0]
        if len(known) < 2:
            return self.model(batch, stage=stage, generator=generator)
        outs = {g: self.model(take_batch(batch, idx), stage=stage, generator=generator) for g, idx in parts.items()}
        dtype = outs[known[0]].loss.dtype
        zero = batch["image"].new_zeros((), dtype=torch.float32)
        g_all = range(self.objective.n_groups)
        risks = torch.stack([outs[g].loss.float() if g in parts else zero for g in g_all])
        counts = torch.tensor([float(len(parts.get(g, ()))) for g in g_all], device=risks.device)
        loss = self.objective(risks, counts)
        if -1 in parts:  # items of unknown group: plain mean, weighted by their share of the batch
            share = len(parts[-1]) / n
            loss = (1 - share) * loss + share * outs[-1].loss.float()
        logged: dict[str, float] = {}
        for g, out in outs.items():
            for k, v in out.losses.items():
                logged[k] = logged.get(k, 0.0) + float(v) * len(parts[g]) / n
        logged["group_variance"] = float(variance_penalty(risks.detach(), counts > 0))
        return dataclasses.replace(outs[known[0]], loss=loss.to(dtype), losses=logged)

"""Losses of the end-to-end vision-language stage (STYLE.md habit 5: small modules with ``reduction``).

- :class:`InfoNCELoss`: symmetric image–report contrastive loss.
- :class:`GroundingLoss`: each finding/anatomy mention token should put its cross-attention mass on
  its region (nodule mask or lobe).
- :class:`MaskedTargetLoss`: risk/concept targets where unknown values (NaN / −1) are skipped.

Every loss is a *per-study* quantity: ``reduction="none"`` gives one value per study, ``(B,)``, and
``"mean"`` averages those with the fixed weight ``1/B`` (a study without the target, report or
mention contributes 0 and does not change the divisor), ``"sum"`` adds them. So a study's share of
the loss, and its per-sample gradient under DP-SGD, depends on that study alone, except for
:class:`InfoNCELoss`, which compares every study with the others of its batch by construction (DP-SGD
switches it off, :func:`privacy.dp_sgd.dp_sgd_ready`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a ``(B,)`` per-study loss: ``mean`` is ``sum / B`` (fixed weights), 0 for ``B = 0``."""
    if reduction == "none":
        return x
    if x.numel() == 0:
        return x.sum() * 0.0
    return x.mean() if reduction == "mean" else x.sum()


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE between matched image and report embeddings.

    Not separable by study: a study's term depends on the other studies of the batch (its negatives).

    Args:
        temperature: softmax temperature (> 0).
        reduction: ``"mean"`` (sum over studies / B), ``"sum"`` or ``"none"`` (``(B,)``, 0 for a study
            without a report).
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.reduction = _check_reduction(reduction)

    def forward(self, image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Loss.

        Args:
            image: ``(B, P)`` image embeddings.
            text: ``(B, P)`` report embeddings (row i matches image i).
            valid: ``(B,)`` bool, pairs that have a report.

        Returns:
            Scalar, or ``(B,)`` with ``reduction="none"`` (0 for studies without a report); every study
            gets 0 (with grad) when fewer than 2 pairs are valid.
        """
        b = image.shape[0]
        if valid is None:
            valid = torch.ones(b, dtype=torch.bool, device=image.device)
        valid = valid.to(device=image.device, dtype=torch.bool)
        per = (image.sum() + text.sum()) * 0.0 + image.new_zeros(b)
        n = int(valid.sum())
        if n >= 2:
            im, tx = image[valid], text[valid]
            logits = F.normalize(im, dim=-1) @ F.normalize(tx, dim=-1).T / self.temperature
            target = torch.arange(n, device=image.device)
            pair = 0.5 * (
                F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
            )
            per = per.index_put((valid.nonzero().squeeze(1),), pair.to(per.dtype))
        return _reduce(per, self.reduction)


class GroundingLoss(nn.Module):
    """Mention grounding: −log of the attention mass a mention token puts inside its region.

    A study's term is the mean over *its own* grounded mention tokens (0 when it has none).

    Args:
        eps: added inside the log.
        reduction: over studies: ``"mean"`` (sum / B), ``"sum"`` or ``"none"`` (``(B,)``).
    """

    def __init__(self, eps: float = 1e-4, reduction: str = "mean") -> None:
        super().__init__()
        self.eps = eps
        self.reduction = _check_reduction(reduction)

    def forward(
        self,
        attention: torch.Tensor,
        token_regions: torch.Tensor,
        region_fraction: torch.Tensor,
        region_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Loss.

        Args:
            attention: ``(B, T, N)`` cross-attention (rows sum to 1) of text tokens over visual tokens.
            token_regions: ``(B, T)`` region index per token, −1 for non-mentions.
            region_fraction: ``(B, R, N)`` fraction of each visual token inside each region.
            region_valid: ``(B, R)`` bool, regions that exist for the study (mask known and non-empty).

        Returns:
            Scalar, or ``(B,)`` with ``reduction="none"`` (0, with grad, for a study without a grounded
            mention).
        """
        b, t, n = attention.shape
        idx = token_regions.clamp_min(0)  # (B, T)
        frac = torch.gather(region_fraction, 1, idx.unsqueeze(-1).expand(b, t, n))  # (B, T, N)
        ok = (token_regions >= 0) & torch.gather(region_valid, 1, idx)
        mass = (attention * frac).sum(-1)  # (B, T)
        nll = torch.where(ok, -torch.log(mass + self.eps), torch.zeros_like(mass))
        per = nll.sum(-1) / ok.sum(-1).clamp_min(1).to(nll.dtype)  # (B,)
        return _reduce(per, self.reduction)


class MaskedTargetLoss(nn.Module):
    """A supervised target with unknown entries skipped.

    Args:
        kind: ``"binary"`` (logits vs 0/1, NaN unknown), ``"multiclass"`` (logits (B, K) vs index,
            −1 unknown) or ``"regression"`` (Smooth-L1, NaN unknown).
        reduction: over studies: ``"mean"`` (sum over known / B: an unknown target contributes 0 and does
            not change the divisor), ``"sum"`` or ``"none"`` (``(B,)``, 0 where unknown).
    """

    def __init__(self, kind: str, reduction: str = "mean") -> None:
        super().__init__()
        if kind not in ("binary", "multiclass", "regression"):
            raise ValueError(f"kind must be binary, multiclass or regression, got {kind!r}")
        self.kind = kind
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each study with a known target (0, with grad, where unknown).

        Args:
            pred: ``(B,)`` logits / values, or ``(B, K)`` logits for ``"multiclass"``.
            target: ``(B,)`` targets (NaN, or −1 for ``"multiclass"``, = unknown).

        Returns:
            Scalar, or ``(B,)`` with ``reduction="none"``.
        """
        if self.kind == "multiclass":
            ok = target >= 0
            safe = torch.where(ok, target, torch.zeros_like(target))  # an unknown target must not reach the loss
            per = F.cross_entropy(pred, safe, reduction="none")
        else:
            ok = ~torch.isnan(target)
            safe = torch.where(ok, target, torch.zeros_like(target)).to(pred.dtype)  # NaN * 0 is NaN in backward
            if self.kind == "binary":
                per = F.binary_cross_entropy_with_logits(pred, safe, reduction="none")
            else:
                per = F.smooth_l1_loss(pred, safe, reduction="none")
        return _reduce(torch.where(ok, per, torch.zeros_like(per)), self.reduction)

"""Losses of the end-to-end vision-language stage (STYLE.md habit 5: small modules with ``reduction``).

- :class:`InfoNCELoss`: symmetric image–report contrastive loss.
- :class:`GroundingLoss`: each finding/anatomy mention token should put its cross-attention mass on
  its region (nodule mask or lobe).
- :class:`MaskedTargetLoss`: risk/concept targets where unknown values (NaN / −1) are skipped.
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
    if reduction == "none":
        return x
    if x.numel() == 0:
        return x.new_zeros(())
    return x.mean() if reduction == "mean" else x.sum()


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE between matched image and report embeddings.

    Args:
        temperature: softmax temperature (> 0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per pair).
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
            Scalar (or ``(B',)`` with ``reduction="none"``); zero with grad when fewer than 2 pairs.
        """
        if valid is not None:
            image, text = image[valid], text[valid]
        if image.shape[0] < 2:
            return (image.sum() + text.sum()) * 0.0
        logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / self.temperature
        target = torch.arange(image.shape[0], device=image.device)
        per = 0.5 * (
            F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
        )
        return _reduce(per, self.reduction)


class GroundingLoss(nn.Module):
    """Mention grounding: −log of the attention mass a mention token puts inside its region.

    Args:
        eps: added inside the log.
        reduction: over mention tokens.
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
            Scalar (zero with grad when there is no grounded mention).
        """
        b, t, n = attention.shape
        idx = token_regions.clamp_min(0)  # (B, T)
        frac = torch.gather(region_fraction, 1, idx.unsqueeze(-1).expand(b, t, n))  # (B, T, N)
        ok = (token_regions >= 0) & torch.gather(region_valid, 1, idx)
        mass = (attention * frac).sum(-1)  # (B, T)
        per = -torch.log(mass[ok] + self.eps)
        if per.numel() == 0:
            return attention.sum() * 0.0
        return _reduce(per, self.reduction)


class MaskedTargetLoss(nn.Module):
    """A supervised target with unknown entries skipped.

    Args:
        kind: ``"binary"`` (logits vs 0/1, NaN unknown), ``"multiclass"`` (logits (B, K) vs index,
            −1 unknown) or ``"regression"`` (Smooth-L1, NaN unknown).
        reduction: over known entries.
    """

    def __init__(self, kind: str, reduction: str = "mean") -> None:
        super().__init__()
        if kind not in ("binary", "multiclass", "regression"):
            raise ValueError(f"kind must be binary, multiclass or regression, got {kind!r}")
        self.kind = kind
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss over known targets; zero with grad when none is known."""
        if self.kind == "multiclass":
            ok = target >= 0
            if not ok.any():
                return pred.sum() * 0.0
            return _reduce(F.cross_entropy(pred[ok], target[ok], reduction="none"), self.reduction)
        ok = ~torch.isnan(target)
        if not ok.any():
            return pred.sum() * 0.0
        if self.kind == "binary":
            per = F.binary_cross_entropy_with_logits(pred[ok], target[ok], reduction="none")
        else:
            per = F.smooth_l1_loss(pred[ok], target[ok], reduction="none")
        return _reduce(per, self.reduction)

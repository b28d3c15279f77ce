"""Finding slots: one decoder memory token per kept nodule, so every finding sentence is tied to its finding.

A slot is the masked average of the finest aggregated feature map over the nodule's mask (model grid)
plus embeddings of its measured attributes (:data:`~lungvl_model.data.targets.NODULE_ATTRIBUTES`:
log diameter, log volume, type, lobe, calcified, margin, Lung-RADS, Brock probability, and the
comparison with the prior: context (``"baseline"`` = no prior study), growth in mm and log prior
diameter; an unknown value takes a learned "unknown" embedding) plus a learned "finding k of n"
embedding, layer-normalised to the decoder width. A learned "no finding" slot stands for a study
without any kept finding.

The decoder's cross-attention memory is ``[slot positions (K + 1), visual tokens (N)]``
(:func:`slot_memory`); which slot positions a sequence sees is a ``(B, K + 1)`` selection: slot ``k``
alone for finding ``k``'s sentence, all slots for the impression, the "no finding" slot (position ``K``)
for the negative sentence, none for a report without slot targets. Every learned vector is an
``nn.Embedding`` / ``nn.Linear`` called on per-study inputs, so each study's gradient depends on that
study alone (DP-SGD's per-sample hooks see a batch dimension of B everywhere).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungvl_model.data.site_layout import LOBES, MARGINS, NODULE_TYPES
from lungvl_model.data.targets import LUNG_RADS_CLASSES, MAX_SLOTS, NODULE_ATTRIBUTES, NODULE_CONTEXTS

#: Continuous attribute columns (projected linearly) and categorical ones (embedded; index n = unknown).
CONTINUOUS: tuple[str, ...] = ("log_diameter", "log_volume", "brock", "growth_mm", "log_prior_diameter")
#: Kinds of decoder sequence; the prefix of a sequence (:meth:`SlotEncoder.prefix`) embeds its kind.
SEQUENCE_KINDS: tuple[str, ...] = ("report", "finding", "negative", "impression")
CATEGORICAL: dict[str, int] = {
    "type": len(NODULE_TYPES),
    "lobe": len(LOBES),
    "calcified": 2,
    "margin": len(MARGINS),
    "lung_rads": len(LUNG_RADS_CLASSES),
    "context": len(NODULE_CONTEXTS),
}
_COL = {name: i for i, name in enumerate(NODULE_ATTRIBUTES)}


def masked_average(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average feature vector inside each mask.

    Args:
        features: ``(B, C, d, h, w)`` feature map.
        masks: ``(B, K, D, H, W)`` float masks in [0, 1] on the model grid; resampled to ``(d, h, w)`` by
            area averaging when the grids differ.

    Returns:
        ``(pooled (B, K, C), has_mask (B, K) bool)``; ``pooled`` is 0 where a mask is empty.
    """
    m = masks.float()
    if m.shape[2:] != features.shape[2:]:
        fd, fh, fw = (int(n) for n in features.shape[2:])
        m = F.adaptive_avg_pool3d(m, (fd, fh, fw))
    w = m.flatten(2)  # (B, K, P)
    total = w.sum(-1)  # (B, K)
    pooled = torch.einsum("bkp,bcp->bkc", w, features.flatten(2).to(w.dtype)) / total.clamp_min(1e-6)[..., None]
    return pooled, total > 0


def ball_mask(shape: tuple[int, int, int], centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Ellipsoid ``sum(((idx - centre) / radius)^2) <= 1`` on a grid; the nearest voxel when it holds none.

    Args:
        shape: ``(D, H, W)``.
        centre: ``(3,)`` centre in voxel indices (z, y, x).
        radius: ``(3,)`` radii in voxels (> 0).

    Returns:
        ``(D, H, W)`` bool mask (never empty when the centre's nearest voxel lies in the grid).
    """
    c, r = np.asarray(centre, float), np.maximum(np.asarray(radius, float), 1e-6)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
    out = d2 <= 1.0
    if not out.any():
        near = np.clip(np.rint(c).astype(int), 0, np.asarray(shape) - 1)
        out[tuple(near)] = True
    return out


class SlotEncoder(nn.Module):
    """Finding slots from pooled fine-scale features and measured attributes.

    Args:
        feature_channels: channels ``C`` of the finest aggregated scale.
        embed_dim: decoder width ``E``.
        max_slots: most findings ``K``.
        attribute_dropout: in training, the chance that an attribute value is replaced by "unknown"
            (teaches the unknown embeddings, which inference uses for attributes it cannot measure).
    """

    def __init__(
        self, feature_channels: int, embed_dim: int, max_slots: int = MAX_SLOTS, attribute_dropout: float = 0.1
    ) -> None:
        super().__init__()
        if max_slots < 1 or not 0.0 <= attribute_dropout < 1.0:
            raise ValueError(f"SlotEncoder: max_slots={max_slots} must be >= 1 and attribute_dropout="
                             f"{attribute_dropout} in [0, 1)")  # fmt: skip
        self.max_slots = max_slots
        self.attribute_dropout = attribute_dropout
        self.feature_proj = nn.Linear(feature_channels, embed_dim)
        self.no_mask = nn.Embedding(1, embed_dim)
        self.continuous = nn.Linear(len(CONTINUOUS), embed_dim)
        self.continuous_unknown = nn.Embedding(len(CONTINUOUS), embed_dim)
        self.categorical = nn.ModuleDict({f"{k}_embed": nn.Embedding(n + 1, embed_dim) for k, n in CATEGORICAL.items()})
        self.rank = nn.Embedding(max_slots, embed_dim)
        self.count = nn.Embedding(max_slots + 1, embed_dim)
        self.no_finding = nn.Embedding(1, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.kind = nn.Embedding(len(SEQUENCE_KINDS), embed_dim)

    def forward(
        self, features: torch.Tensor, masks: torch.Tensor, attributes: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Slot tokens plus the "no finding" slot.

        Args:
            features: ``(B, C, d, h, w)`` finest aggregated scale.
            masks: ``(B, K, D, H, W)`` each finding's mask on the model grid (empty: "no mask" embedding).
            attributes: ``(B, K, A)`` rows of ``NODULE_ATTRIBUTES``, NaN unknown.
            valid: ``(B, K)`` bool, the study's findings (in rank order, valid ones first).

        Returns:
            ``(B, K + 1, E)``: slot ``k`` at position ``k`` (0 where invalid), the "no finding" slot last.
        """
        b, k, a = attributes.shape
        if a != len(NODULE_ATTRIBUTES) or k > self.max_slots or masks.shape[:2] != (b, k) or valid.shape != (b, k):
            raise ValueError(f"SlotEncoder: attributes (B, K<={self.max_slots}, {len(NODULE_ATTRIBUTES)}), masks "
                             f"(B, K, ...) and valid (B, K) expected, got {tuple(attributes.shape)}, "
                             f"{tuple(masks.shape)}, {tuple(valid.shape)}")  # fmt: skip
        attrs = attributes.float()
        if self.training and self.attribute_dropout > 0:
            drop = torch.rand(attrs.shape, device=attrs.device) < self.attribute_dropout
            attrs = attrs.masked_fill(drop, float("nan"))
        pooled, has_mask = masked_average(features, masks)
        zeros = torch.zeros(b, k, dtype=torch.long, device=attrs.device)
        x = self.feature_proj(pooled.to(features.dtype)) + self.no_mask(zeros) * (~has_mask)[..., None].to(pooled.dtype)
        cont = attrs[..., [_COL[c] for c in CONTINUOUS]]  # (B, K, len(CONTINUOUS))
        unknown = torch.isnan(cont)
        x = x + self.continuous(cont.nan_to_num(0.0))
        idx = torch.arange(len(CONTINUOUS), device=attrs.device).expand(b, k, -1)
        x = x + (self.continuous_unknown(idx) * unknown[..., None].to(x.dtype)).sum(2)
        for name, n in CATEGORICAL.items():
            v = attrs[..., _COL[name]]
            ok = ~torch.isnan(v) & (v >= 0) & (v < n)
            x = x + self.categorical[f"{name}_embed"](
                torch.where(ok, v.nan_to_num(0.0).long(), torch.full_like(zeros, n))
            )
        n_valid = valid.long().sum(-1, keepdim=True).expand(b, k)
        x = x + self.rank(torch.arange(k, device=attrs.device).expand(b, k)) + self.count(n_valid)
        slots = self.norm(x) * valid[..., None].to(x.dtype)
        none = self.norm(self.no_finding(zeros[:, :1]))  # (B, 1, E)
        return torch.cat([slots, none], dim=1)

    def prefix(self, slots: torch.Tensor, select: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """What a sequence is about, added to its ``<bos>`` embedding: its kind + the mean selected slot.

        Cross-attention alone spreads over thousands of visual tokens; the prefix makes the first token
        (finding sentence, negative sentence or impression, and which finding) depend on the slot directly.

        Args:
            slots: ``(B, P, E)`` from :meth:`forward`.
            select: ``(B, P)`` bool, the slot positions of the sequence.
            kind: ``(B,)`` long index into :data:`SEQUENCE_KINDS`.

        Returns:
            ``(B, E)``.
        """
        w = select.to(slots.dtype)
        mean = (slots * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return self.kind(kind) + mean


def slot_memory(
    slots: torch.Tensor, visual_tokens: torch.Tensor, select: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention memory ``[slots, visual tokens]`` and its mask.

    Args:
        slots: ``(B, P, E)`` slot positions (K slots + "no finding").
        visual_tokens: ``(B, N, E)`` global visual tokens (always visible).
        select: ``(B, P)`` bool, the slot positions this sequence sees.

    Returns:
        ``(memory (B, P + N, E), mask (B, P + N) long)``.
    """
    if select.shape != slots.shape[:2]:
        raise ValueError(f"select must be {tuple(slots.shape[:2])}, got {tuple(select.shape)}")
    memory = torch.cat([slots.to(visual_tokens.dtype), visual_tokens], dim=1)
    vis = torch.ones(visual_tokens.shape[:2], dtype=torch.long, device=visual_tokens.device)
    return memory, torch.cat([select.long(), vis], dim=1)


__all__ = [
    "CATEGORICAL",
    "CONTINUOUS",
    "SEQUENCE_KINDS",
    "SlotEncoder",
    "ball_mask",
    "masked_average",
    "slot_memory",
]

"""Cross-modal fusion: visual tokens for the decoder's cross-attention, and attention → voxel heatmaps.

Every position of the selected aggregated scales becomes one visual token: a linear projection of
its feature vector plus a learned scale embedding plus a fixed 3-D sinusoidal encoding of its
normalised (z, y, x) position. :class:`TokenLayout` remembers which token came from which grid cell,
so a token's cross-attention row maps back onto the input volume (:func:`attention_to_heatmap`) and
region masks map onto tokens (:func:`region_fraction_per_token`, used by the grounding loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TokenLayout:
    """Where the visual tokens come from.

    Attributes:
        scales: scale index of each block of tokens, in token order.
        grids: ``(Ds, Hs, Ws)`` grid of each block; block ``i`` holds ``prod(grids[i])`` tokens.
    """

    scales: tuple[int, ...]
    grids: tuple[tuple[int, int, int], ...]

    @property
    def n_tokens(self) -> int:
        """Total number of visual tokens ``N``."""
        return sum(d * h * w for d, h, w in self.grids)

    def blocks(self) -> list[tuple[int, int, tuple[int, int, int]]]:
        """``(start, stop, grid)`` of each scale's tokens."""
        out, start = [], 0
        for g in self.grids:
            n = g[0] * g[1] * g[2]
            out.append((start, start + n, g))
            start += n
        return out


def sinusoidal_3d(grid: tuple[int, int, int], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 3-D sin/cos encoding of normalised grid positions.

    Args:
        grid: ``(D, H, W)``.
        dim: encoding width (split evenly over the three axes; the remainder is zero).
        device: tensor device.

    Returns:
        ``(D*H*W, dim)``.
    """
    per_axis = (dim // 3) // 2 * 2
    out = torch.zeros(grid[0] * grid[1] * grid[2], dim, device=device)
    if per_axis == 0:
        return out
    axes = torch.meshgrid(*[torch.linspace(0.0, 1.0, n, device=device) for n in grid], indexing="ij")
    freqs = torch.exp(torch.arange(0, per_axis, 2, device=device) * (-math.log(100.0) / per_axis)) * math.pi * 4
    for i, a in enumerate(axes):
        ang = a.reshape(-1, 1) * freqs.reshape(1, -1)
        out[:, i * per_axis : i * per_axis + per_axis : 2] = torch.sin(ang)
        out[:, i * per_axis + 1 : (i + 1) * per_axis : 2] = torch.cos(ang)
    return out


class VisualTokenizer(nn.Module):
    """Turns aggregated feature maps into visual tokens for cross-attention.

    Args:
        in_channels: channels of the aggregated scales.
        embed_dim: decoder hidden size ``E``.
        scales: which scales (0 = finest) to use.
    """

    def __init__(self, in_channels: int, embed_dim: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        if not scales:
            raise ValueError("VisualTokenizer needs at least one scale")
        self.scales = tuple(scales)
        self.proj = nn.Linear(in_channels, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.scale_embed = nn.Embedding(5, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, TokenLayout]:
        """Tokens of the selected scales.

        Args:
            features: aggregated maps, finest first, each ``(B, C, Ds, Hs, Ws)``.

        Returns:
            ``(tokens (B, N, E), layout)``.
        """
        toks, grids = [], []
        for s in self.scales:
            f = features[s]
            b, c, d, h, w = f.shape
            t = self.proj(f.flatten(2).transpose(1, 2))  # (B, d*h*w, E)
            t = t + sinusoidal_3d((d, h, w), self.embed_dim, f.device).unsqueeze(0)
            t = t + self.scale_embed.weight[s].view(1, 1, -1)
            toks.append(t)
            grids.append((d, h, w))
        return self.norm(torch.cat(toks, dim=1)), TokenLayout(self.scales, tuple(grids))


def attention_to_heatmap(
    attention: torch.Tensor, layout: TokenLayout, out_shape: tuple[int, int, int], normalize: bool = True
) -> torch.Tensor:
    """Map per-token cross-attention over visual tokens onto the input voxel grid.

    Each scale's attention block is reshaped to its grid and trilinearly upsampled to ``out_shape``;
    the scales are summed, so a heatmap keeps the attention mass distribution over space.

    Args:
        attention: ``(B, T, N)`` attention of ``T`` text tokens over ``N`` visual tokens.
        layout: the token layout of the visual tokens.
        out_shape: ``(D, H, W)`` of the model input.
        normalize: scale each heatmap to max 1.

    Returns:
        ``(B, T, D, H, W)`` heatmaps.

    Raises:
        ValueError: when ``N`` does not match the layout.
    """
    b, t, n = attention.shape
    if n != layout.n_tokens:
        raise ValueError(f"attention has {n} visual tokens, layout expects {layout.n_tokens}")
    heat = attention.new_zeros(b, t, *out_shape)
    for start, stop, grid in layout.blocks():
        block = attention[:, :, start:stop].reshape(b * t, 1, *grid)
        cells = float(out_shape[0] * out_shape[1] * out_shape[2]) / float(grid[0] * grid[1] * grid[2])
        up = F.interpolate(block, size=out_shape, mode="trilinear", align_corners=False) / cells
        heat = heat + up.reshape(b, t, *out_shape)
    if normalize:
        heat = heat / heat.flatten(2).amax(dim=-1).clamp_min(1e-12).view(b, t, 1, 1, 1)
    return heat


def region_fraction_per_token(region: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Fraction of each visual token's grid cell that lies inside a region.

    Args:
        region: ``(B, R, D, H, W)`` float masks in [0, 1] (R regions, e.g. nodule + five lobes).
        layout: the token layout.

    Returns:
        ``(B, R, N)``.
    """
    b, r = region.shape[:2]
    parts = []
    for _, _, grid in layout.blocks():
        pooled = F.adaptive_avg_pool3d(region.float(), grid)  # (B, R, Ds, Hs, Ws)
        parts.append(pooled.reshape(b, r, -1))
    return torch.cat(parts, dim=-1)

"""The generated explanation: sentences, per-sentence entropy confidence, deferral, grounding.

Per sentence: mean predictive entropy (nats) of its tokens; confidence = 1 − entropy / log(V).
A sentence is *low-confidence* when its mean entropy exceeds the threshold calibrated on validation
data (``calibration.json`` beside the checkpoint) or the config default. A *key* sentence is one from
which the report labeler reads a clinical fact (nodule presence, size, lobe, type, Lung-RADS). Its
grounding is the mean cross-attention heatmap of its tokens, and its box the extent of the heatmap
above half its maximum, in LPS mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.findings import GridMap
from lungvl_model.models.decoder import Generation
from lungvl_model.models.fusion import TokenLayout, attention_to_heatmap
from lungvl_model.text.labeler import label_report
from lungvl_model.text.tokenizer import sentence_spans_from_ids


@dataclass
class Sentence:
    """One generated sentence.

    Attributes:
        text: the sentence.
        tokens: ``[a, b)`` range of generated token indices.
        mean_entropy: mean predictive entropy of its tokens (nats).
        confidence: ``1 − mean_entropy / log(vocab)`` in [0, 1].
        key: carries a clinical fact (per the labeler).
        low_confidence: entropy above the deferral threshold.
        box_lps: ``[[x0, y0, z0], [x1, y1, z1]]`` LPS mm of the grounding heatmap above half max.
        nodule: index of the finding whose centroid lies in the box (closest), if any.
        heatmap: ``(D, H, W)`` model-grid heatmap (max 1), not serialised.
    """

    text: str
    tokens: tuple[int, int]
    mean_entropy: float
    confidence: float
    key: bool
    low_confidence: bool
    box_lps: list[list[float]] | None = None
    nodule: int | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: v for k, v in self.__dict__.items() if k != "heatmap"}


def is_key_sentence(text: str) -> bool:
    """True when the labeler reads a clinical fact from the sentence."""
    lab = label_report(text)
    return bool(lab.nodules) or lab.lung_rads is not None or lab.nodule_present is not None


def heatmap_box(heat: np.ndarray, grid: GridMap, volume: CTVolume, level: float = 0.5) -> list[list[float]] | None:
    """LPS bounding box (mm) of a model-grid heatmap above ``level`` × max."""
    if not np.isfinite(heat).all() or heat.max() <= 0:
        return None
    idx = np.argwhere(heat >= level * heat.max())
    corners = grid.model_to_src(np.stack([idx.min(0) - 0.5, idx.max(0) + 0.5]))
    lps = volume.voxel_to_lps(corners)
    return [[round(float(v), 1) for v in lps.min(0)], [round(float(v), 1) for v in lps.max(0)]]


def build_sentences(
    generation: Generation,
    tokenizer: Any,
    layout: TokenLayout,
    grid_shape: tuple[int, int, int],
    *,
    threshold: float,
    grid: GridMap,
    volume: CTVolume,
) -> tuple[str, list[Sentence]]:
    """Split the first generated sequence into sentences with confidence and grounding.

    Args:
        generation: output of ``ReportDecoder.generate`` for one study.
        tokenizer: the report tokenizer.
        layout: visual token layout.
        grid_shape: model input ``(D, H, W)``.
        threshold: mean-entropy threshold (nats) above which a sentence is low-confidence.
        grid: model grid ↔ source mapping.
        volume: the source CT.

    Returns:
        ``(text, sentences)``.
    """
    ids = generation.tokens[0]
    keep = generation.mask[0]
    text, _, spans = sentence_spans_from_ids(tokenizer, ids[keep])
    vocab = math.log(max(2, len(tokenizer)))
    ent = generation.entropy[0][keep].float()
    attn = generation.cross_attention[0][keep].float()
    out: list[Sentence] = []
    char_spans = sentence_spans_from_ids(tokenizer, ids[keep])[1]
    for (a, b), (cs, ce) in zip(spans, char_spans, strict=True):
        if b <= a:
            continue
        sent = text[cs:ce].strip()
        if not sent:
            continue
        h = ent[a:b].mean().item()
        heat = None
        box = None
        if attn.shape[-1] == layout.n_tokens and layout.n_tokens > 0:
            mean_attn = attn[a:b].mean(0, keepdim=True).unsqueeze(0)  # (1, 1, N)
            heat = attention_to_heatmap(mean_attn, layout, grid_shape)[0, 0].numpy()
            box = heatmap_box(heat, grid, volume)
        out.append(
            Sentence(
                text=sent,
                tokens=(int(a), int(b)),
                mean_entropy=round(h, 4),
                confidence=round(max(0.0, 1.0 - h / vocab), 4),
                key=is_key_sentence(sent),
                low_confidence=h > threshold,
                box_lps=box,
                heatmap=heat,
            )
        )
    return text, out


@torch.no_grad()
def generate_for_study(
    model: Any, visual_tokens: torch.Tensor, *, max_new_tokens: int, visual_mask: torch.Tensor | None = None
) -> Generation:
    """Greedy generation of the explanation from visual tokens ``(1, N, E)``."""
    return model.decoder.generate(visual_tokens, max_new_tokens=max_new_tokens, visual_mask=visual_mask)

"""Risk and concept heads.

Input: pooled visual features concatenated with an embedding of the explanation text (dropped at
random during training, so the heads also work when the explanation is poor). The concept head
predicts clinical concepts of the dominant nodule (attenuation type, spiculation, calcification,
juxtapleural, roundness, size); the malignancy logit is *decomposed* into a linear function of those
concepts plus a residual from the features, and the decomposition loss keeps the residual small so
the risk is explained by nameable concepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lungvl_model.models.config import HeadsConfig

#: width of the concept vector (type probs 3, spiculated, calcified, juxtapleural, roundness, size).
CONCEPT_DIM = 8
CONCEPT_NAMES = ("solid", "part_solid", "non_solid", "spiculated", "calcified", "juxtapleural", "roundness", "size")


@dataclass
class RiskOutput:
    """Head outputs for a batch.

    Attributes:
        malignancy_logit: ``(B,)``.
        lung_rads_logits: ``(B, 6)`` over 1, 2, 3, 4A, 4B, 4X.
        growth_mm: ``(B,)`` predicted 12-month mean-diameter growth.
        type_logits: ``(B, 3)`` solid / part-solid / non-solid.
        spiculated_logit: ``(B,)``.
        calcified_logit: ``(B,)``.
        juxtapleural_logit: ``(B,)``.
        roundness: ``(B,)`` short/long axis ratio in (0, 1).
        diameter_mm: ``(B,)`` mean diameter of the dominant nodule.
        concept_vector: ``(B, 8)`` the concepts feeding the malignancy decomposition.
        concept_contribution: ``(B, 8)`` each concept's additive contribution to the malignancy logit.
        residual_logit: ``(B,)`` the part of the malignancy logit not explained by concepts.
    """

    malignancy_logit: torch.Tensor
    lung_rads_logits: torch.Tensor
    growth_mm: torch.Tensor
    type_logits: torch.Tensor
    spiculated_logit: torch.Tensor
    calcified_logit: torch.Tensor
    juxtapleural_logit: torch.Tensor
    roundness: torch.Tensor
    diameter_mm: torch.Tensor
    concept_vector: torch.Tensor
    concept_contribution: torch.Tensor
    residual_logit: torch.Tensor


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class RiskHeads(nn.Module):
    """Malignancy, Lung-RADS, growth and concept heads.

    Args:
        visual_dim: width of the pooled visual features.
        text_dim: width of the explanation embedding (0 = image only).
        config: head settings.
        text_dropout: probability of zeroing the text embedding of a sample during training.
    """

    def __init__(self, visual_dim: int, text_dim: int, config: HeadsConfig, text_dropout: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be in [0, 1], got {text_dropout}")
        self.text_dim = text_dim if config.use_text else 0
        self.text_dropout = text_dropout
        d, h = visual_dim + self.text_dim, config.hidden
        self.trunk = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h), nn.GELU())
        self.concepts = nn.Linear(h, 3 + 3 + 2)  # type(3), spic, calc, juxta, roundness, log-size
        self.decompose = nn.Linear(CONCEPT_DIM, 1)
        self.residual = _mlp(h, h, 1)
        self.lung_rads = _mlp(h + CONCEPT_DIM, h, config.n_lung_rads)
        self.growth = _mlp(h + CONCEPT_DIM, h, 1)

    def forward(self, visual: torch.Tensor, text: torch.Tensor | None = None) -> RiskOutput:
        """Heads.

        Args:
            visual: ``(B, Pv)`` pooled visual features.
            text: ``(B, Et)`` explanation embedding, or None (zeros are used).

        Returns:
            The head outputs.
        """
        parts = [visual]
        if self.text_dim:
            if text is None:
                text = visual.new_zeros(visual.shape[0], self.text_dim)
            elif self.training and self.text_dropout > 0:
                keep = (torch.rand(text.shape[0], 1, device=text.device) >= self.text_dropout).to(text.dtype)
                text = text * keep
            parts.append(text)
        h = self.trunk(torch.cat(parts, dim=-1))
        raw = self.concepts(h)
        type_logits = raw[:, :3]
        spic, calc, juxta = raw[:, 3], raw[:, 4], raw[:, 5]
        roundness = torch.sigmoid(raw[:, 6])
        log_size = raw[:, 7]
        diameter = torch.expm1(nn.functional.softplus(log_size)).clamp_max(100.0)
        cvec = torch.cat(
            [
                torch.softmax(type_logits, -1),
                torch.sigmoid(torch.stack([spic, calc, juxta], -1)),
                roundness.unsqueeze(-1),
                (torch.log1p(diameter) / math.log(31.0)).unsqueeze(-1),
            ],
            dim=-1,
        )
        contribution = cvec * self.decompose.weight.view(1, -1)
        residual = self.residual(h).squeeze(-1)
        malignancy = contribution.sum(-1) + self.decompose.bias + residual
        hc = torch.cat([h, cvec], dim=-1)
        return RiskOutput(
            malignancy_logit=malignancy,
            lung_rads_logits=self.lung_rads(hc),
            growth_mm=self.growth(hc).squeeze(-1),
            type_logits=type_logits,
            spiculated_logit=spic,
            calcified_logit=calc,
            juxtapleural_logit=juxta,
            roundness=roundness,
            diameter_mm=diameter,
            concept_vector=cvec,
            concept_contribution=contribution,
            residual_logit=residual,
        )

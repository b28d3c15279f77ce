"""The multi-scale vision-language model (DESIGN.md section 3), one forward per training stage.

Stages: ``"ssl"`` masked-subvolume reconstruction, ``"seg"`` segmentation fine-tune, ``"vl"``
end-to-end (report CE + image–report contrastive + mention grounding + segmentation + risk heads +
concepts). Every stage uses the same module tree, so checkpoints chain from stage to stage.

The decoder learns the FINDINGS and IMPRESSION sections only (``report_sections.decoder_target``), one
finding at a time: each labelled nodule is a slot (:mod:`lungvl_model.models.slots`) and the report's
sentence about it is decoded from ``[slot k, visual tokens]`` with a ``<bos>`` prefix (the kind of
sentence + the slot, ``SlotEncoder.prefix``); the negative sentence from the "no finding" slot when the
study has no nodule; the impression from all its slots (:func:`slot_sequences`). A report without
labelled nodules (weak labels only) is decoded whole from the visual tokens.

Every loss term is a per-study quantity averaged over the batch with fixed weights ``1/B``: the
reconstruction error over the study's own hidden voxels, its Dice + boundary + BCE, the cross-entropy
over its own report tokens, its own grounded mentions, its known risk and concept targets (a study
without a mask, report, mention or label contributes 0 to that term; the divisor stays ``B``). So the
stage loss is ``mean_i study_losses[i]`` and a study's per-sample gradient depends on that study alone
(what DP-SGD's per-study clip needs), with one exception: the image–report InfoNCE term compares each
study with the others of its batch, and DP-SGD switches it off (:func:`privacy.dp_sgd.dp_sgd_ready`).
Training with and without DP-SGD uses these same definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lungvl_model.data.site_layout import LOBE_LABELS, LOBES
from lungvl_model.data.targets import NODULE_ATTRIBUTES
from lungvl_model.losses.multimodal import GroundingLoss, InfoNCELoss, MaskedTargetLoss
from lungvl_model.losses.segmentation import SegmentationLoss
from lungvl_model.models.config import LungVLConfig
from lungvl_model.models.decoder import ReportDecoder, attention_implementation, causal_lm_loss
from lungvl_model.models.fusion import TokenLayout, VisualTokenizer, region_fraction_per_token
from lungvl_model.models.heads import RiskHeads, RiskOutput
from lungvl_model.models.masked_reconstruction import (
    MaskedReconstructionLoss,
    ReconstructionHead,
    mask_subvolumes,
)
from lungvl_model.models.slots import SEQUENCE_KINDS, SlotEncoder, slot_memory
from lungvl_model.models.vision import SegmentationHead, VisionEncoder, VisionOutput
from lungvl_model.text.mentions import N_REGIONS, find_mentions, token_regions
from lungvl_model.text.report_sections import FindingTargets, decoder_target, finding_targets
from lungvl_model.text.tokenizer import encode_reports

STAGES = ("ssl", "seg", "vl")
EMBED_DIM = 128


@dataclass
class LungVLOutput:
    """What a forward pass returns (STYLE.md habit 6).

    Attributes:
        loss: weighted total loss of the stage, a scalar: ``study_losses.mean()`` (fixed weights ``1/B``).
        losses: each term (its batch mean, ``1/B`` weights), detached, for logging.
        seg_logits: ``(B, 1, D, H, W)`` nodule logits (seg/vl stages).
        risk: head outputs (vl stage).
        image_embeds: ``(B, 128)`` normalised image embeddings (vl stage).
        text_embeds: ``(B, 128)`` normalised report embeddings (vl stage).
        cross_attention: ``(B, T, N)`` decoder→visual attention averaged over layers and heads.
        layout: where the visual tokens come from.
        study_losses: ``(B,)`` the weighted total loss of each study (its share of ``loss`` times B), with
            grad; None where no forward ran (an empty DP-SGD batch).
    """

    loss: torch.Tensor
    losses: dict[str, float] = field(default_factory=dict)
    seg_logits: torch.Tensor | None = None
    risk: RiskOutput | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    cross_attention: torch.Tensor | None = None
    layout: TokenLayout | None = None
    study_losses: torch.Tensor | None = None


def region_masks(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounding regions of a batch: nodule mask + one mask per lobe.

    Returns:
        ``(masks (B, 6, D, H, W) float, valid (B, 6) bool)``.
    """
    seg, lobes = batch["seg"], batch["lobes"][:, 0]
    masks = [seg[:, 0].float()] + [(lobes == LOBE_LABELS[k]).float() for k in LOBE_LABELS]
    m = torch.stack(masks, dim=1)
    nonempty = m.flatten(2).amax(-1) > 0
    has = torch.stack([batch["has_mask"]] + [batch["has_lobes"]] * len(LOBE_LABELS), dim=1).bool()
    return m, nonempty & has


def mention_regions(tokenizer: Any, texts: list[str], width: int) -> torch.Tensor:
    """Region of each token of :func:`encode_reports` rows (−1 = not a mention), ``(B, width)``."""
    out = torch.full((len(texts), width), -1, dtype=torch.long)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    for i, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"], strict=True)):
        regions = token_regions([tuple(o) for o in offsets], find_mentions(text))
        row = torch.tensor(regions[: width - 1], dtype=torch.long)
        out[i, 1 : 1 + len(row)] = row  # position 0 is <bos>
    return out


@dataclass(frozen=True)
class SlotSequence:
    """One decoder target of a study.

    Attributes:
        text: the target text (a finding sentence, the negative sentence, the impression or the report).
        slots: slot positions the sequence sees (``K`` = the "no finding" slot; empty: visual tokens only).
        kind: ``"finding"``, ``"negative"``, ``"impression"`` or ``"report"``.
        finding: the slot index of a finding sentence (−1 otherwise).
    """

    text: str
    slots: tuple[int, ...]
    kind: str
    finding: int = -1


@lru_cache(maxsize=4096)
def _finding_targets(text: str, diameters: tuple[float, ...], lobes: tuple[str, ...]) -> FindingTargets:
    return finding_targets(text, diameters, lobes)


def slot_sequences(
    text: str, attributes: torch.Tensor | None, valid: torch.Tensor | None, n_nodules: int
) -> list[SlotSequence]:
    """The decoder targets of one study's report.

    With labelled nodules (``valid`` has any) or a known count of 0 (``n_nodules == 0``): each nodule's
    FINDINGS sentence from its slot, the negative sentence from the "no finding" slot (no nodule only), and
    the IMPRESSION from all slots (or the "no finding" slot). Otherwise, or when none of these targets is
    found in the report, the report's FINDINGS + IMPRESSION decoded from the visual tokens alone.

    Args:
        text: the report ("" for none: no targets).
        attributes: ``(K, A)`` the study's nodule attribute rows (``NODULE_ATTRIBUTES``), or None.
        valid: ``(K,)`` bool, its nodules, or None.
        n_nodules: its labelled nodule count (−1 unknown).

    Returns:
        The sequences, finding sentences first (in slot order).
    """
    if not text.strip():
        return []
    whole = [SlotSequence(decoder_target(text) or text.strip(), (), "report")]
    if attributes is None or valid is None:
        return whole
    k_max = int(valid.shape[0])
    ks = [k for k in range(k_max) if bool(valid[k])]
    if not ks and n_nodules != 0:
        return whole
    col_d, col_l = NODULE_ATTRIBUTES.index("log_diameter"), NODULE_ATTRIBUTES.index("lobe")
    diam = tuple(math.expm1(float(attributes[k, col_d])) for k in ks)
    lobes = tuple(LOBES[int(attributes[k, col_l])] if not math.isnan(float(attributes[k, col_l])) else "" for k in ks)
    ft = _finding_targets(text, diam, lobes)
    out = [SlotSequence(s, (k,), "finding", k) for k, s in zip(ks, ft.sentences, strict=True) if s]
    if not ks and ft.negative:
        out.append(SlotSequence(ft.negative, (k_max,), "negative"))
    if ft.impression:
        out.append(SlotSequence(ft.impression, tuple(ks) or (k_max,), "impression"))
    return out or whole


class LungVLModel(nn.Module):
    """Encoder + segmentation/reconstruction heads + grounded report decoder + risk heads.

    Args:
        config: the model config.
        tokenizer: the trained report tokenizer (its vocabulary sizes the decoder).
    """

    def __init__(self, config: LungVLConfig, tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        v = config.vision
        a = v.aggregation_channels
        self.vision = VisionEncoder(v)
        sep = v.bottleneck_full_resolution
        self.seg_head = SegmentationHead(a, hidden=a, norm_groups=v.norm_groups, prior=0.01, bottleneck=sep)
        self.recon_head = ReconstructionHead(a, hidden=a, norm_groups=v.norm_groups, bottleneck=sep)
        self.visual_tokens = VisualTokenizer(a, config.text.n_embd, config.text.visual_scales)
        self.decoder = ReportDecoder(config.text, tokenizer)
        self.slots = SlotEncoder(a, config.text.n_embd)
        self.image_proj = nn.Linear(self.vision.pooled_channels, EMBED_DIM)
        self.text_proj = nn.Linear(config.text.n_embd, EMBED_DIM)
        self.heads = RiskHeads(self.vision.pooled_channels, config.text.n_embd, config.heads)
        # every term per study, (B,): averaged with fixed weights 1/B in forward (module docstring)
        self.seg_loss = SegmentationLoss(dice_weight=1.0, boundary_weight=0.05, reduction="none")
        self.recon_loss = MaskedReconstructionLoss()
        self.contrastive = InfoNCELoss(reduction="none")
        self.grounding = GroundingLoss(reduction="none")
        self.bce = MaskedTargetLoss("binary", reduction="none")
        self.ce = MaskedTargetLoss("multiclass", reduction="none")
        self.reg = MaskedTargetLoss("regression", reduction="none")

    # ---------------------------------------------------------------- pieces
    def encode_image(self, image: torch.Tensor) -> VisionOutput:
        """Vision encoder on ``(B, 1, D, H, W)``."""
        return self.vision(image)

    def tokens(self, vis: VisionOutput) -> tuple[torch.Tensor, TokenLayout]:
        """Visual tokens ``(B, N, E)`` for the decoder."""
        return self.visual_tokens(vis.scales)

    def finding_slots(
        self, vis: VisionOutput, masks: torch.Tensor, attributes: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Slot tokens ``(B, K + 1, E)`` of findings (masks ``(B, K, D, H, W)`` on the model grid)."""
        return self.slots(vis.scales[0], masks, attributes, valid)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Report embedding ``(B, E)`` (decoder without visual tokens, mean-pooled)."""
        return self.decoder.text_embedding(input_ids, attention_mask)

    # ---------------------------------------------------------------- stages
    def forward(
        self, batch: dict[str, Any], stage: str = "vl", generator: torch.Generator | None = None
    ) -> LungVLOutput:
        """Loss of one stage on a collated batch of :class:`~lungvl_model.data.dataset.SiteDataset`.

        Args:
            batch: ``image``/``seg``/``lobes`` ``(B, 1, D, H, W)``, ``has_mask``/``has_lobes`` ``(B,)``,
                ``targets`` dict, ``text`` list of B strings.
            stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
            generator: RNG for the SSL masks.

        Returns:
            :class:`LungVLOutput` with ``loss`` (scalar), ``study_losses`` ``(B,)`` and the per-term
            batch means in ``losses``; every term is per study, averaged with fixed weights ``1/B``
            (module docstring).
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        image = batch["image"]
        if stage == "ssl":
            masked, mask = mask_subvolumes(image, ratio=0.4, block=8, generator=generator)
            recon = self.recon_head(self.encode_image(masked).scales[0])
            per = self.recon_loss.per_study(recon, image, mask)  # (B,) over each study's own hidden voxels
            loss = per.mean()
            return LungVLOutput(loss=loss, losses={"reconstruction": float(loss.detach())}, study_losses=per)
        vis = self.encode_image(image)
        seg_logits = self.seg_head(vis.scales[0])
        # (B,): Dice + boundary + BCE of each study with a mask, 0 for the others
        seg = self.seg_loss(seg_logits, batch["seg"], batch["has_mask"].bool())
        if stage == "seg":
            loss = seg.mean()
            return LungVLOutput(
                loss=loss, losses={"segmentation": float(loss.detach())}, seg_logits=seg_logits, study_losses=seg
            )
        return self._vl(batch, vis, seg_logits, seg)

    def _vl(
        self, batch: dict[str, Any], vis: VisionOutput, seg_logits: torch.Tensor, seg: torch.Tensor
    ) -> LungVLOutput:
        """The end-to-end stage; ``seg`` is the ``(B,)`` per-study segmentation loss."""
        w = self.config.loss
        texts = [decoder_target(t) if t.strip() else "" for t in batch["text"]]
        has_text = torch.tensor([bool(t.strip()) for t in texts], device=seg.device)
        vt, layout = self.tokens(vis)
        report, grounding, attn = self._report_losses(batch, vis, vt, layout)
        enc = encode_reports(self.tokenizer, [t or " " for t in texts], self.config.text.n_positions)
        ids, am = enc["input_ids"].to(seg.device), enc["attention_mask"].to(seg.device)
        text_emb = self.embed_text(ids, am)
        img_z = F.normalize(self.image_proj(vis.pooled), dim=-1)
        txt_z = F.normalize(self.text_proj(text_emb), dim=-1)
        contrastive = self.contrastive(img_z, txt_z, has_text)  # (B,), couples the batch (off under DP-SGD)
        risk = self.heads(vis.pooled, text_emb * has_text.unsqueeze(1).to(text_emb.dtype))
        t = batch["targets"]
        # (B,) each: the loss of a study's known target, 0 where it is unknown (divisor B, not the known count)
        mal = self.bce(risk.malignancy_logit, t["malignant"])
        lr = self.ce(risk.lung_rads_logits, t["lung_rads"])
        growth = self.reg(risk.growth_mm, t["growth_mm"])
        concepts = (
            self.ce(risk.type_logits, t["nodule_type"])
            + self.bce(risk.spiculated_logit, t["spiculated"])
            + self.bce(risk.calcified_logit, t["calcified"])
            + self.bce(risk.juxtapleural_logit, t["juxtapleural"])
            + self.reg(risk.roundness, t["roundness"])
            + self.reg(torch.log1p(risk.diameter_mm), torch.log1p(t["diameter_mm"]))
            + 0.1 * risk.residual_logit.pow(2)  # decomposition: explain risk by concepts
        )
        terms = {
            "report": (w.report, report),
            "contrastive": (w.contrastive, contrastive),
            "grounding": (w.grounding, grounding),
            "segmentation": (w.segmentation, seg),
            "malignancy": (w.malignancy, mal),
            "lung_rads": (w.lung_rads, lr),
            "growth": (w.growth, growth),
            "concepts": (w.concepts, concepts),
        }
        per_study: torch.Tensor = sum(
            (wt * v.float() for wt, v in terms.values() if wt > 0), start=seg.new_zeros(seg.shape, dtype=torch.float32)
        )
        return LungVLOutput(
            loss=per_study.mean(),
            losses={k: float(v.detach().float().mean()) for k, (_, v) in terms.items()},
            study_losses=per_study,
            seg_logits=seg_logits,
            risk=risk,
            image_embeds=img_z,
            text_embeds=txt_z,
            cross_attention=attn,
            layout=layout,
        )

    def _report_losses(
        self, batch: dict[str, Any], vis: VisionOutput, vt: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-study report cross-entropy and grounding over the study's slot sequences.

        Sequence ``j`` of every study is decoded in one call with batch dimension B (a study without a
        j-th sequence gets ignored labels), so per-sample gradients stay per study. A study's report loss
        is the mean over its sequences of each sequence's mean token cross-entropy (0 without a report);
        its grounding loss the same mean of the sequences' mention-grounding losses.

        Returns:
            ``(report (B,), grounding (B,), attention (B, T, N) of the first sequence over the visual
            tokens, or None without grounding)``.
        """
        w = self.config.loss
        b, device = vt.shape[0], vt.device
        attrs, valid = batch.get("nodule_attrs"), batch.get("nodule_valid")
        n_nod = batch["targets"].get("n_nodules")
        seqs = [
            slot_sequences(
                t,
                None if attrs is None else attrs[i].detach().cpu(),
                None if valid is None else valid[i].detach().cpu().bool(),
                -1 if n_nod is None else int(n_nod[i]),
            )
            for i, t in enumerate(batch["text"])
        ]
        slots = None
        if attrs is not None and valid is not None and any(q.slots for row in seqs for q in row):
            ids_map, masks_ids = batch["nodules"][:, 0], batch["nodule_ids"]  # (B, D, H, W), (B, K)
            masks = (ids_map[:, None] == masks_ids[:, :, None, None, None]) & (masks_ids > 0)[..., None, None, None]
            slots = self.finding_slots(vis, masks.float(), attrs.to(device), valid.to(device).bool())
        need_attn = w.grounding > 0
        impl = "eager" if need_attn else self.config.text.attn_implementation
        regions, region_ok = region_masks(batch) if need_attn else (None, None)
        frac = region_fraction_per_token(regions, layout) if regions is not None else None
        report = vt.new_zeros(b, dtype=torch.float32) + vt.sum() * 0.0
        grounding = report.clone()
        count = torch.zeros(b, device=device)
        first_attn = None
        for j in range(max((len(r) for r in seqs), default=0)):
            has = torch.tensor([len(r) > j for r in seqs], device=device)
            rows = [r[j].text if len(r) > j else " " for r in seqs]
            enc = encode_reports(self.tokenizer, rows, self.config.text.n_positions)
            ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            labels = enc["labels"].to(device).masked_fill(~has.unsqueeze(1), -100)
            memory, mem_mask, p, prefix = vt, None, 0, None
            if slots is not None:
                p = slots.shape[1]
                select = torch.zeros(b, p, dtype=torch.bool, device=device)
                kind = torch.zeros(b, dtype=torch.long, device=device)
                for i, r in enumerate(seqs):
                    if len(r) > j:
                        kind[i] = SEQUENCE_KINDS.index(r[j].kind)
                        if r[j].slots:
                            select[i, list(r[j].slots)] = True
                memory, mem_mask = slot_memory(slots, vt, select)
                prefix = self.slots.prefix(slots, select, kind)
            with attention_implementation(self.decoder.lm, impl):
                out = self.decoder(
                    ids, am, visual_tokens=memory, output_attentions=need_attn, visual_mask=mem_mask, prefix=prefix
                )
            # (B,): each sequence's mean token cross-entropy over its own tokens, never a batch-token mean
            report = report + causal_lm_loss(out.logits, labels, reduction="none") * has
            count = count + has
            if need_attn and out.cross_attentions and frac is not None:
                attn = torch.stack(list(out.cross_attentions), 0).mean(dim=(0, 2))[..., p:]  # (B, T, N)
                tok_regions = mention_regions(self.tokenizer, rows, ids.shape[1]).to(device)
                tok_regions = tok_regions.masked_fill(~has.unsqueeze(1), -1)
                # attention at query t chose token t+1
                grounding = grounding + self.grounding(attn[:, :-1], tok_regions[:, 1:], frac, region_ok)
                assert frac.shape[1] == N_REGIONS
                first_attn = attn if first_attn is None else first_attn
        return report / count.clamp_min(1), grounding / count.clamp_min(1), first_attn

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts per component."""
        parts = {
            "vision": self.vision,
            "seg_head": self.seg_head,
            "recon_head": self.recon_head,
            "fusion": self.visual_tokens,
            "decoder": self.decoder,
            "slots": self.slots,
            "heads": self.heads,
        }
        out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        out["total"] = sum(p.numel() for p in self.parameters())
        return out

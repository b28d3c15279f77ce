"""``findings`` stage: the decoder learns to write each finding's sentence from its slot's measured attributes.

The ``vl`` stage teaches the finding sentences from the sites' few labelled reports (84 in the reference
recipe): too few for the decoder to learn that the lobe, size, type and margin it writes must be the
slot's. This stage trains the decoder and the slot encoder (nothing else) on many pairs of
*attributes → sentence* from the public synthetic report generator
(:func:`~lungvl_model.data.synth.reports.public_reports`): each report's nodule rows become slot
attributes (:func:`~lungvl_model.data.targets.nodule_attributes`) and its sentences the targets
(:func:`~lungvl_model.models.lungvl.slot_sequences`: one sentence per finding from its slot alone, the
negative sentence from the "no finding" slot, the IMPRESSION from all slots), less what no slot attribute
determines (:func:`slot_text`: the emphysema item of an IMPRESSION). The texts come from code, not from any
site.

What the slot and the decoder see besides the attributes is drawn from the sites' studies through the
frozen encoder (:func:`study_bank`): the memory's visual tokens are those of a random study, and each
slot's pooled features those of a random nodule (or, with probability ``NO_MASK_PROB``, the "no mask"
embedding). Neither matches the attributes, so the only way to the right sentence is through the
attributes: the sentence a finding gets is the one its measurements say, whatever the image looks like.
At inference, where the slot's features and the visual tokens are the study's own, nothing changes in
form. The encoder, heads and the other modules are untouched, so the heads trained on the frozen encoder
(nodule risk, candidate filter) stay valid and are carried over by
:func:`~lungvl_model.training.stages.run_stage`.

Held-out check (:func:`sentence_agreement`): greedy finding sentences of reports from another corpus
seed, read back by the report labeler; the share that names the slot's lobe, and the share whose first
stated size is within 15 % of the slot's mean diameter.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lungvl_model.data.site_layout import LOBES
from lungvl_model.data.synth.generator import nodule_row
from lungvl_model.data.synth.reports import public_reports
from lungvl_model.data.targets import NODULE_ATTRIBUTES, nodule_attributes
from lungvl_model.models.decoder import causal_lm_loss
from lungvl_model.models.lungvl import LungVLModel, SlotSequence, slot_sequences
from lungvl_model.models.slots import SEQUENCE_KINDS, masked_average, slot_memory
from lungvl_model.text.labeler import label_report
from lungvl_model.text.tokenizer import encode_reports
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import TrainResult, lr_lambda, resolve_device, seed_everything

__all__ = [
    "HELD_OUT_REPORTS",
    "HELD_OUT_SEED",
    "NO_MASK_PROB",
    "FindingsExample",
    "UNSLOTTED",
    "StudyBank",
    "findings_examples",
    "run_findings_text",
    "sentence_agreement",
    "slot_text",
    "study_bank",
]

#: Corpus seed of the held-out reports of :func:`sentence_agreement` (training uses ``1 + train.seed``).
HELD_OUT_SEED = 7919
#: Chance that a training slot gets the "no mask" embedding instead of a bank feature vector.
NO_MASK_PROB = 0.2
#: Public reports of the held-out check run before and after the stage (about 1.3 finding sentences each).
HELD_OUT_REPORTS = 200
#: Relative tolerance of a stated size in :func:`sentence_agreement` (the fact check's default).
SIZE_TOLERANCE = 0.15

_COL_D, _COL_L = NODULE_ATTRIBUTES.index("log_diameter"), NODULE_ATTRIBUTES.index("lobe")
_LABELER_LOBE = {"lingula": "LUL"}  # the labeler reads the lingula as part of the LUL


#: Statements no slot attribute determines (the impression of a synthetic report names the patient's emphysema):
#: dropped from the targets, so the decoder does not learn to write them at their base rate.
UNSLOTTED = re.compile(r"\bemphysema", re.IGNORECASE)
_ITEM = re.compile(r"^\s*\d+\.\s+")


def slot_text(text: str) -> str:
    """``text`` without the statements :data:`UNSLOTTED` matches, a numbered list renumbered.

    Args:
        text: a target sentence, or an IMPRESSION as numbered lines ("1. ...", "2. ...", one per line).

    Returns:
        The text the slots determine ("" when nothing is left).
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(_ITEM.match(ln) for ln in lines):
        kept = [_ITEM.sub("", ln) for ln in lines if not UNSLOTTED.search(ln)]
        return "\n".join(f"{i}. {ln}" for i, ln in enumerate(kept, start=1))
    return " ".join(s for s in re.split(r"(?<=\.)\s+", text.strip()) if s and not UNSLOTTED.search(s))


@dataclass(frozen=True)
class FindingsExample:
    """One decoder target with its study's slots.

    Attributes:
        attributes: ``(K, A)`` the study's slot attributes (``NODULE_ATTRIBUTES``, NaN unknown/padding).
        valid: ``(K,)`` bool, its findings.
        sequence: the target sentence and the slot positions it is decoded from.
    """

    attributes: torch.Tensor
    valid: torch.Tensor
    sequence: SlotSequence


def findings_examples(n_reports: int, *, seed: int, kinds: Sequence[str] = ("finding", "negative", "impression")
                      ) -> list[FindingsExample]:  # fmt: skip
    """Slot-conditioned targets of ``n_reports`` public synthetic reports.

    Args:
        n_reports: reports to draw (each gives one example per finding sentence, plus its negative sentence
            or IMPRESSION).
        seed: corpus seed.
        kinds: which sequence kinds to keep (of ``SEQUENCE_KINDS``; whole-report targets never).

    Returns:
        The examples, in corpus order.
    """
    bad = [k for k in kinds if k not in SEQUENCE_KINDS or k == "report"]
    if bad:
        raise ValueError(f"findings_examples: kinds {bad} not among {SEQUENCE_KINDS[1:]}")
    out: list[FindingsExample] = []
    for rep in public_reports(n_reports, seed):
        rows = [
            {k: "" if v is None else str(v) for k, v in nodule_row("", "", s, np.zeros(3)).items()} for s in rep.states
        ]
        attrs, ids = nodule_attributes(rows)
        a = torch.tensor(attrs, dtype=torch.float32)
        v = torch.tensor(ids) != 0
        for q in slot_sequences(rep.text, a, v, len(rep.states)):
            text = slot_text(q.text)
            if q.kind in kinds and text:
                out.append(FindingsExample(a, v, replace(q, text=text)))
    return out


@dataclass(frozen=True)
class StudyBank:
    """What the sites' studies look like to the decoder, drawn at random during the stage.

    Attributes:
        visual_tokens: ``(S, N, E)`` each study's visual tokens (float32, CPU).
        features: ``(F, C)`` pooled finest-scale features of the studies' nodules (of whole volumes when no
            study has a nodule mask).
    """

    visual_tokens: torch.Tensor
    features: torch.Tensor


@torch.no_grad()
def study_bank(model: LungVLModel, dataset: Dataset[dict[str, Any]], device: torch.device) -> StudyBank:
    """Visual tokens and pooled nodule features of every study, through the frozen encoder.

    Args:
        model: the model (its encoder and fusion are used in eval mode).
        dataset: a :class:`~lungvl_model.data.dataset.SiteDataset` (items with ``image``, ``nodules``,
            ``nodule_ids``).
        device: where the encoder runs.

    Returns:
        The bank.
    """
    was = model.training
    model.eval()
    tokens, feats, whole = [], [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        vis = model.encode_image(item["image"][None].to(device))
        vt, _ = model.tokens(vis)
        tokens.append(vt[0].float().cpu())
        fine = vis.scales[0]
        ids = item["nodule_ids"]
        ids = ids[ids > 0]
        if len(ids):
            masks = (item["nodules"][0][None] == ids[:, None, None, None]).float()[None].to(device)  # (1, K, D, H, W)
            pooled, has = masked_average(fine, masks)
            feats.append(pooled[0][has[0]].float().cpu())
        whole.append(fine.float().mean(dim=(2, 3, 4)).cpu())
    model.train(was)
    if not tokens:
        raise ValueError("the findings stage needs at least one study for its bank of visual tokens")
    f = torch.cat(feats) if feats and sum(len(x) for x in feats) else torch.cat(whole)
    return StudyBank(torch.stack(tokens), f)


def _slot_inputs(
    examples: Sequence[FindingsExample], bank: StudyBank, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features (B, C, 1, 1, K), masks (B, K, 1, 1, K), visual tokens (B, N, E))`` for a batch.

    Slot ``k`` pools position ``k`` of the feature row (a one-hot mask), i.e. a random bank vector, or gets
    an empty mask ("no mask" embedding) with probability :data:`NO_MASK_PROB`.
    """
    b, k = len(examples), int(examples[0].attributes.shape[0])
    pick = torch.tensor([[rng.randrange(len(bank.features)) for _ in range(k)] for _ in range(b)])
    feats = bank.features[pick].permute(0, 2, 1)[:, :, None, None, :]  # (B, C, 1, 1, K)
    masks = torch.eye(k).expand(b, k, k).clone()
    masks *= torch.tensor([[rng.random() >= NO_MASK_PROB for _ in range(k)] for _ in range(b)], dtype=torch.float32)[
        ..., None
    ]
    vt = bank.visual_tokens[torch.tensor([rng.randrange(len(bank.visual_tokens)) for _ in range(b)])]
    return feats, masks[:, :, None, None, :], vt


def _batch_loss(
    model: LungVLModel, batch: Sequence[FindingsExample], bank: StudyBank, rng: random.Random, device: torch.device
) -> torch.Tensor:
    feats, masks, vt = (t.to(device) for t in _slot_inputs(batch, bank, rng))
    attrs = torch.stack([e.attributes for e in batch]).to(device)
    valid = torch.stack([e.valid for e in batch]).to(device)
    slots = model.slots(feats, masks, attrs, valid)
    select = torch.zeros(slots.shape[:2], dtype=torch.bool, device=device)
    kind = torch.tensor([SEQUENCE_KINDS.index(e.sequence.kind) for e in batch], device=device)
    for i, e in enumerate(batch):
        select[i, list(e.sequence.slots)] = True
    memory, mem_mask = slot_memory(slots, vt, select)
    prefix = model.slots.prefix(slots, select, kind)
    enc = encode_reports(model.tokenizer, [e.sequence.text for e in batch], model.config.text.n_positions)
    out = model.decoder(
        enc["input_ids"].to(device), enc["attention_mask"].to(device), visual_tokens=memory, visual_mask=mem_mask,
        prefix=prefix,
    )  # fmt: skip
    return causal_lm_loss(out.logits, enc["labels"].to(device))


@torch.no_grad()
def sentence_agreement(
    model: LungVLModel, examples: Sequence[FindingsExample], bank: StudyBank, *, device: torch.device, seed: int = 0
) -> dict[str, float]:
    """How often greedy finding sentences state their slot's lobe and size (read back by the report labeler).

    Args:
        model: the model.
        examples: held-out examples; only ``"finding"`` ones are decoded.
        bank: where the visual tokens and slot features are drawn from.
        device: where decoding runs.
        seed: seed of the draws from the bank.

    Returns:
        ``finding_sentences`` (count), ``lobe_agreement`` and ``size_agreement`` (shares in [0, 1]).
    """
    was = model.training
    model.eval()
    rng = random.Random(seed)
    findings = [e for e in examples if e.sequence.kind == "finding" and e.sequence.finding is not None]
    lobe_ok = size_ok = 0
    for e in findings:
        feats, masks, vt = (t.to(device) for t in _slot_inputs([e], bank, rng))
        slots = model.slots(feats, masks, e.attributes[None].to(device), e.valid[None].to(device))
        select = torch.zeros(slots.shape[:2], dtype=torch.bool, device=device)
        k = int(e.sequence.finding)  # type: ignore[arg-type]
        select[0, k] = True
        memory, mem_mask = slot_memory(slots, vt, select)
        prefix = model.slots.prefix(slots, select, torch.tensor([SEQUENCE_KINDS.index("finding")], device=device))
        longest = min(64, model.config.text.n_positions - 1)
        gen = model.decoder.generate(memory, max_new_tokens=longest, visual_mask=mem_mask, prefix=prefix)
        text = model.tokenizer.decode(gen.tokens[0][gen.mask[0]].tolist(), skip_special_tokens=True)
        nods = label_report(f"FINDINGS: {text}").nodules
        lobe = LOBES[int(e.attributes[k, _COL_L])] if not math.isnan(float(e.attributes[k, _COL_L])) else None
        diam = math.expm1(float(e.attributes[k, _COL_D]))
        lobe_ok += bool(nods) and lobe is not None and nods[0].lobe == _LABELER_LOBE.get(lobe, lobe)
        size = nods[0].size_mm if nods else None
        size_ok += size is not None and abs(size - diam) <= SIZE_TOLERANCE * diam
    model.train(was)
    n = max(1, len(findings))
    return {"finding_sentences": float(len(findings)), "lobe_agreement": lobe_ok / n, "size_agreement": size_ok / n}


def run_findings_text(
    model: LungVLModel,
    dataset: Dataset[dict[str, Any]],
    train: TrainConfig,
    *,
    n_reports: int | None = None,
    held_out_reports: int | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TrainResult, dict[str, float]]:
    """Train the decoder and slot encoder on public attribute → sentence pairs (module docstring).

    Args:
        model: the model (trained in place; only ``model.decoder`` and ``model.slots`` change).
        dataset: the sites' studies, for the bank (:func:`study_bank`).
        train: ``max_steps``, ``batch_size`` (sentences per step), ``lr``, ``weight_decay``, ``warmup_steps``,
            ``grad_clip``, ``seed``, ``device``.
        n_reports: public reports to train on (default: enough for each sentence to be seen about once,
            ``max_steps * batch_size / 2``).
        held_out_reports: reports of the held-out check (default :data:`HELD_OUT_REPORTS`; 0: skip it).
        on_step: ``on_step(step, steps, losses)`` after each step.
        log: line logger.

    Returns:
        ``(history, held-out agreement before and after: before_/after_ lobe_agreement, size_agreement)``.
    """
    seed_everything(train.seed)
    device = resolve_device(train.device)
    model.to(device)
    n = n_reports or max(50, train.max_steps * train.batch_size // 2)
    t0 = time.perf_counter()
    examples = findings_examples(n, seed=1 + train.seed)
    n_held = HELD_OUT_REPORTS if held_out_reports is None else held_out_reports
    held = findings_examples(n_held, seed=HELD_OUT_SEED, kinds=("finding",)) if n_held else []
    bank = study_bank(model, dataset, device)
    log(f"findings: {len(examples)} sentences of {n} public reports, bank of {len(bank.visual_tokens)} studies "
        f"({len(bank.features)} nodule feature vectors), {time.perf_counter() - t0:.0f} s")  # fmt: skip
    if not examples:
        raise ValueError("the findings stage drew no finding sentence from the public corpus")
    scores: dict[str, float] = {}
    if held:
        scores.update({f"before_{k}": v for k, v in sentence_agreement(model, held, bank, device=device).items()})
        log("findings held-out agreement before: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [*model.decoder.parameters(), *model.slots.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    rng = random.Random(train.seed)
    order: list[int] = []
    result = TrainResult(stage="findings", device=str(device))
    model.train()
    t0 = time.perf_counter()
    for step in range(train.max_steps):
        if len(order) < train.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[: train.batch_size]]
        del order[: train.batch_size]
        loss = _batch_loss(model, batch, bank, rng, device)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"findings loss became {value} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        logged = {"loss": value, "lr": float(opt.param_groups[0]["lr"])}
        result.history.append(logged)
        result.steps += 1
        result.examples += len(batch)
        if on_step is not None:
            on_step(step + 1, train.max_steps, logged)
    result.seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(True)
    if held:
        scores.update({f"after_{k}": v for k, v in sentence_agreement(model, held, bank, device=device).items()})
        after = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k.startswith("after_"))
        log(f"findings held-out agreement after: {after}")
    return result, scores

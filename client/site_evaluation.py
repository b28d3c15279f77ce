"""Scoring a model on a site's studies: the numbers behind an evaluate reply, and how many studies stand behind each.

:func:`score_studies` runs the model (eval mode, no gradient) over a loader and returns the scalar
metrics a site may send plus, per metric, the number of studies it rests on, so that the site's policy
(:func:`privacy.site_policy.withhold_thin_metrics`) can withhold metrics that stand on too few studies.
:func:`score_reports` does the same for the report warm-up (stage ``text``): the decoder's LM loss on
report texts, no image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import torch

from federation.protocol import NUM_EXAMPLES
from lungvl_model.evaluation.segmentation_metrics import FoundNodules, found_nodule_dice
from lungvl_model.evaluation.site_summary import LUNG_RADS_4A, site_risk_metrics
from lungvl_model.models.lungvl import LungVLModel, LungVLOutput
from lungvl_model.models.report_pretrain import report_corpus, report_lm_loss
from lungvl_model.training.loop import to_device

__all__ = ["score_reports", "score_studies"]

_CONCEPTS: Final = (
    ("spiculated", "spiculated_logit"),
    ("calcified", "calcified_logit"),
    ("juxtapleural", "juxtapleural_logit"),
)


@torch.no_grad()
def score_studies(
    model: LungVLModel,
    loader: Iterable[dict[str, Any]],
    *,
    stage: str,
    device: torch.device,
    generator: torch.Generator,
    group: Callable[[str], str | None],
    max_batches: int | None = None,
) -> tuple[int, dict[str, Any], dict[str, int]]:
    """Score ``model`` on the collated batches of ``loader``.

    Args:
        model: the model (put in eval mode here).
        loader: collated batches (``image`` (B, 1, D, H, W), ``seg``, ``targets``, ``study_uid``...).
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        device: where tensors go.
        generator: seeds the SSL masks.
        group: study UID -> slice-thickness group (or None).
        max_batches: score at most this many batches (all when None).

    Returns:
        ``(n, metrics, support)``: the studies scored; ``num_examples``, ``num_batches``, ``val_loss``
        (mean over studies), ``val_dice`` (seg logits > 0 against the mask, studies with a mask; a
        nodule-free study predicted empty scores 1), ``val_nodule_sensitivity`` (reference nodules the
        prediction touches, over studies with a nodule), ``val_dice_found`` (mean Dice of the found
        nodules, :func:`~lungvl_model.evaluation.segmentation_metrics.found_nodule_dice`),
        ``val_lung_rads_acc`` (studies with a known category) and, in stage vl, the risk-head summary of
        :func:`~lungvl_model.evaluation.site_summary.site_risk_metrics`; and per metric the number of
        studies behind it.
    """
    model.eval()
    n, batches, loss_sum, lr_hits, lr_known = 0, 0, 0.0, 0, 0
    dice: list[float] = []
    nodules: list[FoundNodules] = []  # studies with at least one reference nodule
    risk: dict[str, list[Any]] = {k: [] for k in ("y", "p", "lt", "lp", "ct", "cp", "group")}
    for raw in loader:
        if max_batches is not None and batches >= max_batches:
            break
        batches += 1
        batch = to_device(raw, device)
        out = model(batch, stage=stage, generator=generator)
        b = int(batch["image"].shape[0])
        n += b
        loss_sum += float(out.loss) * b
        if out.seg_logits is not None:
            pred, target = out.seg_logits.float() > 0, batch["seg"] > 0.5
            inter = (pred & target).flatten(1).sum(1).float()
            total = (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).float()
            per_study = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
            dice += per_study[batch["has_mask"].bool()].tolist()
            for i in torch.nonzero(batch["has_mask"].bool()).flatten().tolist():
                per_nodule = found_nodule_dice(pred[i, 0].cpu().numpy(), target[i, 0].cpu().numpy())
                if per_nodule.total:
                    nodules.append(per_nodule)
        if out.risk is not None:
            known = batch["targets"]["lung_rads"] >= 0
            hits = out.risk.lung_rads_logits.argmax(-1) == batch["targets"]["lung_rads"]
            lr_hits += int((hits & known).sum())
            lr_known += int(known.sum())
            _collect_risk(risk, out, batch, group)
    metrics: dict[str, Any] = {NUM_EXAMPLES: n, "num_batches": batches}
    if n:
        metrics["val_loss"] = loss_sum / n
    if dice:
        metrics["val_dice"] = float(np.mean(dice))
    found = [d for f in nodules for d in f.dices]
    if nodules:
        metrics["val_nodule_sensitivity"] = sum(f.found for f in nodules) / sum(f.total for f in nodules)
    if found:
        metrics["val_dice_found"] = float(np.mean(found))
    if lr_known:
        metrics["val_lung_rads_acc"] = lr_hits / lr_known
    if risk["y"]:
        metrics |= site_risk_metrics(
            malignant=risk["y"],
            malignancy_prob=risk["p"],
            lung_rads_true=risk["lt"],
            lung_rads_pred=risk["lp"],
            concepts_true=np.asarray(risk["ct"], dtype=float),
            concepts_pred=np.asarray(risk["cp"], dtype=float),
            groups=risk["group"],
        )
    support = {
        "val_loss": n, "val_dice": len(dice), "val_lung_rads_acc": lr_known, "val_nodule_sensitivity": len(nodules),
        "val_dice_found": sum(1 for f in nodules if f.found), **_risk_support(risk),
    }  # fmt: skip
    return n, metrics, support


@torch.no_grad()
def score_reports(
    model: LungVLModel, texts: Sequence[str], *, batch_size: int, max_batches: int | None = None
) -> tuple[int, dict[str, Any], dict[str, int]]:
    """Score ``model``'s decoder on report texts: the token-weighted LM loss, without visual tokens.

    Each report is cut to what the decoder learns (:func:`~lungvl_model.models.report_pretrain.report_corpus`);
    reports left empty are not scored.

    Args:
        model: the model (put in eval mode here); only its decoder and tokenizer run.
        texts: the reports.
        batch_size: reports per forward pass.
        max_batches: score at most this many batches of ``batch_size`` reports (all when None).

    Returns:
        ``(n, metrics, support)``: the reports scored; ``num_examples``, ``num_batches`` and ``val_loss``
        (mean negative log-likelihood per report token, when ``n > 0``); per metric the reports behind it.
    """
    model.eval()
    corpus = report_corpus(texts)
    if max_batches is not None:
        corpus = corpus[: max(0, max_batches) * batch_size]
    n = len(corpus)
    metrics: dict[str, Any] = {NUM_EXAMPLES: n, "num_batches": math.ceil(n / batch_size)}
    if n:
        metrics["val_loss"] = report_lm_loss(model.decoder, model.tokenizer, corpus, batch_size)
    return n, metrics, {"val_loss": n}


def _collect_risk(
    acc: dict[str, list[Any]], out: LungVLOutput, batch: Mapping[str, Any], group: Callable[[str], str | None]
) -> None:
    """Append a batch's risk-head predictions and targets to ``acc`` (for :func:`site_risk_metrics`)."""
    r, t = out.risk, batch["targets"]
    assert r is not None
    acc["y"] += t["malignant"].float().tolist()
    acc["p"] += torch.sigmoid(r.malignancy_logit.float()).tolist()
    acc["lt"] += t["lung_rads"].tolist()
    acc["lp"] += r.lung_rads_logits.argmax(-1).tolist()
    acc["ct"] += torch.stack([t[k].float() for k, _ in _CONCEPTS], -1).tolist()
    acc["cp"] += torch.stack([(getattr(r, a) > 0).float() for _, a in _CONCEPTS], -1).tolist()
    acc["group"] += [group(uid) for uid in batch["study_uid"]]


def _risk_support(acc: Mapping[str, list[Any]]) -> dict[str, int]:
    """Studies behind each risk-head metric of :func:`site_risk_metrics` (what it counts, per metric)."""
    if not acc["y"]:
        return {}
    y, lt = np.asarray(acc["y"], dtype=float), np.asarray(acc["lt"], dtype=int)
    ct = np.asarray(acc["ct"], dtype=float).reshape(len(y), -1)
    known = ~np.isnan(y)
    out = {
        "val_auc": int(known.sum()),
        "val_ece": int(known.sum()),
        "val_sensitivity": int((lt >= LUNG_RADS_4A).sum()),
        "val_specificity": int(((lt >= 0) & (lt < LUNG_RADS_4A)).sum()),
        "val_concept_f1": int((~np.isnan(ct)).any(axis=1).sum()),
    }
    groups = np.asarray([g or "" for g in acc["group"]])
    for g in sorted(set(groups.tolist()) - {""}):
        out[f"val_auc_{g}"] = int((known & (groups == g)).sum())
    return out

"""Train the nodule risk head (:mod:`lungvl_model.models.nodule_risk`) on a frozen LungVL encoder.

Examples: :func:`~lungvl_model.training.nodule_examples.collect_examples` (labelled nodules with
pooled features, true and measured inputs). Training uses either or both input copies of each nodule
(``RiskTrainConfig.inputs``). Loss: BCE with ``pos_weight`` (``n_negative / n_positive`` by default),
full batch, AdamW, seeded. The residual head's ``correction_scale`` is chosen out of fold
(:func:`choose_correction_scale`: folds by study, ranked by the held-out AUC on the measured inputs) before
the final head is trained on every nodule. :func:`run_risk_stage` (``lungvl train --stage risk --init CKPT``) copies
the checkpoint to ``<out>/checkpoint``, trains, and stores ``nodule_risk.pt`` + ``nodule_risk.json``
there; :func:`score_table` gives per-nodule and per-study (noisy-OR) AUCs with bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lungvl_model.evaluation.classification_metrics import bootstrap_ci, roc_auc
from lungvl_model.models.nodule_features import (
    brock_logit_of,
    brock_vector,
)
from lungvl_model.models.nodule_risk import (
    NoduleRiskConfig,
    NoduleRiskHead,
    noisy_or,
    save_nodule_risk,
)
from lungvl_model.training.nodule_examples import (
    NoduleExample,
    RiskData,
    StudyRecord,
    collect_examples,
    load_frozen_encoder,
    true_inputs,
)

__all__ = [
    "NoduleExample",
    "RiskData",
    "RiskTrainConfig",
    "StudyRecord",
    "baseline_scores",
    "choose_correction_scale",
    "collect_examples",
    "example_tensors",
    "load_frozen_encoder",
    "predict",
    "run_risk_stage",
    "score_table",
    "study_folds",
    "train_nodule_risk",
    "true_inputs",
]

Progress = Callable[[int, int, dict[str, float]], None]
Log = Callable[[str], None]
INPUT_KINDS = ("true", "measured", "both")
#: Correction scales tried out of fold (0 = Brock alone).
SCALE_GRID: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RiskTrainConfig:
    """How the nodule risk head is trained.

    Attributes:
        epochs: full-batch AdamW steps.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        pos_weight: BCE weight of malignant nodules; None = ``n_negative / n_positive``.
        inputs: which Brock inputs each nodule contributes: ``true`` (labels.csv), ``measured``
            (inference measurements) or ``both`` (two examples per nodule).
        seed: seed of the initialisation and dropout (and of the study folds).
        cv_folds: folds (by study) of the out-of-fold choice of the residual head's ``correction_scale``
            (:func:`choose_correction_scale`); 0 keeps the head config's scale.
    """

    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.05
    pos_weight: float | None = None
    inputs: str = "both"
    seed: int = 0
    cv_folds: int = 5

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: naming the key and the value.
        """
        if self.epochs < 1:
            raise ValueError(f"RiskTrainConfig.epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"RiskTrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"RiskTrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.pos_weight is not None and not self.pos_weight > 0:
            raise ValueError(f"RiskTrainConfig.pos_weight must be > 0 or None, got {self.pos_weight}")
        if self.inputs not in INPUT_KINDS:
            raise ValueError(f"RiskTrainConfig.inputs must be one of {INPUT_KINDS}, got {self.inputs!r}")
        if (
            isinstance(self.cv_folds, bool)
            or not isinstance(self.cv_folds, int)
            or self.cv_folds in (1,)
            or self.cv_folds < 0
        ):
            raise ValueError(f"RiskTrainConfig.cv_folds must be 0 or an integer >= 2, got {self.cv_folds!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RiskTrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``KeyError`` naming them."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise KeyError(f"unknown RiskTrainConfig key(s) {sorted(unknown)}")
        return cls(**d)


def example_tensors(
    examples: Sequence[NoduleExample], which: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Stack examples with their ``true`` or ``measured`` inputs (``both``: each twice).

    Returns:
        ``(features (N, F), brock (N, BROCK_DIM), brock_logit (N,), y (N,), source index per row)``;
        an example without measured inputs is left out of ``measured``.
    """
    kinds = ("true", "measured") if which == "both" else (which,)
    feats, vecs, logits, ys, src = [], [], [], [], []
    for kind in kinds:
        for i, ex in enumerate(examples):
            x = ex.true_inputs if kind == "true" else ex.measured_inputs
            if x is None:
                continue
            feats.append(ex.features)
            vecs.append(brock_vector(x))
            logits.append(brock_logit_of(x))
            ys.append(float(ex.malignant))
            src.append(i)
    if not feats:
        raise ValueError(f"no example has {which!r} inputs")
    return (
        torch.as_tensor(np.stack(feats), dtype=torch.float32),
        torch.as_tensor(np.stack(vecs), dtype=torch.float32),
        torch.as_tensor(logits, dtype=torch.float32),
        torch.as_tensor(ys, dtype=torch.float32),
        src,
    )


def train_nodule_risk(
    examples: Sequence[NoduleExample],
    head_config: NoduleRiskConfig,
    train: RiskTrainConfig,
    *,
    progress: Progress | None = None,
) -> tuple[NoduleRiskHead, dict[str, float]]:
    """Train a head on labelled nodules (full batch, BCE with ``pos_weight``).

    Args:
        examples: from :func:`collect_examples` (or built by hand: features ``(feature_dim,)``).
        head_config: the head.
        train: the training settings.
        progress: ``progress(epoch, epochs, {"loss": ...})``.

    Returns:
        ``(head in eval mode, metrics)``.

    Raises:
        ValueError: when the examples hold only one class.
    """
    x, b, bl, y, _ = example_tensors(examples, train.inputs)
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"train_nodule_risk needs malignant and benign nodules, got {n_pos:g} and {n_neg:g}")
    pw = train.pos_weight if train.pos_weight is not None else n_neg / n_pos
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(train.seed)
    head = NoduleRiskHead(head_config)
    head.set_feature_stats(x)
    opt = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    pos_weight = torch.tensor(pw)
    losses = []
    head.train()
    for epoch in range(1, train.epochs + 1):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x, b, bl).logit, y, pos_weight=pos_weight)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(epoch, train.epochs, {"loss": losses[-1]})
    head.eval()
    torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        p = head(x, b, bl).probability.numpy()
    metrics = {
        "examples": float(len(y)),
        "malignant": n_pos,
        "pos_weight": float(pw),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "train_auc": roc_auc(y.numpy().astype(int), p),
    }
    return head, metrics


def study_folds(examples: Sequence[NoduleExample], folds: int, seed: int) -> np.ndarray:
    """Fold index ``(N,)`` of each example: the studies shuffled (seeded) and dealt round-robin.

    All nodules of a study share its fold, so a held-out fold holds whole studies.
    """
    uids = sorted({ex.study_uid for ex in examples})
    order = np.random.default_rng(seed).permutation(len(uids))
    fold_of = {uids[j]: rank % folds for rank, j in enumerate(order)}
    return np.asarray([fold_of[ex.study_uid] for ex in examples], dtype=int)


def choose_correction_scale(
    examples: Sequence[NoduleExample],
    head_config: NoduleRiskConfig,
    train: RiskTrainConfig,
    *,
    grid: Sequence[float] = SCALE_GRID,
) -> tuple[float, dict[str, Any]]:
    """Pick the residual head's ``correction_scale`` by the out-of-fold AUC on the measured inputs.

    For each of ``train.cv_folds`` folds (whole studies, :func:`study_folds`), a head is trained on the other
    folds and its correction predicted for the held-out nodules' *measured* inputs (what inference sees).
    Each scale ``a`` of ``grid`` scores ``brock_logit + a * correction``; the scale with the highest
    out-of-fold AUC wins, the smaller scale on ties, so Brock (``a = 0``) is kept unless the correction
    ranks held-out nodules better.

    Args:
        examples: the training nodules.
        head_config: a residual head config.
        train: training settings (``cv_folds`` >= 2).
        grid: scales to try, each in [0, 1].

    Returns:
        ``(scale, summary)``; ``summary`` has ``folds``, ``nodules`` (with measured inputs), ``auc`` per
        scale, ``brock_auc``, ``chosen`` and ``note`` (why the choice was skipped, else "").

    Raises:
        ValueError: a free (non-residual) head, ``cv_folds`` < 2, or a scale outside [0, 1].
    """
    if not head_config.residual:
        raise ValueError("choose_correction_scale needs a residual head (NoduleRiskConfig.residual=True)")
    if train.cv_folds < 2:
        raise ValueError(f"choose_correction_scale needs RiskTrainConfig.cv_folds >= 2, got {train.cv_folds}")
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"choose_correction_scale: every scale must be in [0, 1], got {list(grid)}")
    measured = [i for i, ex in enumerate(examples) if ex.measured_inputs is not None]
    summary: dict[str, Any] = {"folds": train.cv_folds, "nodules": len(measured), "note": ""}
    fold = study_folds(examples, train.cv_folds, train.seed)
    y_all = np.asarray([ex.malignant for ex in examples], int)
    correction = np.full(len(examples), np.nan)
    brock = np.full(len(examples), np.nan)
    for k in range(train.cv_folds):
        fit_on = [ex for ex, f in zip(examples, fold, strict=True) if f != k]
        held = [i for i in measured if fold[i] == k]
        if not held:
            continue
        ys = {ex.malignant for ex in fit_on}
        if ys != {0, 1}:
            summary["note"] = f"fold {k}: its training part holds one class only; scale kept"
            return head_config.correction_scale, summary
        head, _ = train_nodule_risk(fit_on, head_config, train)
        x, b, bl, _, src = example_tensors([examples[i] for i in held], "measured")
        with torch.no_grad():
            out = head(x, b, bl)
        rows = [held[j] for j in src]
        correction[rows] = out.correction.numpy()
        brock[rows] = bl.numpy()
    ok = np.isfinite(correction)
    y = y_all[ok]
    if len(np.unique(y)) < 2:
        summary["note"] = "the held-out measured nodules hold one class only; scale kept"
        return head_config.correction_scale, summary
    aucs = {float(a): roc_auc(y, brock[ok] + a * correction[ok]) for a in sorted(set(grid))}
    chosen = max(aucs, key=lambda a: (aucs[a], -a))
    summary.update(auc=aucs, brock_auc=roc_auc(y, brock[ok]), chosen=chosen)
    return chosen, summary


def predict(head: NoduleRiskHead, examples: Sequence[NoduleExample], which: str) -> np.ndarray:
    """Head probabilities ``(N,)`` with the ``true`` or ``measured`` inputs (NaN where missing)."""
    out = np.full(len(examples), np.nan)
    x, b, bl, _, src = example_tensors(examples, which)
    with torch.no_grad():
        out[src] = head(x, b, bl).probability.numpy()
    return out


def _auc_ci(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(s) & np.isfinite(y)
    y, s = y[ok].astype(int), s[ok]
    if len(np.unique(y)) < 2:
        return {"auc": math.nan, "low": math.nan, "high": math.nan, "n": int(len(y)), "positives": int(y.sum())}
    auc, lo, hi = bootstrap_ci(roc_auc, y, s, n_boot=1000, seed=0)
    return {"auc": auc, "low": lo, "high": hi, "n": int(len(y)), "positives": int(y.sum())}


def score_table(data: RiskData, scores: dict[str, np.ndarray], empty: float = 0.0) -> dict[str, Any]:
    """Per-nodule and per-study (noisy-OR) AUCs with 95 % bootstrap intervals.

    Args:
        data: the examples and the labelled studies (studies without nodules score ``empty``).
        scores: name → ``(N,)`` nodule probabilities aligned with ``data.examples``.
        empty: study score without nodules.

    Returns:
        ``{"nodule": {name: {...}}, "study": {name: {...}}}``.
    """
    y = np.asarray([ex.malignant for ex in data.examples], float)
    out: dict[str, Any] = {"nodule": {}, "study": {}}
    ys = np.asarray([s.malignant for s in data.studies], float)
    for name, s in scores.items():
        out["nodule"][name] = _auc_ci(y, np.asarray(s, float))
        per = []
        for st in data.studies:
            p = [float(s[i]) for i, ex in enumerate(data.examples) if ex.study_uid == st.study_uid]
            per.append(noisy_or(p, empty) if all(math.isfinite(v) for v in p) else math.nan)
        out["study"][name] = _auc_ci(ys, np.asarray(per))
    return out


def baseline_scores(data: RiskData) -> dict[str, np.ndarray]:
    """Brock probabilities per nodule: ``brock_labels`` (labels.csv), ``brock_true`` and ``brock_measured``."""

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    ex = data.examples
    return {
        "brock_labels": np.asarray([e.label_brock for e in ex], float),
        "brock_true": np.asarray([sig(brock_logit_of(e.true_inputs)) for e in ex]),
        "brock_measured": np.asarray(
            [sig(brock_logit_of(e.measured_inputs)) if e.measured_inputs else math.nan for e in ex]
        ),
    }


def run_risk_stage(
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    init: str | Path,
    train: RiskTrainConfig | None = None,
    head_config: NoduleRiskConfig | None = None,
    on_step: Progress | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """``lungvl train --stage risk``: train the head on a frozen checkpoint and store it beside a copy.

    Args:
        site_dirs: labelled site directories.
        out_dir: output directory; ``<out>/checkpoint`` becomes a copy of ``init`` plus the head files.
        init: the LungVL checkpoint directory (its encoder is used frozen; it is not modified).
        train: training settings.
        head_config: head config (default: the encoder's width, two scales).
        on_step: progress callback.
        log: line logger.

    Returns:
        The metrics (also written to ``<out>/metrics.json``).
    """
    train = train or RiskTrainConfig()
    encoder, model_cfg, meta = load_frozen_encoder(init)
    hc = head_config or NoduleRiskConfig(feature_channels=encoder.out_channels)
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    if ckpt.resolve() != Path(init).resolve():
        shutil.copytree(init, ckpt, dirs_exist_ok=True)
    log(f"risk stage on {init} (stage {meta.get('stage')}): collecting nodules from {len(site_dirs)} site(s)")
    data = collect_examples(encoder, model_cfg.input, site_dirs, config=hc, measured=train.inputs != "true")
    for s in data.skipped[:20]:
        log(f"skipped {s}")
    cv: dict[str, Any] = {"note": "cv_folds = 0: the config's scale kept"}
    scale = hc.correction_scale
    if hc.residual and train.cv_folds:
        scale, cv = choose_correction_scale(data.examples, hc, train)
        log(
            f"correction scale {scale:g} (out-of-fold AUC on measured inputs: "
            + ", ".join(f"{a:g}: {v:.3f}" for a, v in cv.get("auc", {}).items())
            + f"; Brock {cv.get('brock_auc', math.nan):.3f}) {cv['note']}".rstrip()
        )
    head, fit = train_nodule_risk(
        data.examples, dataclasses.replace(hc, correction_scale=1.0) if hc.residual else hc, train, progress=on_step
    )
    head.config = dataclasses.replace(head.config, correction_scale=scale) if hc.residual else head.config
    scores = {**baseline_scores(data), "head_measured": predict(head, data.examples, "measured")}
    metrics = {
        "stage": "risk",
        "summary": fit,
        "correction_scale": {"scale": scale, **cv},
        "in_sample": score_table(data, scores, hc.empty_study_probability),
        "nodules": len(data.examples),
        "studies": len(data.studies),
        "skipped": data.skipped,
    }
    save_nodule_risk(
        ckpt,
        head,
        {"train": train.to_dict(), "metrics": metrics, "sites": [str(s) for s in site_dirs], "init": str(init)},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    log(f"wrote {ckpt / 'nodule_risk.pt'}, {ckpt / 'nodule_risk.json'}, {out / 'metrics.json'}")
    return metrics

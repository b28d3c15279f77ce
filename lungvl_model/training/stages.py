"""``lungvl train``: one stage on one or more site directories, from a preset or a previous stage.

Stages chain through checkpoints: ``text`` (report warm-up, optional) → ``ssl`` → ``seg`` → ``vl`` →
``findings`` (finding sentences from slot attributes, :mod:`~lungvl_model.training.findings_text`);
each ``--init`` is the previous stage's checkpoint directory. ``findings`` changes only the decoder and
the slot encoder, so it carries the init checkpoint's encoder-bound heads (nodule risk, candidate
filter) over.

The first stage of a central run trains the report tokenizer on the given sites' reports
(:func:`build_model`): central training runs where the data is, and its tokenizer, like its weights, stays
there. Later stages reuse the checkpoint's tokenizer. A model that other sites receive (the federation's
initial model) is built by :func:`build_public_model`: its tokenizer is trained on the public synthetic report
corpus only.

Outputs in ``out_dir``: ``checkpoint/`` (see :mod:`lungvl_model.training.checkpoint`), ``config.json``
(resolved model + training config, sites, init), ``metrics.json`` (summary and per-step history) and
``loss_curve.png``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.crops import ForegroundCrops
from lungvl_model.data.dataset import SiteDataset
from lungvl_model.data.synth.reports import public_report_corpus
from lungvl_model.inference.candidate_filter import FILENAME as CANDIDATE_FILTER_FILE
from lungvl_model.models.config import LungVLConfig
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.models.nodule_risk import RISK_FILES
from lungvl_model.models.report_pretrain import pretrain_reports
from lungvl_model.text.tokenizer import train_tokenizer
from lungvl_model.training.checkpoint import load_checkpoint, save_checkpoint
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.findings_text import run_findings_text
from lungvl_model.training.loop import StepCallback, TrainResult, seed_everything, train_stage

Log = Callable[[str], None]

#: The corpus the federation's initial model trains its tokenizer on (checkpoint meta ``tokenizer_corpus``).
PUBLIC_TOKENIZER_CORPUS = "lungvl synthetic report generator (public)"
#: Files beside a checkpoint that depend on its encoder only, carried over by stages that keep the encoder.
CARRIED_FILES: tuple[str, ...] = (*RISK_FILES, CANDIDATE_FILTER_FILE)
#: Reports of :func:`~lungvl_model.data.synth.reports.public_report_corpus` behind that tokenizer.
PUBLIC_CORPUS_REPORTS = 2000


@dataclass
class StageRun:
    """Result of :func:`run_stage`."""

    out_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]


def site_reports(site_dirs: Sequence[str | Path]) -> list[str]:
    """All report texts of the usable studies of ``site_dirs``."""
    texts = []
    for d in site_dirs:
        texts += [e.report.text for e in build_catalogue(d).usable if e.report is not None]
    return texts


def seg_crops(dataset: SiteDataset, train: TrainConfig) -> Dataset[dict[str, Any]]:
    """``dataset`` as foreground-biased crops when ``train`` asks for them in the seg stage, else unchanged."""
    if train.stage != "seg" or train.seg_crop is None:
        return dataset
    return ForegroundCrops(
        dataset, train.seg_crop, train.seg_fg_prob, seed=train.seed, hard_negative_prob=train.seg_hard_negative_prob
    )


def build_model(
    config: LungVLConfig, site_dirs: Sequence[str | Path], *, seed: int = 0, extra_texts: Sequence[str] = ()
) -> LungVLModel:
    """A fresh model whose tokenizer is trained on the sites' reports (and ``extra_texts``).

    For central training on one's own sites (``lungvl train``): the tokenizer is then derived from
    those reports without DP, which is fine as long as the model never leaves where the reports are.
    Do not ship such a model to other sites; a federation starts from :func:`build_public_model`.
    """
    texts = [*site_reports(site_dirs), *extra_texts]
    if len(texts) < 2:
        raise ValueError(
            f"need at least 2 reports to train the tokenizer, found {len(texts)} in {list(map(str, site_dirs))}"
        )
    seed_everything(seed)
    tok = train_tokenizer(texts, vocab_size=config.text.vocab_size)
    return LungVLModel(config, tok)


def build_public_model(config: LungVLConfig, *, seed: int = 0, n_reports: int = PUBLIC_CORPUS_REPORTS) -> LungVLModel:
    """A fresh model whose tokenizer is trained on the public synthetic report corpus only.

    The federation's initial model: every site receives its tokenizer, so no site's reports may shape
    it (a vocabulary learned from a site's text, without DP, would leak its frequent strings). The corpus
    is :func:`~lungvl_model.data.synth.reports.public_report_corpus` (``n_reports`` reports, corpus
    seed 0 whatever ``seed`` is, so every seed's model shares one vocabulary); record
    :func:`public_model_meta` in its checkpoint.

    Args:
        config: the model config.
        seed: seed of the weights' initialisation.
        n_reports: size of the corpus.
    """
    texts = public_report_corpus(n_reports, seed=0)
    seed_everything(seed)
    tok = train_tokenizer(texts, vocab_size=config.text.vocab_size)
    return LungVLModel(config, tok)


def public_model_meta(n_reports: int = PUBLIC_CORPUS_REPORTS) -> dict[str, Any]:
    """Checkpoint meta of a :func:`build_public_model` model: where its tokenizer's vocabulary comes from."""
    return {
        "tokenizer_corpus": PUBLIC_TOKENIZER_CORPUS,
        "tokenizer_corpus_reports": n_reports,
        "tokenizer_corpus_seed": 0,
    }


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss curves (each term, moving average over 5 steps) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = sorted({k for h in history for k in h} - {"lr"})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ys = np.array([h.get(k, np.nan) for h in history], dtype=float)
        if np.all(np.isnan(ys)):
            continue
        kernel = np.ones(min(5, len(ys))) / min(5, len(ys))
        ax.plot(
            np.arange(1, len(ys) + 1)[len(kernel) - 1 :],
            np.convolve(ys, kernel, mode="valid"),
            label=k,
            lw=2 if k == "loss" else 1,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_stage(
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    train: TrainConfig,
    *,
    config: LungVLConfig | None = None,
    init: str | Path | None = None,
    on_step: StepCallback | None = None,
    log: Log = print,
) -> StageRun:
    """Train one stage and write its checkpoint, config, metrics and loss plot.

    Args:
        site_dirs: site directories to train on.
        out_dir: output directory.
        train: training settings (``train.stage`` picks the stage).
        config: model config for a fresh model (ignored when ``init`` is given).
        init: checkpoint directory of the previous stage.
        on_step: progress callback.
        log: line logger.

    Returns:
        Where the checkpoint went and the metrics.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if init is not None:
        model, init_meta = load_checkpoint(init)
        log(f"initialised from {init} (stage {init_meta.get('stage')}, {init_meta.get('steps')} steps)")
    else:
        if config is None:
            raise ValueError("run_stage needs a model config (preset) or an --init checkpoint")
        model = build_model(config, site_dirs, seed=train.seed)
        init_meta = {}
    cfg = model.config
    resolved = {
        "model": cfg.to_dict(),
        "train": train.to_dict(),
        "sites": [str(s) for s in site_dirs],
        "init": str(init) if init else None,
    }
    (out / "config.json").write_text(json.dumps(resolved, indent=2))
    if train.stage == "text":
        texts = site_reports(site_dirs)
        history: list[dict[str, float]] = []
        summary = pretrain_reports(
            texts,
            model.tokenizer,
            model.decoder,
            steps=train.max_steps,
            batch_size=max(2, train.batch_size),
            lr=train.lr,
            seed=train.seed,
            progress=lambda s, m: (history.append(dict(m)), on_step and on_step(s, train.max_steps, m)),
        )
        result = TrainResult(stage="text", steps=train.max_steps, history=history)
        metrics: dict[str, Any] = {"summary": summary, "history": history}
    elif train.stage == "findings":
        if init is None:
            raise ValueError("the findings stage needs --init: a checkpoint whose encoder gives the visual tokens")
        dataset = SiteDataset(site_dirs, cfg.input)
        result, agreement = run_findings_text(model, dataset, train, on_step=on_step, log=log)
        metrics = {"summary": {**result.summary(), **agreement}, "history": result.history}
    else:
        dataset = SiteDataset(site_dirs, cfg.input, require_report=train.stage == "vl")
        log(f"stage {train.stage}: {len(dataset)} studies from {len(site_dirs)} site(s), input {cfg.input.size}")
        result = train_stage(model, seg_crops(dataset, train), train, on_step=on_step)
        metrics = {"summary": result.summary(), "history": result.history}
    metrics["stage"] = train.stage
    metrics["init_stage"] = init_meta.get("stage")
    ckpt = save_checkpoint(
        out / "checkpoint",
        model.cpu(),
        {
            "stage": train.stage,
            "steps": result.steps,
            "train": train.to_dict(),
            "history_stages": [*init_meta.get("history_stages", []), train.stage],
            "summary": metrics["summary"],
            "sites": resolved["sites"],
        },
    )
    if train.stage == "findings" and init is not None:
        carried = [n for n in CARRIED_FILES if (Path(init) / n).is_file()]
        for name in carried:
            shutil.copy2(Path(init) / name, ckpt / name)
        if carried:
            log(f"carried over from {init} (encoder unchanged): {', '.join(carried)}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    if metrics["history"]:
        plot_history(metrics["history"], out / "loss_curve.png", f"stage {train.stage}")
    log(f"wrote {ckpt}, {out / 'metrics.json'}, {out / 'loss_curve.png'}")
    return StageRun(out, ckpt, metrics)

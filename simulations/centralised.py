"""The centralised baseline: one model trained on the union of all sites' studies, recorded like a run.

The data-pooling upper bound of the federation: the same initial model, optimiser (AdamW, global-norm
clip as at a site), batch size, stage, patches and learning rate of each round (the federated
curriculum's schedule, :meth:`~server.config.ServerConfig.round_config`), with the federation's total
step budget: a federated round runs ``local_steps`` steps at each of the ``m`` sampled sites, so a
centralised "round" runs ``m · local_steps`` steps on batches drawn from the pooled studies. The
optimiser's state carries over from round to round within a stage and starts afresh with each new
stage; the ``text`` stage warms the decoder up on the pooled training studies' reports
(:func:`~lungvl_model.models.report_pretrain.pretrain_reports`). After each round the
model is evaluated on every site's studies with the site trainer's own evaluation (so the numbers are
comparable with the federated cells) and recorded under ``site:<name>`` and ``global`` (example-weighted
means).

No DP: pooling the data leaves no site boundary to protect; a scenario with DP-SGD is refused and
client-level DP settings are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from client.trainer import GRAD_CLIP
from federation.arrays import model_to_arrays
from federation.protocol import RoundConfig
from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.dataset import SiteDataset
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.models.report_pretrain import CoherenceHead, pretrain_reports
from lungvl_model.training.checkpoint import load_checkpoint
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import build_optimizer, cycle, make_loader, resolve_device, run_steps, seed_everything
from lungvl_model.training.stages import seg_crops
from server.config import round_seed
from server.registry import Registry
from simulations.local_only import Recorder, baseline_sites, make_round_config
from simulations.scenario import Scenario
from simulations.simulate import simulation_env

__all__ = ["run_centralised", "steps_per_round"]

Progress = Callable[[str], None]


def steps_per_round(scenario: Scenario, rnd: int = 1) -> int:
    """Centralised steps of round ``rnd``: its ``local_steps`` × the sites a federated round samples."""
    return scenario.server.round_config(rnd).local_steps * scenario.server.sample_size(len(scenario.sites))


class _PooledStages:
    """The centralised model's training, one round at a time, switching data and optimiser with the stage.

    Args:
        model: the model (on ``device``).
        site_dirs: the sites' directories.
        pooled: StudyInstanceUIDs of the sites' training studies.
        device: where training runs.
    """

    def __init__(self, model: LungVLModel, site_dirs: list[Path], pooled: list[str], device: torch.device) -> None:
        self.model, self.site_dirs, self.pooled, self.device = model, site_dirs, pooled, device
        self._key: tuple[str, int, float, float] | None = None
        self._batches: Iterator[dict[str, Any]] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._head: CoherenceHead | None = None
        self.studies = 0

    def reports(self) -> list[str]:
        """The report texts of the pooled training studies."""
        keep = set(self.pooled)
        return [
            e.report.text
            for d in self.site_dirs
            for e in build_catalogue(d).usable
            if e.study_uid in keep and e.report is not None
        ]

    def run(self, rc: RoundConfig, steps: int, seed: int) -> list[float]:
        """Train ``steps`` steps of ``rc``'s stage at ``rc.lr``; returns the per-step losses."""
        if rc.stage == "text":
            if self._head is None:
                self._head = CoherenceHead(self.model.decoder.n_embd)
            losses: list[float] = []
            texts = self.reports()
            self.studies = len(texts)
            pretrain_reports(
                texts, self.model.tokenizer, self.model.decoder, steps=steps, batch_size=max(2, rc.batch_size),
                lr=rc.lr, seed=seed, head=self._head, eval_size=0, progress=lambda _, m: losses.append(m["loss"]),
            )  # fmt: skip
            self._key = None
            return losses
        key = (rc.stage, rc.seg_patch, rc.seg_fg_prob, rc.seg_hard_negative_prob)
        if key != self._key:  # a new stage (or patch sampling): its data and a fresh optimiser
            data = SiteDataset(self.site_dirs, self.model.config.input, studies=self.pooled,
                               require_report=rc.stage == "vl")  # fmt: skip
            self.studies = len(data)
            patch = (rc.seg_patch,) * 3 if rc.stage == "seg" and rc.seg_patch else None
            train = TrainConfig(stage=rc.stage, max_steps=steps, batch_size=rc.batch_size, lr=rc.lr, seed=seed,
                                seg_crop=patch, seg_fg_prob=rc.seg_fg_prob,
                                seg_hard_negative_prob=rc.seg_hard_negative_prob)  # fmt: skip
            self._batches = cycle(make_loader(seg_crops(data, train), train))
            self._optimizer = build_optimizer(self.model, train)
            self._key = key
        assert self._batches is not None and self._optimizer is not None
        for group in self._optimizer.param_groups:  # the round's scheduled rate
            group["lr"] = rc.lr
        result = run_steps(
            self.model, self._batches, self._optimizer, stage=rc.stage, steps=steps, device=self.device,
            grad_clip=GRAD_CLIP, bf16=True, seed=seed,
        )  # fmt: skip
        return [h["loss"] for h in result.history]


def run_centralised(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    db_url: str | None = None,
    init_model: str | Path | None = None,
    run_config: Mapping[str, Any] | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train one model on the pooled studies of ``scenario``'s sites and record it in the registry.

    Args:
        scenario: the federation (sites, model, rounds, local steps, lr, batch size).
        out_dir: output directory (sites, ``config.json``, metrics CSVs, ``convergence.png``).
        db_url: registry URL or SQLite path (default ``out_dir/registry.db``).
        init_model: initial model package (default: built from the scenario into ``out_dir/initial_model``).
        run_config: extra keys for the registry run's config (e.g. a study's cell tag under ``"study"``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        progress: line printer (default ``print``).

    Returns:
        ``{"run_id", "status", "rounds_done", "seconds", "out_dir", "global"}``.

    Raises:
        ValueError: the scenario asks for DP-SGD.
    """
    log = progress or print
    c = scenario.server
    if c.dp_sgd:
        raise ValueError("the centralised baseline has no DP-SGD: set dp_sgd = false in the scenario")
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = db_url or str(out / "registry.db")
    with simulation_env(out):
        sites, model_dir, evaluators = baseline_sites(scenario, out, init_model, log)
        model, _ = load_checkpoint(model_dir)
        dev = resolve_device(device)
        model.to(dev)
        pooled = [uid for t in evaluators.values() for uid in t.split()[0]]  # the sites' training studies only
        seed_everything(c.seed)
        trainer = _PooledStages(model, list(sites.values()), pooled, dev)
        config = {
            "kind": "centralised",
            "scenario": scenario.to_dict(),
            "server": c.to_dict(),
            "initial_model": str(model_dir),
            "steps_per_round": [steps_per_round(scenario, r) for r in range(1, scenario.rounds + 1)],
            "studies": len(pooled),
            **(run_config or {}),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        log(f"centralised: {len(pooled)} pooled training studies from {len(sites)} site(s)")
        with Registry(db) as reg:
            rec = Recorder(reg, f"{scenario.name}/centralised", config, scenario.seed)
            try:
                glob: dict[str, float] = {}
                for rnd in range(1, scenario.rounds + 1):
                    rc = make_round_config(c, rnd)
                    steps = steps_per_round(scenario, rnd)
                    losses = trainer.run(rc, steps, round_seed(c.seed, rnd))
                    arrays = model_to_arrays(model)
                    evals = {k: t.evaluate(arrays, rc) for k, t in evaluators.items()}
                    loss = sum(losses) / max(1, len(losses))
                    glob = rec.round(rnd, evals)
                    reg.record_metrics(rec.run_id, rnd, "global", {"train_loss": loss})
                    glob["train_loss"] = loss
                    shown = ", ".join(f"{n} {glob[n]:.4g}" for n in ("train_loss", "val_loss", "val_auc") if n in glob)
                    pooled_n = f"{steps} steps on {trainer.studies} pooled"
                    log(f"round {rnd}: {rc.stage} stage, centralised, {pooled_n}: {shown}")
            except BaseException:
                rec.finish("failed")
                raise
            finally:
                for t in evaluators.values():
                    t.close()
            return rec.wrap_up(out, f"{scenario.name} centralised", scenario.rounds, t0, glob, log)

"""The centralised baseline: one model trained on the union of all sites' studies, recorded like a run.

The data-pooling upper bound of the federation: the same initial model, optimiser (AdamW, constant lr,
global-norm clip as at a site), batch size and stage, with the federation's total step budget: a
federated round runs ``local_steps`` steps at each of the ``m`` sampled sites, so a centralised
"round" runs ``m · local_steps`` steps on batches drawn from the pooled studies. After each round the
model is evaluated on every site's studies with the site trainer's own evaluation (so the numbers are
comparable with the federated cells) and recorded under ``site:<name>`` and ``global`` (example-weighted
means).

No DP: pooling the data leaves no site boundary to protect; a scenario with DP-SGD is refused and
client-level DP settings are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from client.trainer import GRAD_CLIP
from federation.arrays import model_to_arrays
from lungvl_model.data.dataset import SiteDataset
from lungvl_model.training.checkpoint import load_checkpoint
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import build_optimizer, cycle, make_loader, resolve_device, run_steps, seed_everything
from server.config import round_seed
from server.registry import Registry
from simulations.local_only import Recorder, initial_model, make_round_config, site_trainers
from simulations.scenario import Scenario
from simulations.simulate import prepare_sites, simulation_env

__all__ = ["run_centralised", "steps_per_round"]

Progress = Callable[[str], None]


def steps_per_round(scenario: Scenario) -> int:
    """Centralised steps per round: ``local_steps`` × the sites a federated round samples."""
    return scenario.server.local_steps * scenario.server.sample_size(len(scenario.sites))


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
    steps = steps_per_round(scenario)
    with simulation_env(out):
        sites = prepare_sites(scenario, out, log)
        model_dir = (
            Path(init_model) if init_model is not None else initial_model(scenario, sites, out / "initial_model")
        )
        evaluators = site_trainers(
            sites, model_dir, out / "state", scenario.holdout_fraction, scenario.min_eval_studies
        )
        model, _ = load_checkpoint(model_dir)
        dev = resolve_device(device)
        model.to(dev)
        pooled = [uid for t in evaluators.values() for uid in t.split()[0]]  # the sites' training studies only
        data = SiteDataset(list(sites.values()), model.config.input, studies=pooled, require_report=c.stage == "vl")
        train = TrainConfig(
            stage=c.stage, max_steps=steps, batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=device
        )
        seed_everything(c.seed)
        optimizer = build_optimizer(model, train)
        batches = cycle(make_loader(data, train))
        config = {
            "kind": "centralised",
            "scenario": scenario.to_dict(),
            "server": c.to_dict(),
            "initial_model": str(model_dir),
            "steps_per_round": steps,
            "studies": len(data),
            **(run_config or {}),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        log(f"centralised: {len(data)} pooled studies from {len(sites)} site(s), {steps} steps per round")
        with Registry(db) as reg:
            rec = Recorder(reg, f"{scenario.name}/centralised", config, scenario.seed)
            try:
                glob: dict[str, float] = {}
                for rnd in range(1, scenario.rounds + 1):
                    result = run_steps(
                        model, batches, optimizer, stage=c.stage, steps=steps, device=dev,
                        grad_clip=GRAD_CLIP, bf16=train.bf16, seed=round_seed(c.seed, rnd),
                    )  # fmt: skip
                    arrays = model_to_arrays(model)
                    rc = make_round_config(c, rnd)
                    evals = {k: t.evaluate(arrays, rc) for k, t in evaluators.items()}
                    loss = sum(h["loss"] for h in result.history) / max(1, len(result.history))
                    glob = rec.round(rnd, evals)
                    reg.record_metrics(rec.run_id, rnd, "global", {"train_loss": loss})
                    glob["train_loss"] = loss
                    shown = ", ".join(f"{n} {glob[n]:.4g}" for n in ("train_loss", "val_loss", "val_auc") if n in glob)
                    log(f"round {rnd}: centralised, {steps} steps on the pooled studies: {shown}")
            except BaseException:
                rec.finish("failed")
                raise
            finally:
                for t in evaluators.values():
                    t.close()
            return rec.wrap_up(out, f"{scenario.name} centralised", scenario.rounds, t0, glob, log)

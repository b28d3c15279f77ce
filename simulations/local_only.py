"""The local-only baseline: every site trains alone for the federation's rounds, recorded like a run.

Each site's model starts from the same initial model package as the federation and runs, per round,
exactly the local training a federated site runs (:meth:`client.trainer.SiteTrainer.fit` with the
round's :class:`~federation.protocol.RoundConfig`, DP-SGD included when the scenario asks
for it), but keeps its own weights instead of receiving an aggregate. Reusing the site trainer rather
than a second training loop keeps the comparison fair: same optimiser, steps, clipping, seeds and
evaluation code as the federated cells (Flower is not involved: there is nothing to exchange).

Registry records (one run, the same tables a federated run fills, so reports read both alike):

* ``site:<k>`` after each round: site ``k``'s training metrics and its model's evaluation on its own
  studies (``val_*``); after the last round also ``xval_*``, the example-weighted mean of the same
  model's evaluation on the *other* sites' studies (how far a site-only model transfers);
* ``global``: example-weighted means over sites of the above (as the federated ``global`` scope);
* participation (one ``ok`` row per site and round), rounds, patient-level ε of DP-SGD sites.

Client-level DP settings of the scenario do not apply (nothing is aggregated) and are ignored.

:func:`run_initial` records the other reference, the initial model scored by every site before any
training (a one-round run of its own).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.app import SiteEndpoint
from client.trainer import SiteTrainer
from federation.arrays import model_to_arrays
from federation.metrics import weighted_means
from federation.protocol import RoundConfig
from lungvl_model.training.checkpoint import save_checkpoint
from lungvl_model.training.stages import build_public_model, public_model_meta
from server.config import ServerConfig
from server.registry import Registry
from simulations.scenario import Scenario
from simulations.simulate import plot_convergence, prepare_sites, simulation_env

__all__ = [
    "Recorder",
    "baseline_sites",
    "initial_model",
    "make_round_config",
    "run_initial",
    "run_local_only",
    "site_trainers",
]

Progress = Callable[[str], None]


def initial_model(scenario: Scenario, sites: Mapping[str, Path], target: Path, *, seed: int | None = None) -> Path:
    """The initial model package in ``target`` (built with ``seed``, default the scenario's; reused when present).

    Its tokenizer is trained on the public synthetic report corpus only (no site's reports), as the
    federation's (:func:`~lungvl_model.training.stages.build_public_model`).
    """
    if (target / "model.pt").exists():
        return target
    s = scenario.seed if seed is None else seed
    model = build_public_model(scenario.model_config(), seed=s)
    meta = {"stage": "init", "seed": s, **public_model_meta(), "sites": sorted(sites)}
    save_checkpoint(target, model, meta)
    return target


def site_trainers(
    sites: Mapping[str, Path],
    model_dir: Path,
    state_root: Path,
    holdout_fraction: float | None = None,
    min_eval_studies: int | None = None,
) -> dict[str, SiteTrainer]:
    """One :class:`SiteTrainer` per site (state, i.e. DP-SGD accountant and ledger, under ``state_root/<name>``).

    ``holdout_fraction`` and ``min_eval_studies`` override the sites' own (the scenario's ``[run]``).
    """
    return {
        name: SiteTrainer(
            SiteEndpoint(site_dir, model_dir, state_root / name, holdout_fraction, min_eval_studies).client_config()
        )
        for name, site_dir in sites.items()
    }


def baseline_sites(
    scenario: Scenario, out: Path, init_model: str | Path | None, log: Progress
) -> tuple[dict[str, Path], Path, dict[str, SiteTrainer]]:
    """A baseline run's sites: generated or found, the initial model package, one trainer per site.

    Args:
        scenario: the federation.
        out: the run directory (generated sites, ``initial_model`` when none is given, ``state/<site>``).
        init_model: the initial model package (None: built from the scenario into ``out/initial_model``).
        log: line printer.

    Returns:
        ``(site dirs, model_dir, {site name: SiteTrainer})`` (trainers hold the scenario's hold-out settings).
    """
    sites = prepare_sites(scenario, out, log)
    model_dir = Path(init_model) if init_model is not None else initial_model(scenario, sites, out / "initial_model")
    trainers = site_trainers(sites, model_dir, out / "state", scenario.holdout_fraction, scenario.min_eval_studies)
    return dict(sites), model_dir, trainers


def make_round_config(server: ServerConfig, rnd: int, *, dg_penalty: float = 0.0, dro_step: float = 0.0) -> RoundConfig:
    """The round config a federated server would send in round ``rnd`` (same fields, same round seed)."""
    if dg_penalty or dro_step:
        server = server.with_updates(dg_penalty=dg_penalty, dro_step=dro_step)
    return server.round_config(rnd)


class Recorder:
    """Writes a baseline run into the registry the way the federated server does (rounds, metrics, ε)."""

    def __init__(self, registry: Registry, name: str, config: Mapping[str, Any], seed: int) -> None:
        self.registry = registry
        self.run_id = registry.start_run(name, dict(config), seed=seed)

    def round(
        self,
        rnd: int,
        site_rows: Mapping[str, tuple[int, Mapping[str, float]]],
        *,
        train: Mapping[str, tuple[int, Mapping[str, float]]] | None = None,
        update_norm: float | None = None,
    ) -> dict[str, float]:
        """Record round ``rnd``: per-site metrics and their ``global`` example-weighted means (returned)."""
        reg, run = self.registry, self.run_id
        reg.start_round(run, rnd, sampled=len(train or site_rows))
        for name, (n, m) in (train or {}).items():
            reg.record_participation(
                run, rnd, node_id=name, site_name=name, status="ok", num_examples=n,
                seconds=m.get("seconds"), update_norm=m.get("update_norm"),
            )  # fmt: skip
            reg.record_metrics(run, rnd, f"site:{name}", {k: float(v) for k, v in m.items() if math.isfinite(v)})
            if "epsilon" in m and "delta" in m:
                reg.record_privacy(
                    run, rnd, level="sample", site_name=name, epsilon=m["epsilon"], delta=m["delta"],
                    noise_multiplier=m.get("dp_sgd_noise_multiplier", 0.0), sample_rate=m.get("sample_rate", 0.0),
                    steps=int(m.get("dp_steps", 0)), accountant="site",
                )  # fmt: skip
        for name, (_, m) in site_rows.items():
            reg.record_metrics(run, rnd, f"site:{name}", {k: float(v) for k, v in m.items() if k != "num_examples"})
        glob = weighted_means([*(train or {}).values(), *site_rows.values()])
        reg.record_metrics(run, rnd, "global", glob)
        n_train = len(train or site_rows)
        reg.end_round(run, rnd, replied=n_train, failed=0, status="completed", update_norm=update_norm)
        return glob

    def finish(self, status: str) -> None:
        """Mark the run ended (``finished`` or ``failed``)."""
        self.registry.finish_run(self.run_id, status)

    def wrap_up(
        self, out: Path, title: str, rounds: int, t0: float, glob: dict[str, float], log: Progress
    ) -> dict[str, Any]:
        """Finish the run, export its CSVs and convergence plot to ``out``; the run's result dict."""
        self.finish("finished")
        self.registry.export_csv(self.run_id, out)
        plot_convergence(self.registry.metrics(self.run_id, scope="global"), out / "convergence.png", title)
        seconds = round(time.perf_counter() - t0, 1)
        log(f"{title}: finished after {rounds} round(s), {seconds} s")
        return {
            "run_id": self.run_id,
            "status": "finished",
            "rounds_done": rounds,
            "seconds": seconds,
            "out_dir": str(out),
            "global": glob,
        }


def _cross_site(
    trainers: Mapping[str, SiteTrainer], weights: Mapping[str, list[np.ndarray]], rc: RoundConfig
) -> dict[str, dict[str, float]]:
    """``xval_*`` per trained site: its model evaluated on every other site, example-weighted."""
    out: dict[str, dict[str, float]] = {}
    for k, w in weights.items():
        rows = [trainers[j].evaluate(w, rc) for j in trainers if j != k]
        out[k] = {f"x{name}": v for name, v in weighted_means(rows).items() if name.startswith("val_")}
    return out


def run_local_only(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    db_url: str | None = None,
    init_model: str | Path | None = None,
    run_config: Mapping[str, Any] | None = None,
    dg_penalty: float = 0.0,
    dro_step: float = 0.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train every site of ``scenario`` alone for ``scenario.rounds`` rounds and record it in the registry.

    Args:
        scenario: the federation (its sites, model, rounds, local steps, lr, batch size, DP-SGD settings).
        out_dir: output directory (sites, state, ``config.json``, metrics CSVs, ``convergence.png``).
        db_url: registry URL or SQLite path (default ``out_dir/registry.db``).
        init_model: initial model package (default: built from the scenario into ``out_dir/initial_model``).
        run_config: extra keys for the registry run's config (e.g. a study's cell tag under ``"study"``).
        dg_penalty: subgroup variance penalty sent in each round config.
        dro_step: group-DRO step size sent in each round config.
        progress: line printer (default ``print``).

    Returns:
        ``{"run_id", "status", "rounds_done", "seconds", "out_dir", "global"}`` (``global``: last round's
        global metrics).
    """
    log = progress or print
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = db_url or str(out / "registry.db")
    if scenario.server.client_dp:
        log("local-only: client-level DP does not apply (nothing is aggregated); ignoring client_noise_multiplier")
    with simulation_env(out):
        _, model_dir, trainers = baseline_sites(scenario, out, init_model, log)
        config = {
            "kind": "local_only",
            "scenario": scenario.to_dict(),
            "server": scenario.server.to_dict(),
            "initial_model": str(model_dir),
            "dg_penalty": dg_penalty,
            "dro_step": dro_step,
            **(run_config or {}),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        w0 = model_to_arrays(next(iter(trainers.values())).model)
        weights = {k: [a.copy() for a in w0] for k in trainers}
        with Registry(db) as reg:
            rec = Recorder(reg, f"{scenario.name}/local-only", config, scenario.seed)
            try:
                glob: dict[str, float] = {}
                for rnd in range(1, scenario.rounds + 1):
                    rc = make_round_config(scenario.server, rnd, dg_penalty=dg_penalty, dro_step=dro_step)
                    train: dict[str, tuple[int, dict[str, float]]] = {}
                    for k, trainer in trainers.items():
                        res = trainer.fit(weights[k], rc)
                        weights[k] = [w + d for w, d in zip(weights[k], res.delta, strict=True)]
                        train[k] = (res.num_examples, {n: float(v) for n, v in res.metrics.items()})
                    evals = {k: trainers[k].evaluate(weights[k], rc) for k in trainers}
                    if rnd == scenario.rounds:
                        for k, extra in _cross_site(trainers, weights, rc).items():
                            evals[k] = (evals[k][0], {**evals[k][1], **extra})
                    glob = rec.round(rnd, evals, train=train)
                    shown = ", ".join(f"{n} {glob[n]:.4g}" for n in ("train_loss", "val_loss", "val_auc") if n in glob)
                    log(f"round {rnd}: local-only, {len(trainers)} site(s) trained alone: {shown}")
            except BaseException:
                rec.finish("failed")
                raise
            finally:
                for trainer in trainers.values():
                    trainer.close()
            return rec.wrap_up(out, f"{scenario.name} local-only", scenario.rounds, t0, glob, log)


def run_initial(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    db_url: str | None = None,
    init_model: str | Path | None = None,
    run_config: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score the initial model at every site without training it: the reference of a study's arms.

    Each site evaluates the initial model with the round config of the run's *last* round (its stage,
    so in a curriculum ending in ``vl`` the risk metrics exist), with the same code as every other arm.
    Recorded as the one round of a run of its own (round 1: the registry numbers rounds from 1; no
    training, so no training metrics and no ε spent).

    Args:
        scenario: the federation (its sites, model and schedule).
        out_dir: the run directory.
        db_url: registry URL or SQLite path (default ``out_dir/registry.db``).
        init_model: the initial model package (default: built from the scenario into ``out_dir/initial_model``).
        run_config: extra keys for the registry run's config (e.g. a study's cell tag under ``"study"``).
        progress: line printer (default ``print``).

    Returns:
        ``{"run_id", "status", "rounds_done" (1), "seconds", "out_dir", "global"}``.
    """
    log = progress or print
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = db_url or str(out / "registry.db")
    with simulation_env(out):
        _, model_dir, trainers = baseline_sites(scenario, out, init_model, log)
        config = {
            "kind": "initial",
            "scenario": scenario.to_dict(),
            "server": scenario.server.to_dict(),
            "initial_model": str(model_dir),
            **(run_config or {}),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        w0 = model_to_arrays(next(iter(trainers.values())).model)
        rc = make_round_config(scenario.server, scenario.rounds)
        with Registry(db) as reg:
            rec = Recorder(reg, f"{scenario.name}/initial", config, scenario.seed)
            try:
                glob = rec.round(1, {k: t.evaluate(w0, rc) for k, t in trainers.items()})
            except BaseException:
                rec.finish("failed")
                raise
            finally:
                for trainer in trainers.values():
                    trainer.close()
            shown = ", ".join(f"{n} {glob[n]:.4g}" for n in ("val_loss", "val_auc", "val_dice_found") if n in glob)
            log(f"initial model scored by {len(trainers)} site(s), stage {rc.stage}: {shown}")
            return rec.wrap_up(out, f"{scenario.name} initial model", 1, t0, glob, log)

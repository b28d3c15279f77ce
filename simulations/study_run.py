"""Run a study (``lungvl study run``): every grid cell an ordinary run in one registry, resumable.

Layout of the study directory::

    .lungvl.lock        held while ``lungvl study run`` goes on (a second one on the directory is refused)
    study.json          the resolved study and its cells (informational; the report reads the registry)
    registry.db         one registry for all cells (each run's config carries its cell under "study");
                        ``db_url`` puts it elsewhere instead (e.g. the consortium's PostgreSQL)
    sites/<name>/       the federation's sites, generated once and shared by every cell
    init/seed_<s>/      one initial model package per seed, shared by that seed's cells (none when the
                        study names an ``init_model``: every cell then starts from that package)
    cells/<cell_id>/    each cell's run directory (a ``lungvl simulate`` run, or a local-only/centralised one)

How a cell becomes a run (:func:`cell_scenario`): the base scenario with the cell's seed, the study's
rounds, the sites by path, and server settings:

* ``fedavg``: strategy ``fedavg`` (server lr 1, no momentum); ``fedavgm``: the cell's lr and momentum;
* ``local`` / ``centralised``: :mod:`simulations.local_only` / :mod:`simulations.centralised`;
* ``initial``: :func:`simulations.local_only.run_initial` (the starting model scored, no training);
* DP off: no clipping, no noise, no DP-SGD;
* ``client`` at ε: clip ``client_clip_norm``, σ = the smallest noise keeping ``rounds`` sampled-Gaussian
  steps at ``q = expected sampled/total`` sites (``fraction_train`` for Poisson sampling) under ε
  (:func:`privacy.accountant.get_noise_multiplier`), and ε as the run's budget;
* ``sample`` at ε: DP-SGD at every site with one σ, the largest any site needs to stay under ε over
  every phase's ``rounds × local_steps`` steps (what a site sampled in every round runs, and its
  accountant charges; a curriculum's phases each have their own steps and batch, composed by
  :func:`privacy.accountant.get_noise_multiplier_for_schedule`) at its own patient-level
  ``q = batch / training patients`` (hold-out patients excluded; DP-SGD samples
  patients, one study each, so ε is per patient whatever the number of a patient's studies); each
  generated site's own budget is raised to the study's largest ε (the sites still refuse to go past it).

Noise: secret by default (OS entropy, every cell its own). With ``reproducible_noise`` (research only,
not private; the flag or the scenario's own setting) every cell's noise is seeded from its seed *and*
its identity (``ServerConfig.noise_key = "<study>:<cell_id>"``), so cells never share noise, e.g. the
ε = 2 and ε = 8 cells of one seed.

A cell counts as done when the registry holds a ``finished`` or ``stopped_budget`` run tagged with its
study name and cell id; a rerun skips it. A registry shared by several study directories (one PostgreSQL
database) therefore needs a study name per directory. A federated cell interrupted mid-run is resumed
from its last completed round.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from client.config import ClientConfig
from federation.protocol import DP_SGD_STAGES
from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.split import training_patients, training_studies
from privacy.accountant import get_noise_multiplier, get_noise_multiplier_for_schedule
from server.app import RUN_FILE
from server.config import ServerConfig
from server.registry import Registry
from server.registry_schema import Run
from server.run_lock import RunDirLock
from simulations.centralised import run_centralised
from simulations.local_only import initial_model, run_initial, run_local_only
from simulations.scenario import Scenario, SiteSpec
from simulations.simulate import prepare_sites, run_simulation, simulation_env
from simulations.study_config import Cell, StudyConfig

__all__ = [
    "DONE_STATUSES", "base_scenario", "cell_scenario", "check_init_model", "done_cells", "run_study", "sample_sigma",
    "tag_run",
]  # fmt: skip

Progress = Callable[[str], None]
DONE_STATUSES = ("finished", "stopped_budget")
_SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerConfig))


def base_scenario(study: StudyConfig) -> Scenario:
    """The study's federation: its scenario with the study's rounds (and site budgets raised for DP-SGD)."""
    base = Scenario.from_toml(study.scenario)
    if study.rounds is not None:
        base = base.with_server(rounds=study.rounds)
    if "sample" in study.dp and study.epsilons:
        top = max(study.epsilons)
        sites = tuple(
            dataclasses.replace(s, epsilon_budget=max(top, s.epsilon_budget or 0.0)) if s.generated else s
            for s in base.sites
        )
        base = dataclasses.replace(base, sites=sites)
    return base


def _site_studies(site_dir: Path, stage: str, holdout_fraction: float) -> int:
    """Studies a site trains on in ``stage`` (usable, outside its hold-out; with a report for ``vl``)."""
    return len(training_studies(build_catalogue(site_dir), holdout_fraction, require_report=stage == "vl"))


def _site_patients(site_dir: Path, stage: str, holdout_fraction: float) -> int:
    """Patients behind :func:`_site_studies` (the unit DP-SGD samples: ``q = batch / patients``)."""
    return training_patients(build_catalogue(site_dir), holdout_fraction, require_report=stage == "vl")


def sample_sigma(
    *, epsilon: float, delta: float, phases: Sequence[tuple[int, int]], site_patients: Mapping[str, int]
) -> float:
    """DP-SGD σ of a ``sample`` cell: the largest any site needs to keep its patients under ``epsilon``.

    In each phase ``(batch_size, steps)`` of the run (one per curriculum phase; one for a run without a
    curriculum) a site samples its training patients at ``q = min(1, batch_size / patients)`` for
    ``steps`` steps; the site's accountant composes them all.

    Raises:
        ValueError: a site without training patients.
    """
    empty = sorted(k for k, n in site_patients.items() if n < 1)
    if empty:
        raise ValueError(f"sites without training patients cannot run DP-SGD: {empty}")
    return max(
        get_noise_multiplier_for_schedule(
            target_epsilon=epsilon, delta=delta, schedule=[(min(1.0, b / n), steps) for b, steps in phases]
        )
        for n in site_patients.values()
    )


def cell_scenario(
    study: StudyConfig,
    base: Scenario,
    cell: Cell,
    site_dirs: Mapping[str, Path],
    site_patients: Mapping[str, int],
    *,
    reproducible_noise: bool = False,
) -> tuple[Scenario, dict[str, float]]:
    """The scenario of one cell and the DP noise chosen for it (``{"client_sigma"|"sample_sigma": σ}``).

    ``site_patients`` are the training patients of each site (hold-out excluded): DP-SGD's unit.

    With ``reproducible_noise`` (or a base scenario that sets it) the cell's server config seeds its
    noise from the seed and ``noise_key = "<study>:<cell_id>"`` (not private; see the module docstring).

    Raises:
        ValueError: a DG cell while the server cannot forward the penalty (no ``ServerConfig.dg_penalty``),
            or an ε no noise multiplier reaches.
    """
    c = base.server
    changes: dict[str, Any] = {"seed": cell.seed, "delta": study.delta, "dp_sgd": False}
    changes |= {"client_noise_multiplier": 0.0, "target_epsilon": 0.0, "clip_norm": 0.0}
    if reproducible_noise or c.reproducible_noise:  # never two cells with the same noise
        changes |= {"reproducible_noise": True, "noise_key": f"{study.name}:{cell.cell_id}"}
    if cell.strategy == "fedavg":
        changes |= {"strategy": "fedavg", "server_lr": 1.0}
    elif cell.strategy == "fedavgm":
        changes |= {"strategy": "fedavgm", "server_lr": cell.server_lr, "server_momentum": cell.server_momentum}
    noise: dict[str, float] = {}
    if cell.dp == "client":
        q = c.expected_sites(len(base.sites)) / len(base.sites)  # what the server's accountant uses
        sigma = get_noise_multiplier(
            target_epsilon=cell.epsilon, delta=study.delta, sample_rate=q, steps=c.rounds, accountant=c.accountant
        )
        changes |= {
            "clip_norm": study.client_clip_norm,
            "client_noise_multiplier": sigma,
            "target_epsilon": cell.epsilon,
        }
        noise["client_sigma"] = sigma
    elif cell.dp == "sample":
        # a site sampled in every round runs (and is charged) every phase's steps at its batch
        dp_phases = [(p.batch_size, p.rounds * p.local_steps) for p in c.phases if p.stage in DP_SGD_STAGES]
        sigma = sample_sigma(epsilon=cell.epsilon, delta=study.delta, phases=dp_phases, site_patients=site_patients)
        changes |= {"dp_sgd": True, "dp_sgd_noise_multiplier": sigma}
        changes |= {"dp_sgd_max_grad_norm": study.sample_max_grad_norm}
        noise["sample_sigma"] = sigma
    if cell.federated and (cell.dg_penalty or cell.dro_step):
        if not {"dg_penalty", "dro_step"} <= _SERVER_FIELDS:
            raise ValueError(
                f"cell {cell.cell_id}: the DG penalty reaches the sites through the round config, but "
                "ServerConfig has no dg_penalty/dro_step to send (server/config.py + RoundEngine.round_config)"
            )
        changes |= {"dg_penalty": cell.dg_penalty, "dro_step": cell.dro_step}
    if cell.federated and cell.site_dro_step:
        changes["site_dro_step"] = cell.site_dro_step
    sites = tuple(SiteSpec(name=s.name, path=site_dirs[s.name]) for s in base.sites)
    scenario = dataclasses.replace(
        base, name=f"{study.name}:{cell.cell_id}", sites=sites, server=c.with_updates(**changes)
    )
    return scenario, noise


def tag_run(registry: Registry, run_id: int, tag: Mapping[str, Any]) -> None:
    """Add ``tag`` under ``"study"`` to a run's config in the registry (what the report groups by)."""
    with Session(registry.engine) as s, s.begin():
        run = s.get(Run, run_id)
        if run is None:
            raise KeyError(f"no run {run_id} in {registry.url}")
        run.config = {**run.config, "study": dict(tag)}


def check_init_model(study: StudyConfig, base: Scenario) -> Path | None:
    """The study's ``init_model`` package, checked against the federation's model (None when not set).

    Raises:
        FileNotFoundError: the package does not exist.
        ValueError: its model config differs from the scenario's ``[model]`` (the differing keys named), so
            the sites would train another architecture than the one the run records.
    """
    if study.init_model is None:
        return None
    path = study.init_model
    if not (path / "config.json").is_file() or not (path / "model.pt").is_file():
        raise FileNotFoundError(f"study init_model {path}: not a model package (config.json or model.pt missing)")
    theirs = json.loads((path / "config.json").read_text(encoding="utf-8"))
    ours = json.loads(json.dumps(base.model_config().to_dict()))  # tuples as the package's JSON lists
    diff = sorted(
        f"{table}.{key}"
        for table in sorted(set(ours) | set(theirs))
        for key in sorted(set(_as_table(ours.get(table))) | set(_as_table(theirs.get(table))))
        if _as_table(ours.get(table)).get(key) != _as_table(theirs.get(table)).get(key)
        and not (table == "text" and key == "pretrained_dir")
    )
    if diff:
        table, key = diff[0].split(".", 1)
        pkg, scn = _as_table(theirs.get(table)).get(key), _as_table(ours.get(table)).get(key)
        raise ValueError(
            f"study init_model {path}: its model differs from the scenario's [model] at {', '.join(diff[:6])}"
            f"{' …' if len(diff) > 6 else ''} (e.g. {diff[0]}: package {pkg!r}, scenario {scn!r}); set the "
            "scenario's [model] to the package's"
        )
    return path


def _as_table(v: Any) -> dict[str, Any]:
    return dict(v) if isinstance(v, Mapping) else {"": v}


def done_cells(registry: Registry, study: str) -> dict[str, dict[str, Any]]:
    """Map each cell id of study ``study`` to its latest finished run."""
    out: dict[str, dict[str, Any]] = {}
    for run in registry.runs():
        tag = (run["config"] or {}).get("study") or {}
        if tag.get("study") == study and run["status"] in DONE_STATUSES:
            out[tag["cell"]["cell_id"]] = run
    return out


def _site_cohorts(base: Scenario, site_dirs: Mapping[str, Path]) -> dict[str, str]:
    out = {}
    for s in base.sites:
        out[s.name] = s.cohort or ClientConfig.from_toml(site_dirs[s.name] / "site.toml").cohort
    return out


def _run_cell(
    cell: Cell, scenario: Scenario, cell_dir: Path, db: str, init: Path, tag: dict[str, Any], log: Progress
) -> dict[str, Any]:
    if cell.strategy == "local":
        return run_local_only(
            scenario, cell_dir, db_url=db, init_model=init, run_config={"study": tag},
            dg_penalty=cell.dg_penalty, dro_step=cell.dro_step, progress=log,
        )  # fmt: skip
    if cell.strategy == "initial":
        return run_initial(scenario, cell_dir, db_url=db, init_model=init, run_config={"study": tag}, progress=log)
    if cell.strategy == "centralised":
        return run_centralised(scenario, cell_dir, db_url=db, init_model=init, run_config={"study": tag}, progress=log)
    resume = (cell_dir / RUN_FILE).exists()
    result = run_simulation(scenario, cell_dir, db_url=db, resume=resume, progress=log, init_model=init)
    with Registry(db) as reg:
        tag_run(reg, int(result["run_id"]), tag)
    return result


def run_study(
    study: StudyConfig,
    out_dir: str | Path,
    *,
    only: Sequence[str] = (),
    max_cells: int | None = None,
    rerun: bool = False,
    progress: Progress | None = None,
    reproducible_noise: bool = False,
    db_url: str | None = None,
) -> dict[str, Any]:
    """Run the study's cells that are not done yet, one after the other.

    Args:
        study: the study.
        out_dir: the study directory (layout in the module docstring).
        only: run only cells whose id matches one of these shell patterns (e.g. ``"fedavg-s0"``, ``"*-s0"``).
        max_cells: stop after this many cells have run (skipped ones do not count).
        rerun: run the selected cells again even when finished (their directories are replaced; the
            registry keeps the old runs, and the report reads each cell's latest finished run).
        progress: line printer (default ``print``).
        reproducible_noise: research only, *not private*: seed every federated cell's noise and site
            sample from its seed and its cell identity (see the module docstring).
        db_url: the registry (a SQLAlchemy URL such as ``postgresql://user:pw@host/lungvl``, or a SQLite
            path); default ``out_dir/registry.db``.

    Returns:
        ``{"cells", "done", "skipped", "ran", "failed" (cell id -> error), "seconds", "out_dir"}``.

    Raises:
        RunDirBusy: another process holds the study directory (held for the whole study; a cell whose
            own directory is held elsewhere fails alone, like any other cell).
    """
    log = progress or print
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    with RunDirLock(out, what=f"lungvl study run {study.name}", log=log):  # cells lock their own directories
        db = db_url or str(out / "registry.db")
        cells = study.cells()
        base = base_scenario(study)
        shared_init = check_init_model(study, base)
        with Registry(db) as reg:  # a wrong URL or a missing driver fails here, before sites are generated
            done = done_cells(reg, study.name)
            shown = reg.url
        (out / "study.json").write_text(
            json.dumps(
                {
                    "study": study.to_dict(),
                    "cells": [c.to_dict() for c in cells],
                    "scenario": base.to_dict(),
                    "registry": shown,
                },
                indent=2,
            )
        )
        with simulation_env(out):
            site_dirs = prepare_sites(base, out, log)
            sizes = {k: _site_studies(v, base.server.stage, base.holdout_fraction) for k, v in site_dirs.items()}
            patients = {k: _site_patients(v, base.server.stage, base.holdout_fraction) for k, v in site_dirs.items()}
        cohorts = _site_cohorts(base, site_dirs)
        wanted = [c for c in cells if not only or any(fnmatch.fnmatch(c.cell_id, p) for p in only)]
        todo = [c for c in wanted if rerun or c.cell_id not in done]
        log(f"study {study.name}: {len(cells)} cells, {len(wanted) - len(todo)} already done, {len(todo)} to run")
        if reproducible_noise or base.server.reproducible_noise:
            log("noise reproducible: not private (each cell's noise seeded from its seed and cell id)")
        ran: list[str] = []
        failed: dict[str, str] = {}
        for i, cell in enumerate(todo, 1):
            if max_cells is not None and len(ran) + len(failed) >= max_cells:
                break
            started = time.perf_counter()
            log(f"[{i}/{len(todo)}] {cell.cell_id}: starting")
            try:
                scenario, noise = cell_scenario(
                    study, base, cell, site_dirs, patients, reproducible_noise=reproducible_noise
                )
                if rerun and cell.cell_id in done:
                    shutil.rmtree(out / "cells" / cell.cell_id, ignore_errors=True)
                if shared_init is not None:
                    init = shared_init
                else:
                    with simulation_env(out):
                        init = initial_model(base, site_dirs, out / "init" / f"seed_{cell.seed}", seed=cell.seed)
                tag = {
                    "study": study.name,
                    "cell": cell.to_dict(),
                    "sites": cohorts,
                    "site_studies": sizes,
                    "site_patients": patients,
                    "rounds": base.rounds,
                    "local_steps": base.server.local_steps,
                    "holdout_fraction": base.holdout_fraction,
                    "delta": study.delta,
                    "init_model": str(init),
                    **noise,
                }
                result = _run_cell(cell, scenario, out / "cells" / cell.cell_id, db, init, tag, lambda s: log(f"  {s}"))
            except Exception as err:  # noqa: BLE001 - one broken cell must not stop the study; reported at the end
                failed[cell.cell_id] = f"{type(err).__name__}: {err}"
                log(f"[{i}/{len(todo)}] {cell.cell_id}: FAILED: {failed[cell.cell_id]}")
                continue
            ran.append(cell.cell_id)
            took = time.perf_counter() - started
            elapsed = time.perf_counter() - t0
            left = len(todo) - i
            eta = f", about {elapsed / (len(ran) + len(failed)) * left / 60:.0f} min left" if left else ""
            log(f"[{i}/{len(todo)}] {cell.cell_id}: {result['status']} in {took:.0f} s{eta}")
        summary = {
            "cells": len(cells),
            "done": len(wanted) - len(todo) + len(ran),
            "skipped": len(wanted) - len(todo),
            "ran": ran,
            "failed": failed,
            "seconds": round(time.perf_counter() - t0, 1),
            "out_dir": str(out),
        }
        log(
            f"study {study.name}: ran {len(ran)}, skipped {summary['skipped']}, failed {len(failed)} "
            f"in {summary['seconds']} s"
        )
        return summary

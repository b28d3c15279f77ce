"""Run a scenario as a Flower simulation on one machine (``lungvl simulate``).

One SuperNode per site in Flower's simulation engine (Ray backend, one CPU per site's ClientApp), the
real :mod:`server.app` ServerApp and :mod:`client.app` ClientApp, so what runs here is what a
consortium deploys. Outputs under ``out_dir``::

    config.json          the resolved scenario, model config, paths and environment
    server.toml          the server settings the ServerApp read
    .lungvl.lock         held while a run (or its resumption) goes on: a second one is refused
    run.json             registry run id (what resume reads)
    registry.db          the run registry (unless db_url names another database)
    sites/<name>/        generated sites, or links to existing site directories
    state/<name>/        each site's audit ledger and DP-SGD accountant state
    initial_model/       the initial model package (config, tokenizer, weights) sent to the sites
    checkpoints/round_<n>/  global weights + server state after each completed round
    metrics.csv, metrics_global.csv, metrics_site_<name>.csv
    convergence.png      global validation metrics per round
    epsilon.png          client-level ε per round (and the sites' own patient-level ε)
    summary.md           the run at a glance

The initial model's report tokenizer is trained on the public synthetic report corpus only
(:func:`~lungvl_model.training.stages.build_public_model`), as a real consortium's must be: no site's
text shapes the vocabulary every site receives.

Flower, Ray, matplotlib and Hugging Face write under ``$HOME`` and ``/tmp`` by default; while the
simulation runs, ``FLWR_HOME``, ``MPLCONFIGDIR`` and ``HF_HOME`` point into ``out_dir`` and Ray's temp
dir is ``out_dir/.ray`` — or ``/tmp/lungvl_ray_<hash of out_dir>`` when that path is too long for
Ray's Unix socket paths (about 107 bytes in all, of which Ray's own session and socket names take ~65);
that fallback is deleted after a successful run (kept after a failure, for Ray's logs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from client.app import SiteEndpoint, make_client_app
from lungvl_model.data.site_layout import toml_dumps
from lungvl_model.data.synth import SynthConfig, generate_site
from lungvl_model.training.checkpoint import save_checkpoint
from lungvl_model.training.stages import PUBLIC_TOKENIZER_CORPUS, build_public_model, public_model_meta
from server.app import RUN_FILE, check_resume, make_server_app
from server.registry import Registry
from server.run_lock import RunDirLock
from server.run_outputs import SitesTable, plot_convergence, plot_epsilon, write_run_outputs
from simulations.scenario import Scenario, SiteSpec

__all__ = ["plot_convergence", "plot_epsilon", "prepare_sites", "ray_temp_dir", "run_simulation", "simulation_env"]

Progress = Callable[[str], None]
#: Longest Ray temp dir kept inside the run directory (Unix socket paths are limited to ~107 bytes).
MAX_RAY_TMP = 40


def ray_temp_dir(out_dir: Path) -> Path:
    """``out_dir/.ray`` when short enough for Ray's socket paths, else ``/tmp/lungvl_ray_<hash>``."""
    inside = out_dir / ".ray"
    if len(str(inside)) <= MAX_RAY_TMP:
        return inside
    return Path("/tmp") / f"lungvl_ray_{hashlib.sha256(str(out_dir).encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def simulation_env(out_dir: Path) -> Iterator[dict[str, str]]:
    """Point Flower, Ray, matplotlib and HF caches into ``out_dir`` (restored afterwards); yields the values."""
    values = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_HOME": str(out_dir / ".flwr"),
        "MPLCONFIGDIR": str(out_dir / ".mpl"),
        "HF_HOME": str(out_dir / ".hf"),
        "RAY_TMPDIR": str(ray_temp_dir(out_dir)),
        "RAY_DEDUP_LOGS": "0",
    }
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if k.endswith(("HOME", "DIR")):
            Path(v).mkdir(parents=True, exist_ok=True)
        os.environ[k] = v
    try:
        yield values
    finally:
        for k, prev in old.items():
            if prev is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = prev


def _generated_matches(site_dir: Path, synth: SynthConfig) -> bool:
    """Whether ``site_dir`` already holds this exact synthetic site (so a resume does not regenerate it)."""
    toml = site_dir / "site.toml"
    if not toml.exists():
        return False
    try:
        saved = tomllib.loads(toml.read_text(encoding="utf-8")).get("synth", {})
    except tomllib.TOMLDecodeError:
        return False
    wanted = {k: v for k, v in synth.to_dict().items() if v is not None and k != "out_dir"}
    return bool(saved == wanted)


def _set_budget(site_dir: Path, epsilon_budget: float) -> None:
    toml = site_dir / "site.toml"
    doc = tomllib.loads(toml.read_text(encoding="utf-8"))
    doc.setdefault("privacy", {})["epsilon_budget"] = float(epsilon_budget)
    toml.write_text(toml_dumps(doc), encoding="utf-8")


def prepare_sites(scenario: Scenario, out_dir: Path, log: Progress = print) -> dict[str, Path]:
    """Generate (or link) every site under ``out_dir/sites``; returns name → site directory."""
    sites: dict[str, Path] = {}
    for spec in scenario.sites:
        target = out_dir / "sites" / spec.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if spec.path is not None:
            if not (spec.path / "site.toml").exists():
                raise FileNotFoundError(f"site {spec.name!r}: no site.toml in {spec.path}")
            if target.is_symlink() and target.resolve() != spec.path.resolve():
                target.unlink()
            if not target.exists():
                target.symlink_to(spec.path.resolve(), target_is_directory=True)
        else:
            synth = _synth_config(spec, scenario, target)
            if _generated_matches(target, synth):
                log(f"site {spec.name}: reusing {target}")
            else:
                t0 = time.perf_counter()
                generate_site(synth)
                seconds = time.perf_counter() - t0
                log(f"site {spec.name}: generated {spec.studies} {spec.cohort} studies in {seconds:.1f} s")
            if spec.epsilon_budget is not None:
                _set_budget(target, spec.epsilon_budget)
        sites[spec.name] = target
    return sites


def _synth_config(spec: SiteSpec, scenario: Scenario, target: Path) -> SynthConfig:
    assert spec.cohort is not None and spec.studies is not None  # a generated site (SiteSpec checks)
    return SynthConfig(
        cohort=spec.cohort,
        n_studies=spec.studies,
        out_dir=target,
        seed=spec.seed,
        matrix=spec.matrix or scenario.matrix,
        z_extent_mm=spec.z_extent_mm or scenario.z_extent_mm,
        site_name=spec.name,
    )


def _initial_model(scenario: Scenario, sites: dict[str, Path], out_dir: Path, log: Progress) -> Path:
    target = out_dir / "initial_model"
    if (target / "model.pt").exists():
        return target
    t0 = time.perf_counter()
    model = build_public_model(scenario.model_config(), seed=scenario.seed)  # no site's reports in the tokenizer
    meta = {"stage": "init", "seed": scenario.seed, **public_model_meta(), "sites": sorted(sites)}
    save_checkpoint(target, model, meta)
    log(f"initial model: {model.num_parameters()['total']:,} parameters, tokenizer of {len(model.tokenizer)} tokens "
        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return target


def run_simulation(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    db_url: str | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    init_model: str | Path | None = None,
    reproducible_noise: bool = False,
) -> dict[str, Any]:
    """Run ``scenario`` with Flower's simulation engine and write the outputs listed in the module docstring.

    Args:
        scenario: the scenario.
        out_dir: the run directory.
        db_url: registry URL (default ``out_dir/registry.db``).
        resume: continue the run of ``out_dir`` after its last closed round (up to ``scenario.rounds``).
        progress: line printer (default ``print``: one line per round on stdout).
        init_model: use this initial model package instead of building one (e.g. to compare strategies
            from the same start); it is copied by reference into ``config.json``.
        reproducible_noise: research only, *not private*: seed the client-level noise and the site sample
            from the scenario's seed (``ServerConfig.reproducible_noise``) so that the run, and its
            resumption, can be repeated bit for bit. A resume must pass the same value.

    Returns:
        ``{"run_id", "status", "rounds_done", "epsilon", "seconds", "out_dir", "checkpoint", "files"}``.

    Raises:
        RunDirBusy: another process holds ``out_dir`` (:class:`~server.run_lock.RunDirLock`, taken for the
            whole run); nothing is written then.
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is False.
        FileNotFoundError: ``resume`` without a previous run in ``out_dir``.
        ResumeRefused: ``resume`` refused by :func:`~server.app.check_resume` (:class:`CheckpointMismatch`:
            a checkpoint file missing or changed), before anything is written or started.
    """
    log = progress or print
    if reproducible_noise and not scenario.server.reproducible_noise:
        scenario = scenario.with_server(reproducible_noise=True)
    if scenario.server.reproducible_noise:
        log("noise reproducible: not private (client-level noise and site sample seeded from the run's seed)")
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    if resume and not (out / RUN_FILE).exists():
        raise FileNotFoundError(f"nothing to resume in {out} (no {RUN_FILE})")
    db = db_url or str(out / "registry.db")
    with RunDirLock(out, what=f"lungvl simulate {scenario.name}", log=log):  # the whole run, resume included
        if (out / RUN_FILE).exists() and not resume:
            raise FileExistsError(f"{out} already holds a run ({RUN_FILE}); resume it or choose another directory")
        if resume:  # refuse before anything is written or started (the ServerApp checks again)
            with Registry(db) as reg:
                check_resume(out, reg, scenario.server)
        with simulation_env(out) as env:
            sites = prepare_sites(scenario, out, log)
            model_dir = (
                Path(init_model).resolve() if init_model is not None else _initial_model(scenario, sites, out, log)
            )
            server_toml = out / "server.toml"
            server_toml.write_text(toml_dumps(scenario.server.to_tables()), encoding="utf-8")
            (out / "config.json").write_text(
                json.dumps(
                    {
                        "scenario": scenario.to_dict(),
                        "model": scenario.model_config().to_dict(),
                        "sites": {k: str(v) for k, v in sites.items()},
                        "initial_model": str(model_dir),
                        "registry": Registry(db).url if db_url else db,
                        "environment": env,
                        "resume": resume,
                    },
                    indent=2,
                )
            )
            endpoints = [
                SiteEndpoint(
                    sites[s.name],
                    model_dir,
                    out / "state" / s.name,
                    scenario.holdout_fraction,
                    scenario.min_eval_studies,
                )
                for s in scenario.sites
            ]
            done: dict[str, Any] = {}
            server_app = make_server_app(
                {
                    "server-config": str(server_toml),
                    "init-model": str(model_dir),
                    "run-dir": str(out),
                    "registry": db,
                    "run-name": scenario.name,
                    "resume": resume,
                },
                log=log,
                on_done=done.update,
            )
            backend = {
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {
                    "num_cpus": min(scenario.num_cpus, len(scenario.sites)),
                    "_temp_dir": env["RAY_TMPDIR"],
                    "include_dashboard": False,
                    "logging_level": logging.ERROR,
                    "log_to_driver": True,
                },
            }
            from flwr.simulation import run_simulation as flwr_run_simulation  # imports Ray: only once it runs

            flwr_logger = logging.getLogger("flwr")
            level = flwr_logger.level
            flwr_logger.setLevel(logging.WARNING)
            try:
                flwr_run_simulation(
                    server_app=server_app,
                    client_app=make_client_app(endpoints),
                    num_supernodes=len(endpoints),
                    backend_config=backend,  # type: ignore[arg-type]
                )
            finally:
                flwr_logger.setLevel(level)
            if not done:
                raise RuntimeError("the simulated ServerApp ended without a result (see the log above)")
            files = _write_outputs(out, db, int(done["run_id"]), scenario, model_dir)
            ray_tmp = Path(env["RAY_TMPDIR"])
            if not ray_tmp.is_relative_to(out):  # the /tmp fallback: Ray's logs are removed after a good run
                shutil.rmtree(ray_tmp, ignore_errors=True)
    result = {**done, "seconds": round(time.perf_counter() - t0, 1), "out_dir": str(out), "files": files}
    log(f"simulation {scenario.name}: {result['status']} after {result['rounds_done']} round(s), {result['seconds']} s")
    return result


def tokenizer_note(model_dir: Path) -> str:
    """Where the initial model's tokenizer came from, as its package's meta.json records it."""
    try:
        meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if meta.get("tokenizer_corpus") == PUBLIC_TOKENIZER_CORPUS:
        return "The initial model's tokenizer was trained on the public synthetic report corpus (no site's reports)."
    trained_on = ", ".join(str(x) for x in meta.get("sites", [])) or "not recorded"
    return (
        f"The initial model is the package {model_dir} (stage {meta.get('stage', '?')}); its tokenizer is not the "
        f"public corpus's but that of its own training (sites: {trained_on}): share it only if those reports may be."
    )


def _write_outputs(out: Path, db: str, run_id: int, scenario: Scenario, model_dir: Path) -> list[str]:
    sites = SitesTable(
        ("site", "cohort", "studies"),
        tuple((x.name, x.cohort or "(existing)", str(x.studies or "")) for x in scenario.sites),
    )
    note = tokenizer_note(model_dir)
    with Registry(db) as reg:
        files = write_run_outputs(
            reg, run_id, out, scenario.server, title=scenario.name, sites=sites, preset=scenario.preset, notes=[note]
        )
    return [str(p) for p in files]

"""The consortium's Flower ServerApp (thin): run config in, :class:`~server.strategy.DPFedAvgM` runs, checkpoints out.

Run config keys (``[tool.flwr.app.config]``, ``flwr run --run-config`` or the simulation's defaults).
Relative paths resolve against the Flower App directory (:func:`app_dir`: for ``flwr run .`` the copy
of the app Flower installed under ``$FLWR_HOME/apps/``), never against the current directory:

- ``server-config``: path of the server TOML (:class:`~server.config.ServerConfig`); required;
- ``init-model``: the initial model package (a lungvl checkpoint directory: config.json, tokenizer/,
  model.pt); required. When it does not exist it is built (:func:`build_init_model`: ``model-preset``
  with the ``[model]`` table of ``model-config``, a tokenizer trained on the public synthetic corpus)
  and saved there;
- ``model-preset`` / ``model-config``: the model built when ``init-model`` is missing (default ``tiny``;
  ``model-config`` a TOML file whose ``[model]`` table overrides the preset, e.g. a scenario file);
- ``run-dir``: where checkpoints go (default ``runs/server``);
- ``registry``: SQLAlchemy URL or SQLite path (default ``<run-dir>/registry.db``);
- ``run-name``: the registry's run name (default the run directory's name);
- ``resume``: continue the run recorded in ``<run-dir>/run.json`` after its last closed round;
- ``num-server-rounds``: overrides the server TOML's ``rounds`` (0 = keep it);
- ``max-consecutive-failed-rounds``: after this many failed rounds in a row the run is aborted, recorded
  ``failed`` and the ServerApp raises (:class:`~server.round_types.RunAborted`), so Flower reports the
  run failed too (0 = never abort). Empty or absent: the server TOML's ``[strategy] max_failed_rounds``
  (default 3), which is also what ``lungvl server start`` and ``lungvl simulate`` use.

Per closed round ``n`` (``completed`` or ``failed``: a failed round is charged to ε too) it writes
``<run-dir>/checkpoints/round_<n>/``: the global weights as a lungvl checkpoint (``save_checkpoint``),
``server_state.pt`` (momentum buffer, round, accountant, numpy/torch/python global RNG states, config;
loadable with ``torch.load(weights_only=True)``) and ``server_state.json`` (the same without arrays),
records it in the registry and marks the round closed, all *before* the new weights are sent to any
site for evaluation (release once, DESIGN.md section 4). The generators of the site sample and the
noise are not in it: they are fresh OS entropy per draw and kept nowhere.

Resume: first every check, with nothing written (:func:`check_resume`): ``run.json`` readable, the run
in the registry, the last closed round's ``model.pt`` equal to the sha256 the registry recorded for it
and its ``server_state.pt`` equal to ``server_state_sha256`` in its ``server_state.json``
(:class:`CheckpointMismatch` otherwise, naming the file and both hashes), the state of that round,
and the same settings but ``rounds``/``round_timeout_s`` (:class:`ResumeRefused` otherwise). Only then
are pending rounds (rows after the last closed round: a crash before the commit, whose weights never
left the server) deleted from the registry and the run reopened; a resumed run that fails before its
first round gets its previous status back (``failed`` when that was a stale ``running``). Weights and
server state come from the last closed round's checkpoint, and the run goes on with the next round; a
round that was committed (and so may have been sent out) is never run again. New rounds draw fresh
secret noise, so a resumed private run differs from an uninterrupted one; only with
``reproducible_noise`` (not private), where every draw is seeded from ``(seed, round)``, does it end
with the same weights, bit for bit on CPU (given sites that train deterministically).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context, UserConfigValue
from flwr.serverapp import Grid, ServerApp

from federation.app_paths import app_dir, under
from federation.arrays import model_to_arrays
from federation.records import arrays_to_record
from federation.transport import shorten_object_pull_backoff
from lungvl_model.config_file import read_toml
from lungvl_model.models.config import LungVLConfig, get_preset
from lungvl_model.training.checkpoint import load_checkpoint, save_checkpoint
from lungvl_model.training.stages import build_public_model, public_model_meta
from server.config import ServerConfig
from server.registry import Registry
from server.registry_engine import shown_url
from server.resume import (
    RUN_FILE,
    STATE_FILE,
    CheckpointMismatch,
    ResumePoint,
    ResumeRefused,
    check_resume,
    load_round_checkpoint,
    restore_rng_states,
    save_round_checkpoint,
)
from server.round_engine import RoundEngine
from server.round_types import DEFAULT_MAX_FAILED_ROUNDS, RoundOutcome
from server.strategy import DPFedAvgM

__all__ = [
    "RUN_FILE",
    "STATE_FILE",
    "CheckpointMismatch",
    "ResumePoint",
    "ResumeRefused",
    "ServerRunSpec",
    "app",
    "app_dir",
    "build_init_model",
    "check_resume",
    "load_round_checkpoint",
    "make_server_app",
    "run_server",
    "save_round_checkpoint",
]

Log = Callable[[str], None]


def _count(run_config: Mapping[str, UserConfigValue], key: str, default: int) -> int:
    value = run_config.get(key, default)
    if value == "":  # the app's pyproject leaves it empty: the server TOML's value
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"run config {key!r} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class ServerRunSpec:
    """What one server run needs, resolved from the run config.

    ``max_failed_rounds``: 0 = never abort; ``model_preset``/``model_config``: the model
    :func:`build_init_model` builds when ``init_model`` is missing.
    """

    config: ServerConfig
    init_model: Path
    run_dir: Path
    registry: str
    run_name: str
    resume: bool = False
    max_failed_rounds: int = DEFAULT_MAX_FAILED_ROUNDS
    model_preset: str = "tiny"
    model_config: Path | None = None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, UserConfigValue], base: Path | None = None) -> ServerRunSpec:
        """Parse Flower's run config (keys in the module docstring); relative paths resolve against ``base``.

        Raises:
            KeyError: a required key is missing.
            ValueError: a count that is not an integer >= 0.
        """
        missing = [k for k in ("server-config", "init-model") if not run_config.get(k)]
        if missing:
            raise KeyError(f"ServerApp run config lacks {missing}; got {sorted(run_config)}")
        run_dir = under(base, str(run_config.get("run-dir") or "runs/server"))
        registry = str(run_config.get("registry") or run_dir / "registry.db")
        if "://" not in registry:
            registry = str(under(base, registry))
        config = ServerConfig.from_toml(under(base, str(run_config["server-config"])))
        rounds = _count(run_config, "num-server-rounds", 0)
        model_config = str(run_config.get("model-config") or "")
        return cls(
            config=config.with_updates(rounds=rounds) if rounds else config,
            init_model=under(base, str(run_config["init-model"])),
            run_dir=run_dir,
            registry=registry,
            run_name=str(run_config.get("run-name") or run_dir.resolve().name),
            resume=bool(run_config.get("resume", False)),
            max_failed_rounds=_count(run_config, "max-consecutive-failed-rounds", config.max_failed_rounds),
            model_preset=str(run_config.get("model-preset") or "tiny"),
            model_config=under(base, model_config) if model_config else None,
        )


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise KeyError(f"{where}: unknown model setting {key!r} (known: {', '.join(sorted(base))})")
        nested = isinstance(value, Mapping) and isinstance(base[key], Mapping)
        out[key] = _merged(base[key], value, f"{where}.{key}") if nested else value
    return out


def build_init_model(spec: ServerRunSpec, *, log: Log = print) -> Path:
    """Build the initial model package at ``spec.init_model`` (written to a temp dir, then renamed in).

    The model is ``spec.model_preset`` with the ``[model]`` table of ``spec.model_config`` merged in,
    its weights seeded with the server config's ``seed``, its tokenizer trained on the public synthetic
    report corpus only (:func:`~lungvl_model.training.stages.build_public_model`), as the simulations do.

    Raises:
        KeyError: an unknown preset or model setting, or no ``[model]`` table (the message names the file
            and the key).
        FileNotFoundError: ``model_config`` does not exist.
    """
    cfg = get_preset(spec.model_preset)
    if spec.model_config is not None:
        table = read_toml(spec.model_config, what="model config").get("model")
        if not isinstance(table, Mapping):
            raise KeyError(f"model-config {spec.model_config} has no [model] table")
        cfg = LungVLConfig.from_dict(_merged(cfg.to_dict(), table, f"{spec.model_config} [model]"))
    model = build_public_model(cfg, seed=spec.config.seed)
    target = spec.init_model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, {"stage": "init", "seed": spec.config.seed, **public_model_meta()})
    try:
        tmp.rename(target)
    except OSError:  # built meanwhile by another process: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.pt").exists():
            raise
    log(f"initial model built at {target}: preset {spec.model_preset}, {model.num_parameters()['total']:,} parameters")
    return target


def _ran_a_round(registry: Registry, run_id: int, after: int) -> bool:
    return registry.last_closed_round(run_id) != after or bool(registry.pending_rounds(run_id))


def run_server(grid: Grid, spec: ServerRunSpec, *, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the federated training described by ``spec`` on ``grid``.

    Returns:
        ``{"run_id", "status", "rounds_done", "last_round", "checkpoint", "epsilon"}``.

    Raises:
        FileNotFoundError: ``resume`` without a ``run.json`` in the run directory.
        CheckpointMismatch: ``resume`` while a file of the last closed round's checkpoint is missing or
            changed; nothing is written to the registry then.
        ResumeRefused: ``resume`` refused for another reason (:func:`check_resume`), e.g. settings that
            differ (other than ``rounds``/``round_timeout_s``); nothing is written to the registry then.
    """
    cfg = spec.config
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    if not spec.resume and not spec.init_model.exists():
        build_init_model(spec, log=log)
    registry = Registry(spec.registry)
    model, init_meta = load_checkpoint(spec.init_model)
    weights = model_to_arrays(model)
    state: dict[str, Any] | None = None
    run_file = spec.run_dir / RUN_FILE
    reopened: tuple[str, datetime | None] | None = None  # a resumed run's (status, finished_at) before it
    last = 0
    if spec.resume:
        try:  # every check before the first registry write: a refused resume leaves the registry as it was
            point = check_resume(spec.run_dir, registry, cfg)
            if point.checkpoint is not None:
                weights, state = load_round_checkpoint(point.checkpoint)
                restore_rng_states(state.pop("rng"))
        except BaseException:
            registry.close()
            raise
        run_id, last = point.run_id, point.last_round
        log(f"resuming run {run_id} after round {last}")
        for rnd in registry.pending_rounds(run_id):
            registry.delete_round(run_id, rnd)
        reopened = registry.reopen_run(run_id)
    else:
        resolved = {"server": cfg.to_dict(), "init_model": str(spec.init_model), "init_stage": init_meta.get("stage")}
        run_id = registry.start_run(spec.run_name, resolved, seed=cfg.seed)
        run_file.write_text(json.dumps({"run_id": run_id, "registry": registry.url, "name": spec.run_name}, indent=2))
        (spec.run_dir / "server_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    last_ckpt: list[Path] = []

    def on_round_end(engine: RoundEngine, outcome: RoundOutcome) -> None:
        # Every closed round, failed ones too (their accountant step must survive a crash).
        directory = spec.run_dir / "checkpoints" / f"round_{outcome.round}"
        stage = cfg.round_config(outcome.round).stage  # the curriculum phase's stage
        meta = {"stage": stage, "run_id": run_id, "round_status": outcome.status, "epsilon": outcome.epsilon}
        meta["metrics"] = outcome.train_metrics  # evaluation comes after the commit, into the registry
        sha = save_round_checkpoint(directory, model, engine, meta)
        registry.record_checkpoint(run_id, outcome.round, directory, sha)
        last_ckpt.append(directory)

    strategy = DPFedAvgM(
        cfg,
        registry=registry,
        run_id=run_id,
        on_round_end=on_round_end,
        log=log,
        state=state,
        max_failed_rounds=spec.max_failed_rounds,
    )
    try:
        strategy.start(grid, arrays_to_record(weights))
    except BaseException:
        if reopened is not None and reopened[0] != "running" and not _ran_a_round(registry, run_id, last):
            registry.restore_run(run_id, *reopened)  # a resume that ran no round: the run's status as it was
        else:
            registry.finish_run(run_id, "failed")
        registry.close()
        raise
    status = "stopped_budget" if strategy.stopped_by_budget else "finished"
    registry.finish_run(run_id, status)
    summary = registry.summary(run_id)
    registry.close()
    log(f"run {run_id} {status}: {summary['rounds_done']} completed round(s)")
    eng = strategy.engine
    return {
        "run_id": run_id,
        "status": status,
        "rounds_done": summary["rounds_done"],
        "last_round": summary["last_completed_round"],
        "checkpoint": str(last_ckpt[-1]) if last_ckpt else None,
        "epsilon": None if eng is None or eng.accountant is None else eng.accountant.epsilon,
    }


def make_server_app(
    defaults: Mapping[str, UserConfigValue] | None = None,
    *,
    log: Log = print,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overridden by Flower's run config.

    Args:
        defaults: run config used when Flower's is silent (the simulation passes everything here, as
            ``flwr.simulation.run_simulation`` gives the ServerApp an empty run config).
        log: line printer.
        on_done: receives :func:`run_server`'s summary.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        shorten_object_pull_backoff()
        base = app_dir()
        spec = ServerRunSpec.from_run_config({**(defaults or {}), **context.run_config}, base=base)
        shown = shown_url(spec.registry) if spec.registry else "(default)"
        log(f"app dir {base}: run dir {spec.run_dir}, init model {spec.init_model}, registry {shown}")
        summary = run_server(grid, spec, log=log)
        if on_done is not None:
            on_done(summary)

    return server_app


#: The ServerApp of ``flwr run`` / ``flower-superlink`` deployments (run config from pyproject/CLI).
app = make_server_app()

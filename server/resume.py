"""Round checkpoints and resume of a server run: what :mod:`server.app` writes per round and checks on resume.

Per closed round ``n`` ``<run-dir>/checkpoints/round_<n>/`` holds the global weights as a lungvl
checkpoint, ``server_state.pt`` (momentum buffer, round, accountant, numpy/torch/python global RNG
states, config; loadable with ``torch.load(weights_only=True)``) and ``server_state.json`` (the same
without arrays, plus the sha256 of ``server_state.pt``). :func:`check_resume` verifies all of it, writing
nothing, before a run is resumed (the module docstring of :mod:`server.app` has the whole protocol).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.arrays import arrays_to_model, model_to_arrays
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from server.aggregation import Arrays
from server.config import ServerConfig
from server.registry import Registry, RegistryError
from server.round_engine import RoundEngine

__all__ = [
    "RUN_FILE",
    "STATE_FILE",
    "STATE_SUMMARY",
    "CheckpointMismatch",
    "ResumePoint",
    "ResumeRefused",
    "check_resume",
    "load_round_checkpoint",
    "restore_rng_states",
    "save_round_checkpoint",
]

RUN_FILE = "run.json"
STATE_FILE = "server_state.pt"
STATE_SUMMARY = "server_state.json"
#: Settings that may differ between an interrupted run and its resumption.
_RESUMABLE_CHANGES = frozenset({"rounds", "round_timeout_s"})


class ResumeRefused(ValueError):
    """A run cannot be resumed as asked (unreadable run.json, unknown run, changed settings...); nothing was written."""


class CheckpointMismatch(ResumeRefused, CheckpointError):
    """A checkpoint file is missing or differs from the sha256 recorded when it was written.

    Attributes:
        path: the file.
        expected: the recorded sha256.
        actual: the file's sha256 (``None``: missing).
    """

    def __init__(self, path: Path, expected: str, actual: str | None, *, recorded_in: str) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        found = "the file is missing" if actual is None else f"actual sha256 {actual}"
        super().__init__(f"refusing to resume: {path}: expected sha256 {expected} ({recorded_in}), {found}")


@dataclass(frozen=True)
class ResumePoint:
    """Where a checked resume continues: the run, its last closed round and that round's checkpoint."""

    run_id: int
    last_round: int
    checkpoint: Path | None  # None when no round was closed (the run starts again from the initial model)


def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the numpy, torch and python global RNGs to a round checkpoint's ``"rng"`` states."""
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save_round_checkpoint(directory: Path, model: LungVLModel, engine: RoundEngine, meta: Mapping[str, Any]) -> str:
    """Write a round's checkpoint (weights + server state); returns the sha256 of its model.pt."""
    arrays_to_model(model, engine.weights)
    save_checkpoint(directory, model, {"round": engine.round, **meta})
    state = engine.state_dict()
    acc = state["accountant"]
    payload = {
        "format": 1,
        "round": state["round"],
        "momentum_round": state["momentum_round"],
        "dro_json": json.dumps({"site_log_weights": state["site_log_weights"], "dro_phase": state["dro_phase"]}),
        "momentum": None if state["momentum"] is None else [torch.from_numpy(m) for m in state["momentum"]],
        "accountant_json": json.dumps(acc),
        "site_names_json": json.dumps(state["site_names"]),
        "config_json": json.dumps(state["config"]),
        "rng": _rng_states(),
    }
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(directory / STATE_FILE)
    summary = {k: state[k] for k in ("round", "accountant", "site_names", "config")}
    summary["epsilon"] = None if engine.accountant is None else engine.accountant.epsilon
    summary["server_state_sha256"] = sha256_file(directory / STATE_FILE)
    (directory / STATE_SUMMARY).write_text(json.dumps(summary, indent=2))
    return sha256_file(directory / "model.pt")


def load_round_checkpoint(directory: str | Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a round checkpoint: ``(weights, engine_state)``; the RNG states come back under ``"rng"``."""
    d = Path(directory)
    model, _ = load_checkpoint(d)
    raw = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    state = {
        "round": int(raw["round"]),
        "momentum_round": int(raw.get("momentum_round", raw["round"])),
        **json.loads(raw.get("dro_json", "{}")),
        "momentum": None if raw["momentum"] is None else [t.numpy() for t in raw["momentum"]],
        "accountant": json.loads(raw["accountant_json"]),
        "site_names": json.loads(raw["site_names_json"]),
        "config": json.loads(raw["config_json"]),
        "rng": raw["rng"],
    }
    return model_to_arrays(model), state


def _check_resumable(saved: Mapping[str, Any], current: ServerConfig) -> None:
    # a setting added after the checkpoint was written counts as its default there
    defaults = ServerConfig().to_dict()
    changed = sorted(
        k for k, v in current.to_dict().items() if saved.get(k, defaults[k]) != v and k not in _RESUMABLE_CHANGES
    )
    if changed:
        raise ResumeRefused(
            "cannot resume with different settings: "
            + ", ".join(f"{k} {saved.get(k)!r} -> {getattr(current, k)!r}" for k in changed)
        )


def _verify(path: Path, expected: str, recorded_in: str) -> None:
    actual = sha256_file(path) if path.is_file() else None
    if actual != expected.lower():
        raise CheckpointMismatch(path, expected, actual, recorded_in=recorded_in)


def _read_json(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))[key]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeRefused(f"refusing to resume: no {key!r} in {path} ({type(err).__name__}: {err})") from err


def check_resume(run_dir: str | Path, registry: Registry, config: ServerConfig) -> ResumePoint:
    """Check, writing nothing, that the run recorded in ``run_dir`` can be resumed with ``config``.

    ``run.json`` must be readable and name a run of ``registry``; the last closed round's ``model.pt``
    must have the sha256 the registry recorded for that round's checkpoint, its ``server_state.pt`` the
    ``server_state_sha256`` of its ``server_state.json``, its state must be that round's, and only
    ``rounds``/``round_timeout_s`` may differ from the saved settings. Cheap enough to call before
    starting anything (``run_simulation`` and ``start_server`` do; :func:`run_server` does again).

    Raises:
        FileNotFoundError: no ``run.json`` in ``run_dir``.
        CheckpointMismatch: a checkpoint file missing or changed (the message names it, both hashes).
        ResumeRefused: anything else above.
    """
    d = Path(run_dir)
    run_file = d / RUN_FILE
    if not run_file.exists():
        raise FileNotFoundError(f"nothing to resume: {run_file} does not exist (start the run without resume)")
    try:
        run_id = int(_read_json(run_file, "run_id"))
    except (TypeError, ValueError) as err:
        raise ResumeRefused(f"refusing to resume: {run_file} has no usable run_id ({err})") from err
    try:
        last = registry.last_closed_round(run_id)
    except RegistryError as err:
        raise ResumeRefused(f"refusing to resume: {run_file} names run {run_id}, not in {registry.url}") from err
    if last == 0:
        return ResumePoint(run_id, 0, None)
    directory = d / "checkpoints" / f"round_{last}"
    recorded = {int(c["round"]): str(c["sha256"]) for c in registry.checkpoints(run_id)}
    if last not in recorded:
        raise ResumeRefused(
            f"refusing to resume: round {last} of run {run_id} is closed but {registry.url} records no checkpoint of it"
        )
    _verify(directory / "model.pt", recorded[last], f"recorded in the registry for run {run_id} round {last}")
    summary = directory / STATE_SUMMARY
    _verify(directory / STATE_FILE, str(_read_json(summary, "server_state_sha256")), f"recorded in {summary}")
    raw = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if int(raw["round"]) != last:
        raise ResumeRefused(f"refusing to resume: {directory} holds the state after round {raw['round']}, not {last}")
    _check_resumable(json.loads(raw["config_json"]), config)
    return ResumePoint(run_id, last, directory)

"""Model checkpoints: a directory holding weights, the resolved config and the tokenizer.

::

    <ckpt>/
      model.pt        state_dict (fp32, CPU tensors)
      config.json     LungVLConfig.to_dict()
      tokenizer/      the report tokenizer (tokenizers / transformers format)
      meta.json       stage, steps, train config, metrics, sha256 of model.pt, lungvl version
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from lungvl_model.errors import CorruptStateError
from lungvl_model.models.config import LungVLConfig
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.text.tokenizer import load_tokenizer, save_tokenizer
from lungvl_model.version import software_version

FORMAT_VERSION = 1


class CheckpointError(CorruptStateError):
    """A checkpoint directory is missing a file, holds a damaged one, or does not fit the model.

    The message names the file.
    """


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(directory: str | Path, model: LungVLModel, meta: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory (weights, config, tokenizer, meta).

    Args:
        directory: target directory (created).
        model: the model.
        meta: extra JSON-able facts (stage, train config, metrics...).

    Returns:
        The directory.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    tmp = d / "model.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(d / "model.pt")
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    save_tokenizer(model.tokenizer, d / "tokenizer")
    full = {
        "format": FORMAT_VERSION,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "lungvl_version": software_version(),
        **(meta or {}),
    }
    full["model_sha256"] = sha256_file(d / "model.pt")
    full["parameters"] = model.num_parameters()
    (d / "meta.json").write_text(json.dumps(full, indent=2, default=str))
    return d


def load_checkpoint(
    directory: str | Path, *, config: LungVLConfig | None = None, map_location: str | torch.device = "cpu"
) -> tuple[LungVLModel, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory.

    Args:
        directory: a directory written by :func:`save_checkpoint`.
        config: override the saved config (must describe the same architecture).
        map_location: where to load tensors.

    Returns:
        ``(model, meta)``.

    Raises:
        CheckpointError: a file is missing, the weights' hash differs from meta.json, or the weights do
            not fit the architecture.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    for name in ("model.pt", "config.json", "tokenizer", "meta.json"):
        if not (d / name).exists():
            raise CheckpointError(f"{d}: not a lungvl checkpoint ({name} missing)")
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory")
    meta = _read_json(d / "meta.json")
    digest = sha256_file(d / "model.pt")
    if meta.get("model_sha256") and meta["model_sha256"] != digest:
        raise CheckpointError(
            f"{d}/model.pt: sha256 {digest[:12]}… differs from meta.json {meta['model_sha256'][:12]}…"
        )
    try:
        cfg = config or LungVLConfig.from_dict(_read_json(d / "config.json"))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d}/config.json: not a model config this lungvl can build ({e})") from None
    try:
        tok = load_tokenizer(d / "tokenizer")
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
        raise CheckpointError(f"{d}/tokenizer: cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None
    model = LungVLModel(cfg, tok)
    try:
        state = torch.load(d / "model.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError...
        raise CheckpointError(f"{d}/model.pt: damaged ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{d}/model.pt: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{d}: weights do not fit the configured architecture ({str(e)[:300]})") from e
    return model, meta

"""A module's weights and its JSON document stored beside a checkpoint: written atomically, read back checked.

Used by the nodule-level risk head (``nodule_risk.pt`` / ``.json``) and the fine detector
(``fine_detector.pt`` / ``.json``). The JSON (config, facts, sha256 of the weights) is written last, so a
reader never sees a JSON whose weights are not in place; reading checks both files exist, the JSON is an
object with a ``config`` object, and the weights' hash matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from lungvl_model.errors import CorruptStateError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_pair(
    directory: str | Path, files: tuple[str, str], state: dict[str, torch.Tensor], doc: dict[str, Any]
) -> Path:
    """Write ``state`` to ``files[0]`` and ``doc`` + the weights' sha256 to ``files[1]``, each atomically.

    Args:
        directory: the checkpoint directory (must exist).
        files: ``(weights name, JSON name)``.
        state: the tensors to save (already on CPU in the stored dtype).
        doc: the JSON document (``sha256`` is added).

    Returns:
        The JSON path.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    pt, js = d / files[0], d / files[1]
    tmp = d / (files[0] + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, pt)
    tmp = d / (files[1] + ".tmp")
    tmp.write_text(json.dumps({**doc, "sha256": sha256_file(pt)}, indent=2, default=float), encoding="utf-8")
    os.replace(tmp, js)
    return js


def read_pair(directory: str | Path, files: tuple[str, str], what: str) -> tuple[Path, dict[str, Any]] | None:
    """Check the pair stored beside a checkpoint and return ``(weights path, JSON document)``.

    Args:
        directory: the checkpoint directory.
        files: ``(weights name, JSON name)``.
        what: the module's name in error messages (``"the nodule risk head"``).

    Returns:
        None when neither file exists (nothing stored).

    Raises:
        CorruptStateError: naming the file, when one of the two is missing, the JSON is unreadable or not an
            object with a ``config`` object, or the weights' hash differs from the JSON's.
    """
    d = Path(directory)
    pt, js = d / files[0], d / files[1]
    if not pt.exists() and not js.exists():
        return None
    for p in (pt, js):
        if not p.is_file():
            raise CorruptStateError(f"{p}: missing ({what} needs both {' and '.join(files)})")
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStateError(f"{js}: damaged ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise CorruptStateError(f"{js}: expected a JSON object with a 'config' object")
    digest = sha256_file(pt)
    if doc.get("sha256") != digest:
        raise CorruptStateError(f"{pt}: sha256 {digest[:12]}… differs from {js.name} {str(doc.get('sha256'))[:12]}…")
    return pt, doc


def load_weights(module: torch.nn.Module, pt: Path) -> None:
    """Load ``pt`` into ``module`` strictly (float32); CorruptStateError naming the file when it does not fit."""
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError...
        raise CorruptStateError(
            f"{pt}: damaged or does not fit the config ({type(e).__name__}: {str(e)[:200]})"
        ) from None

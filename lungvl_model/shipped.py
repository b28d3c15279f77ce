"""The reference model shipped with lungvl: what ``explain`` and ``evaluate`` use when ``--model`` is omitted.

It lives in the repository's ``models/`` folder (a lungvl checkpoint directory with its model card,
``MODEL_CARD.md``); the environment variable ``LUNGVL_MODEL`` points elsewhere (another checkpoint
directory, e.g. a consortium's fine-tuned model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["MODEL_ENV", "SHIPPED_MODEL", "shipped_model_dir"]

#: Name of the shipped model's folder under ``models/``.
SHIPPED_MODEL: Final = "lungvl-tiny-v1"
#: Environment variable naming a checkpoint directory to use instead of the shipped model.
MODEL_ENV: Final = "LUNGVL_MODEL"


def shipped_model_dir() -> Path:
    """The checkpoint directory used when a command is given no ``--model``.

    Returns:
        ``$LUNGVL_MODEL`` when set, else ``<repository>/models/lungvl-tiny-v1``.

    Raises:
        FileNotFoundError: the directory holds no ``model.pt`` (the message names it and what to do).
    """
    env = os.environ.get(MODEL_ENV, "").strip()
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "models" / SHIPPED_MODEL
    if not (path / "model.pt").is_file():
        where = f"${MODEL_ENV}={env}" if env else f"the shipped model {path}"
        raise FileNotFoundError(
            f"no --model given and {where} holds no model.pt: pass --model CHECKPOINT_DIR "
            f"(or set {MODEL_ENV}; an installed wheel does not carry the repository's models/ folder)"
        )
    return path

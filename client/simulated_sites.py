"""Synthetic sites for a ``flwr run`` simulation without a site table: one per partition id, generated once."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lungvl_model.data.synth import SynthConfig, generate_site

__all__ = ["SYNTHETIC_COHORTS", "synthetic_site"]

logger = logging.getLogger(__name__)

#: Cohorts of the synthetic sites of a ``flwr run`` simulation, by partition id (cycled).
SYNTHETIC_COHORTS = ("screening", "referral", "low_resource")
#: Synthetic site settings (run config key → default).
_SYNTH_DEFAULTS: dict[str, int | float] = {
    "synthetic-studies": 3,
    "synthetic-matrix": 64,
    "synthetic-z-extent-mm": 120.0,
    "synthetic-seed": 0,
}


def _synth_setting(run_config: Mapping[str, Any], key: str) -> int | float:
    default = _SYNTH_DEFAULTS[key]
    value = run_config.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or (isinstance(default, int) and not isinstance(value, int)):
        raise ValueError(f"run config {key!r} must be {type(default).__name__}, got {value!r}")
    return value


def synthetic_site(run_config: Mapping[str, Any], partition_id: int, cache: Path) -> Path:
    """The synthetic site of ``partition_id`` under ``cache``, generated on first use.

    Deterministic (cohort and seed from the partition id and the run config): every process that needs
    the site gets the same one. The first generates it into a temporary folder under an exclusive file
    lock and renames it into place; the others wait on the lock and reuse it. The folder name carries a
    hash of the settings, so changed settings generate a new site instead of reusing a stale one.

    Raises:
        ValueError: a ``synthetic-*`` setting of the wrong type or out of range (the key and value named).
    """
    studies, matrix, z_mm, seed = (_synth_setting(run_config, k) for k in _SYNTH_DEFAULTS)
    cohort = SYNTHETIC_COHORTS[partition_id % len(SYNTHETIC_COHORTS)]
    name = f"sim-{partition_id}-{cohort}"
    try:
        synth = SynthConfig(
            cohort, int(studies), cache, seed=int(seed) + partition_id, matrix=int(matrix), z_extent_mm=float(z_mm)
        )
    except ValueError as err:
        raise ValueError(f"run config synthetic-* settings: {err}") from None
    settings = json.dumps({k: v for k, v in synth.to_dict().items() if k != "out_dir"}, sort_keys=True)
    target = cache / f"{name}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"
    if (target / "site.toml").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (target / "site.toml").is_file():
            tmp = cache / f".{target.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info("partition %d: generating synthetic site %s (%s)", partition_id, target, cohort)
            generate_site(SynthConfig(**{**synth.to_dict(), "out_dir": tmp, "site_name": name}))
            tmp.rename(target)
    return target

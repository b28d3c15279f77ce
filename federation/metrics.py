"""Example-weighted means of the sites' scalar metrics (the federated and local-only ``global`` scope)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

from federation.protocol import NUM_EXAMPLES

__all__ = ["NOT_GLOBAL", "weighted_means"]

#: Site metrics that stay per site (bookkeeping, each site's own DP figures): no global mean of them.
NOT_GLOBAL: Final = (
    NUM_EXAMPLES, "num_batches", "local_steps", "local_epochs", "seconds", "update_norm", "epsilon", "delta",
    "dp_sgd_noise_multiplier", "dp_sgd_max_grad_norm", "sample_rate", "dp_steps", "budget_exhausted",
)  # fmt: skip


def weighted_means(
    rows: Iterable[tuple[int, Mapping[str, float]]], skip: Iterable[str] = NOT_GLOBAL
) -> dict[str, float]:
    """Example-weighted mean per metric name over the rows that have it.

    Args:
        rows: ``(num_examples, metrics)`` per site.
        skip: metric names left out (default :data:`NOT_GLOBAL`).

    Returns:
        name -> ``Σ n·v / Σ n`` over the rows where the value is finite and ``n > 0``; names sorted.
    """
    skipped = set(skip)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in rows:
        for k, v in metrics.items():
            if k in skipped or n <= 0 or not math.isfinite(v):
                continue
            sums[k] = sums.get(k, 0.0) + n * v
            weights[k] = weights.get(k, 0.0) + n
    return {k: sums[k] / weights[k] for k in sorted(sums)}

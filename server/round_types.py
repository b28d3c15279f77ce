"""The plain values of a DP-FedAvgM round, without Flower types.

What the server sends with round ``t`` (:func:`round_config`, whose seed :func:`round_seed` depends on
``(seed, t)`` only), one site's answer (:class:`SiteReply`), what a round did (:class:`RoundOutcome`),
and the example-weighted mean of the sites' metrics (:func:`weighted_means`). The round engine
(:mod:`server.round_engine`) works on these; the Flower strategy (:mod:`server.strategy`) converts
``Message`` objects to and from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from lungvl_model.federation_protocol import NUM_EXAMPLES, RoundConfig
from server.aggregation import Arrays
from server.config import ServerConfig

__all__ = ["NOT_GLOBAL", "RoundOutcome", "SiteReply", "round_config", "round_seed", "weighted_means"]

#: Site metrics that stay per site (bookkeeping, each site's own DP figures): no global mean of them.
NOT_GLOBAL = (
    NUM_EXAMPLES, "num_batches", "local_steps", "local_epochs", "seconds", "update_norm", "epsilon", "delta",
    "noise_multiplier", "max_grad_norm", "sample_rate", "dp_steps", "budget_exhausted",
)  # fmt: skip


def round_seed(seed: int, rnd: int) -> int:
    """The seed sent to the sites in round ``rnd`` (a function of ``(seed, rnd)`` only, so a resumed run repeats it)."""
    return int(np.random.SeedSequence([seed, rnd]).generate_state(1)[0] & 0x7FFFFFFF)


def round_config(c: ServerConfig, rnd: int) -> RoundConfig:
    """The config record a server with settings ``c`` sends with round ``rnd``'s messages."""
    return RoundConfig(
        server_round=rnd,
        stage=c.stage,
        local_steps=c.local_steps,
        lr=c.lr,
        batch_size=c.batch_size,
        seed=round_seed(c.seed, rnd),
        dp_sgd=c.dp_sgd,
        noise_multiplier=c.dp_sgd_noise_multiplier,
        max_grad_norm=c.dp_sgd_max_grad_norm,
        dg_penalty=c.dg_penalty,
        dro_step=c.dro_step,
    )


@dataclass(frozen=True)
class SiteReply:
    """One site's answer to a train or evaluate message, without Flower types.

    Attributes:
        node_id: the Flower node id.
        site_name: the site's name ("" when unknown).
        arrays: the update ``Δ = w_site − w_global`` (train) or None.
        num_examples: examples behind the update or the evaluation.
        metrics: scalar metrics (the site's whitelist).
        error: the reason of an error reply, None for a normal reply.
        seconds: time from sending to receiving the reply.
        bytes_received: size of the arrays received.
    """

    node_id: int
    site_name: str = ""
    arrays: Arrays | None = None
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    bytes_received: int | None = None


@dataclass
class RoundOutcome:
    """What one round did.

    Attributes:
        round: the round number.
        status: ``"completed"`` (model moved) or ``"failed"`` (too few usable replies; nothing moved).
        sampled: sites asked to train.
        ok: updates aggregated.
        failed: error replies, rejected updates and timeouts.
        update_norm: L2 norm of the (noisy) mean update, None when failed.
        epsilon: client-level ε after the round (None without client-level DP).
        train_metrics: example-weighted mean of the sites' train metrics.
        eval_metrics: example-weighted mean of the sites' evaluation metrics (filled after evaluation).
        statuses: site label → participation status.
    """

    round: int
    status: str
    sampled: int
    ok: int
    failed: int
    update_norm: float | None = None
    epsilon: float | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)


def weighted_means(rows: Iterable[tuple[int, Mapping[str, float]]], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Example-weighted mean per metric name over the rows that have it (finite values only)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in rows:
        for k, v in metrics.items():
            if k in skip or not math.isfinite(v) or n <= 0:
                continue
            sums[k] = sums.get(k, 0.0) + n * v
            weights[k] = weights.get(k, 0.0) + n
    return {k: sums[k] / weights[k] for k in sorted(sums)}

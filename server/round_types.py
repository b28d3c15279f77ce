"""The plain values of a DP-FedAvgM round, without Flower types.

One site's answer (:class:`SiteReply`) and what a round did (:class:`RoundOutcome`). The round engine
(:mod:`server.round_engine`) works on these; the Flower strategy (:mod:`server.strategy`) converts
``Message`` objects to and from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from server.aggregation import Arrays

__all__ = ["DEFAULT_MAX_FAILED_ROUNDS", "RoundOutcome", "RunAborted", "SiteReply"]

#: Failed rounds in a row after which a run is aborted and recorded ``failed`` (0 = never abort).
DEFAULT_MAX_FAILED_ROUNDS = 3


class RunAborted(RuntimeError):
    """The server gave up on a run (e.g. too many failed rounds in a row); the message says why."""


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

"""DP-FedAvgM as a Flower 1.42 Message-API strategy, around a Flower-free round engine.

:class:`RoundEngine` holds everything a round needs and knows nothing about Flower: the global weights,
the server momentum buffer, the client-level accountant, seeded site sampling, the fold of one reply at
a time into :class:`~server.aggregation.StreamingAggregator`, and what goes into the registry. Its
state is checkpointable (:meth:`RoundEngine.state_dict`).

:class:`DPFedAvgM` is the Flower glue: it turns engine decisions into ``Message`` objects and replies
back into :class:`SiteReply`, and runs the rounds (:meth:`DPFedAvgM.start`). It owns aggregation
rather than wrapping Flower's: in flwr 1.42 ``FedAvg.aggregate_train`` drops error replies but
aggregates whatever is left (no ``min_*`` check on replies) and raises ``InconsistentMessageReplies``
for a malformed reply, the ``DifferentialPrivacy*FixedClipping`` wrappers skip the whole round when any
reply carries an error and add noise *after* the inner strategy's aggregate (so after FedAvgM's
momentum), their accountant refuses any strategy whose ``aggregate_train`` is not FedAvg's, and
``Strategy.start`` always runs rounds ``1..num_rounds`` with ``random.sample`` sampling (no resume, no
budget stop). DESIGN.md section 4 wants none of that.

One round ``t``:

1. the sites are named once (a ``query`` message answered with ``site_name``), so that sampling,
   failures and timeouts are attributed to names that are stable across restarts;
2. ``max(⌊fraction·N⌋, min_sites)`` sites are drawn with ``default_rng([seed, t, 0])`` from the
   connected sites sorted by name; a run over its client-level ε budget stops *before* this round;
3. replies are folded as they arrive: error replies are ``failed``, non-finite, wrongly shaped or
   oversized updates are ``rejected``, sites that do not answer within ``round_timeout_s`` are
   ``timeout``; none of them is aggregated and the round goes on;
4. with at least ``min_sites`` folded updates the (noisy, with ``default_rng([seed, t, 1])``) mean update
   goes through server momentum and the accountant takes one step; otherwise the round is ``failed`` and
   the model, the momentum and ε do not move.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from lungvl_model.federation_protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    QUERY_KEY,
    SITE_NAME_KEY,
    RoundConfig,
)
from privacy.accountant import ClientLevelAccountant, PrivacyBudgetExceeded
from server.aggregation import (
    AggregationError,
    Arrays,
    StreamingAggregator,
    apply_server_momentum,
    check_update,
    l2_norm,
    shapes_of,
)
from server.config import ServerConfig
from server.registry import Registry

__all__ = [
    "SITE_NAME_KEY",
    "DPFedAvgM",
    "RoundEngine",
    "RoundOutcome",
    "SiteReply",
    "arrays_from_record",
    "arrays_to_record",
    "round_seed",
    "round_config",
]

logger = logging.getLogger(__name__)

#: Longest wait for the sites' names (the query is cheap; a silent site must not hold every round up).
NAME_QUERY_TIMEOUT_S = 300.0
#: Wait for a site that did not answer the first name query, in each later round.
NAME_REASK_TIMEOUT_S = 10.0

Log = Callable[[str], None]
#: Called after a round closes, before it is committed: ``(engine, outcome)`` (checkpoint writing).
RoundHook = Callable[["RoundEngine", "RoundOutcome"], None]

_SAMPLE, _NOISE, _EVAL = 0, 1, 2  # streams of default_rng([seed, round, stream])
#: Site metrics that stay per site (bookkeeping, each site's own DP figures): no global mean of them.
_NOT_GLOBAL = (
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


def arrays_to_record(arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """Arrays as an ``ArrayRecord`` keyed ``"0"``, ``"1"``, ... (float32 on the wire)."""
    return ArrayRecord({str(i): Array(np.ascontiguousarray(a, dtype=np.float32)) for i, a in enumerate(arrays)})


def arrays_from_record(record: ArrayRecord) -> Arrays:
    """Inverse of :func:`arrays_to_record`, ordered by the integer keys whatever the record's key order.

    Raises:
        AggregationError: keys that are not ``0..n-1``.
    """
    keys = list(record.keys())
    if sorted(keys, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(keys))]:
        raise AggregationError(f"array record keys must be '0'..'{len(keys) - 1}', got {keys[:5]}...")
    return [record[str(i)].numpy() for i in range(len(keys))]


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


def _weighted_means(rows: Iterable[tuple[int, Mapping[str, float]]], skip: tuple[str, ...] = ()) -> dict[str, float]:
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


class RoundEngine:
    """Flower-free DP-FedAvgM rounds: sampling, folding replies, momentum, accounting, bookkeeping.

    Args:
        config: the server settings.
        initial_arrays: global weights ``w_0`` (one float32 array per exchanged model tensor).
        registry: where rounds, participation, metrics and ε are recorded (None: nothing is recorded).
        run_id: the registry run (required with ``registry``).
        log: one line per notable event (a round's summary, a rejected update...).
    """

    def __init__(
        self,
        config: ServerConfig,
        initial_arrays: Sequence[np.ndarray],
        *,
        registry: Registry | None = None,
        run_id: int | None = None,
        log: Log | None = None,
    ) -> None:
        if registry is not None and run_id is None:
            raise ValueError("RoundEngine: a registry needs the run_id to record into")
        self.config = config
        self.weights: Arrays = [np.array(a, dtype=np.float32, copy=True) for a in initial_arrays]
        self.shapes = shapes_of(self.weights)
        self.momentum: Arrays | None = None
        self.round = 0  # last round closed (completed or failed)
        self.accountant: ClientLevelAccountant | None = None
        self.site_names: dict[int, str] = {}
        self.registry = registry
        self.run_id = run_id
        self.log: Log = log or (lambda line: logger.info("%s", line))
        self._current: int | None = None
        self._sampled: dict[int, str] = {}
        self._seen: set[int] = set()
        self._agg: StreamingAggregator | None = None
        self._train_rows: list[tuple[int, Mapping[str, float]]] = []
        self._statuses: dict[str, str] = {}
        self._failed = 0

    # ------------------------------------------------------------------ naming and sampling
    def label(self, node_id: int) -> str:
        """The site's name, or ``node-<id>`` before it has told its name."""
        return self.site_names.get(node_id) or f"node-{node_id}"

    def sample(self, node_ids: Iterable[int], rnd: int) -> list[int]:
        """The sites that train in round ``rnd``: a seeded draw over the sites sorted by name.

        The draw depends on ``(seed, rnd)`` and the set of site names only (not on Flower's node ids,
        which change between runs), so a resumed run samples as the uninterrupted one would.
        """
        ordered = sorted(set(node_ids), key=lambda n: (self.label(n), n))
        k = self.config.sample_size(len(ordered))
        rng = np.random.default_rng([self.config.seed, rnd, _SAMPLE])
        picked = sorted(rng.choice(len(ordered), size=k, replace=False).tolist()) if k else []
        return [ordered[i] for i in picked]

    def sample_evaluate(self, node_ids: Iterable[int], rnd: int) -> list[int]:
        """The sites that evaluate the global model after round ``rnd`` (``fraction_evaluate``; 0 → none)."""
        ordered = sorted(set(node_ids), key=lambda n: (self.label(n), n))
        if self.config.fraction_evaluate == 0 or not ordered:
            return []
        k = min(len(ordered), max(1, math.ceil(len(ordered) * self.config.fraction_evaluate)))
        rng = np.random.default_rng([self.config.seed, rnd, _EVAL])
        return [ordered[i] for i in sorted(rng.choice(len(ordered), size=k, replace=False).tolist())]

    def round_config(self, rnd: int) -> RoundConfig:
        """The config record sent with round ``rnd``'s train and evaluate messages."""
        return round_config(self.config, rnd)

    # ------------------------------------------------------------------ a round
    def _ensure_accountant(self, total_sites: int, expected_sites: int) -> ClientLevelAccountant:
        acc = self.accountant
        if acc is None or acc.total_sites != total_sites or acc.expected_sites != expected_sites:
            c = self.config
            fresh = ClientLevelAccountant(
                total_sites=total_sites,
                expected_sites=expected_sites,
                noise_multiplier=c.noise_multiplier,
                delta=c.delta,
                target_epsilon=c.target_epsilon or None,
                accountant=c.accountant,
            )
            if acc is not None:  # the federation changed size: keep the steps already taken
                fresh.load_state_dict(acc.state_dict())
            self.accountant = acc = fresh
        return acc

    def begin_round(self, rnd: int, sampled: Sequence[int], total_sites: int) -> None:
        """Open round ``rnd`` with the ``sampled`` node ids out of ``total_sites`` connected.

        Raises:
            PrivacyBudgetExceeded: with client-level DP, when this round would take ε past ``target_epsilon``
                (nothing is recorded; the caller stops the run).
            ValueError: a round already open, or a round number that does not follow the last one.
        """
        if self._current is not None:
            raise ValueError(f"round {self._current} is still open; close_round() it first")
        if rnd != self.round + 1:
            raise ValueError(f"round {rnd} does not follow the last closed round {self.round}")
        if self.config.client_dp and sampled:
            self._ensure_accountant(total_sites, len(sampled)).check_next_round()
        if self.registry is not None and self.run_id is not None:
            self.registry.start_round(self.run_id, rnd, sampled=len(sampled))
        self._current = rnd
        self._sampled = {n: self.label(n) for n in sampled}
        self._seen = set()
        self._agg = StreamingAggregator(self.shapes, clip_norm=self.config.clip_norm or None)
        self._train_rows = []
        self._statuses = {}
        self._failed = 0

    def _participation(self, reply: SiteReply, status: str, **kw: Any) -> None:
        self._statuses[self.label(reply.node_id)] = status
        if status != "ok":
            self._failed += 1
        if self.registry is not None and self.run_id is not None and self._current is not None:
            self.registry.record_participation(
                self.run_id,
                self._current,
                node_id=reply.node_id,
                site_name=self.site_names.get(reply.node_id, ""),
                status=status,
                seconds=reply.seconds,
                bytes_received=reply.bytes_received,
                **kw,
            )

    def fold(self, reply: SiteReply) -> str:
        """Record one train reply and, when usable, fold its update into the round's sum.

        Returns:
            The participation status: ``ok``, ``failed`` (error reply), ``rejected`` (unusable update,
            unexpected or duplicate reply).
        """
        if self._current is None or self._agg is None:
            raise ValueError("fold() outside a round; begin_round() first")
        if reply.site_name:
            self.site_names.setdefault(reply.node_id, reply.site_name)
        name = self.label(reply.node_id)
        if reply.node_id not in self._sampled or reply.node_id in self._seen:
            why = "duplicate reply" if reply.node_id in self._seen else "reply from a site that was not sampled"
            self.log(f"round {self._current}: {name}: {why}, ignored")
            self._participation(reply, "rejected", reason=why)
            return "rejected"
        self._seen.add(reply.node_id)
        if reply.error is not None:
            self.log(f"round {self._current}: {name} failed: {reply.error}")
            self._participation(reply, "failed", reason=reply.error[:2000])
            return "failed"
        delta = reply.arrays if reply.arrays is not None else []
        norm: float | None = None
        try:
            if isinstance(reply.num_examples, bool) or int(reply.num_examples) < 1:
                raise AggregationError(f"num_examples must be a positive integer, got {reply.num_examples!r}")
            check_update(delta, self.shapes)
            norm = l2_norm(delta)
            limit = self.config.max_update_norm
            if limit and norm > limit:
                raise AggregationError(f"update L2 norm {norm:.4g} exceeds max_update_norm {limit:.4g}")
            info = self._agg.add(delta, int(reply.num_examples))
        except AggregationError as err:
            self.log(f"round {self._current}: {name}: update rejected: {err}")
            self._participation(
                reply, "rejected", reason=str(err), num_examples=max(0, int(reply.num_examples)), update_norm=norm
            )
            return "rejected"
        self._participation(
            reply, "ok", num_examples=int(reply.num_examples), update_norm=info["norm"], clipped=info["clipped"]
        )
        self._train_rows.append((int(reply.num_examples), dict(reply.metrics)))
        self._record_site(reply)
        return "ok"

    def _record_site(self, reply: SiteReply) -> None:
        """Per-site metrics, and the site's own sample-level ε when it reports one."""
        if self.registry is None or self.run_id is None or self._current is None:
            return
        name = self.site_names.get(reply.node_id) or self.label(reply.node_id)
        finite = {k: float(v) for k, v in reply.metrics.items() if math.isfinite(v)}
        self.registry.record_metrics(self.run_id, self._current, f"site:{name}", finite)
        m = reply.metrics
        if "epsilon" in m and "delta" in m and math.isfinite(m["epsilon"]):
            self.registry.record_privacy(
                self.run_id,
                self._current,
                level="sample",
                site_name=name,
                epsilon=m["epsilon"],
                delta=m["delta"],
                noise_multiplier=m.get("noise_multiplier", 0.0),
                sample_rate=m.get("sample_rate", 0.0),
                steps=int(m.get("dp_steps", 0)),
                accountant="site",
            )

    def close_round(self) -> RoundOutcome:
        """Record the sampled sites that never answered as ``timeout`` and aggregate (or fail) the round.

        The round is not yet marked completed in the registry: :meth:`commit_round` does that once the
        caller has written the round's checkpoint.
        """
        if self._current is None or self._agg is None:
            raise ValueError("close_round() outside a round")
        rnd, c = self._current, self.config
        for node_id in sorted(set(self._sampled) - self._seen, key=self.label):
            self.log(f"round {rnd}: {self.label(node_id)} did not reply within {c.round_timeout_s:g} s")
            self._participation(SiteReply(node_id=node_id), "timeout", reason=f"no reply within {c.round_timeout_s} s")
        ok = self._agg.count
        outcome = RoundOutcome(
            round=rnd, status="failed", sampled=len(self._sampled), ok=ok, failed=self._failed, statuses=self._statuses
        )
        if ok >= c.min_sites and ok > 0:
            mean = self._agg.finalize(
                expected_sites=len(self._sampled) if c.clip_norm else None,
                noise_multiplier=c.noise_multiplier,
                rng=np.random.default_rng([c.seed, rnd, _NOISE]),
            )
            self.weights, self.momentum = apply_server_momentum(
                self.weights, mean, self.momentum, server_lr=c.server_lr, server_momentum=c.momentum
            )
            outcome.status = "completed"
            outcome.update_norm = l2_norm(mean)
            outcome.train_metrics = _weighted_means(self._train_rows, skip=_NOT_GLOBAL)
            if c.client_dp and self.accountant is not None:
                outcome.epsilon = self.accountant.step_round()
                self._record_client_privacy(rnd)
        else:
            self.log(f"round {rnd}: {ok} usable update(s) < min_sites={c.min_sites}; the model does not move")
        if self.registry is not None and self.run_id is not None and outcome.train_metrics:
            self.registry.record_metrics(self.run_id, rnd, "global", outcome.train_metrics)
        self._agg = None
        self.round = rnd
        return outcome

    def _record_client_privacy(self, rnd: int) -> None:
        acc = self.accountant
        if self.registry is None or self.run_id is None or acc is None:
            return
        self.registry.record_privacy(
            self.run_id,
            rnd,
            level="client",
            epsilon=acc.epsilon,
            delta=acc.delta,
            noise_multiplier=acc.noise_multiplier,
            sample_rate=acc.sample_rate,
            steps=acc.rounds,
            accountant=acc.accountant.name,
        )

    def record_evaluation(self, outcome: RoundOutcome, replies: Iterable[SiteReply]) -> dict[str, float]:
        """Record the sites' evaluation of the new global model; returns the example-weighted global metrics."""
        rows: list[tuple[int, Mapping[str, float]]] = []
        for r in replies:
            if r.site_name:
                self.site_names.setdefault(r.node_id, r.site_name)
            if r.error is not None:
                self.log(f"round {outcome.round}: evaluation at {self.label(r.node_id)} failed: {r.error}")
                continue
            finite = {k: float(v) for k, v in r.metrics.items() if math.isfinite(v) and k != NUM_EXAMPLES}
            rows.append((int(r.num_examples), finite))
            if self.registry is not None and self.run_id is not None:
                self.registry.record_metrics(self.run_id, outcome.round, f"site:{self.label(r.node_id)}", finite)
        outcome.eval_metrics = _weighted_means(rows, skip=_NOT_GLOBAL)
        if self.registry is not None and self.run_id is not None and outcome.eval_metrics:
            self.registry.record_metrics(self.run_id, outcome.round, "global", outcome.eval_metrics)
        return outcome.eval_metrics

    def commit_round(self, outcome: RoundOutcome) -> None:
        """Mark the round ``completed``/``failed`` in the registry (after its checkpoint is written)."""
        if self.registry is not None and self.run_id is not None:
            self.registry.end_round(
                self.run_id,
                outcome.round,
                replied=outcome.ok,
                failed=outcome.failed,
                status=outcome.status,
                update_norm=outcome.update_norm,
            )
        self._current = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last closed round (weights excluded: they go to model.pt).

        Returns:
            ``{"round", "momentum" (list of arrays or None), "accountant" (settings + history or None),
            "site_names", "config"}``.
        """
        acc = self.accountant
        return {
            "round": self.round,
            "momentum": None if self.momentum is None else [m.copy() for m in self.momentum],
            "accountant": None
            if acc is None
            else {"total_sites": acc.total_sites, "expected_sites": acc.expected_sites, "state": acc.state_dict()},
            "site_names": {str(k): v for k, v in self.site_names.items()},
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], weights: Sequence[np.ndarray]) -> None:
        """Continue from a state written by :meth:`state_dict` with the global ``weights`` of that round.

        Raises:
            ValueError: weights or momentum that do not fit the model.
        """
        if shapes_of(weights) != self.shapes:
            raise ValueError(
                f"checkpoint weights have shapes {shapes_of(weights)[:3]}..., expected {self.shapes[:3]}..."
            )
        self.weights = [np.array(w, dtype=np.float32, copy=True) for w in weights]
        mom = state.get("momentum")
        if mom is not None and shapes_of(mom) != self.shapes:
            raise ValueError("checkpoint momentum buffer does not fit the model")
        self.momentum = None if mom is None else [np.array(m, copy=True) for m in mom]
        self.round = int(state["round"])
        self.site_names = {int(k): str(v) for k, v in dict(state.get("site_names", {})).items()}
        self.accountant = None
        acc = state.get("accountant")
        if acc is not None and self.config.client_dp:
            self._ensure_accountant(int(acc["total_sites"]), int(acc["expected_sites"])).load_state_dict(acc["state"])


# ====================================================================================== Flower glue


def _config_record(rc: RoundConfig) -> ConfigRecord:
    values: dict[str, ConfigRecordValues] = dict(rc.to_record())
    return ConfigRecord(values)


def _reply_to_site(msg: Message, site_names: Mapping[int, str], sent_at: float) -> SiteReply:
    """Turn a Flower reply into a :class:`SiteReply` (content that cannot be read becomes an error)."""
    node = int(msg.metadata.src_node_id)
    name = site_names.get(node, "")
    seconds = max(0.0, time.time() - sent_at)
    if msg.has_error():
        err = msg.error
        return SiteReply(node_id=node, site_name=name, error=f"[code {err.code}] {err.reason}", seconds=seconds)
    try:
        content = msg.content
        metrics_rec = content.metric_records.get(METRICS)
        metrics = {k: float(v) for k, v in (metrics_rec or {}).items() if isinstance(v, int | float)}
        arrays_rec = content.array_records.get(ARRAYS)
        arrays = None if arrays_rec is None else arrays_from_record(arrays_rec)
        size = None if arrays_rec is None else sum(len(a.data) for a in arrays_rec.values())
        n = int(metrics.get(NUM_EXAMPLES, 0))
    except (AggregationError, ValueError, TypeError, KeyError) as err:
        return SiteReply(node_id=node, site_name=name, error=f"unreadable reply: {err}", seconds=seconds)
    return SiteReply(
        node_id=node,
        site_name=name,
        arrays=arrays,
        num_examples=n,
        metrics={k: v for k, v in metrics.items() if k != NUM_EXAMPLES},
        seconds=float(metrics.get("seconds", seconds)),
        bytes_received=size,
    )


class DPFedAvgM(Strategy):
    """DP-FedAvgM (server momentum + client-level DP) over Flower's Message API.

    Args:
        config: server settings.
        registry: run registry (None: nothing recorded).
        run_id: the registry run.
        on_round_end: called after each closed round, before it is committed (the ServerApp writes the
            round's checkpoint there).
        log: one line per round (and per notable event).
        state: an engine state to resume from (see :meth:`RoundEngine.state_dict`); the weights are the
            ``initial_arrays`` given to :meth:`start`.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        registry: Registry | None = None,
        run_id: int | None = None,
        on_round_end: RoundHook | None = None,
        log: Log | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.run_id = run_id
        self.on_round_end = on_round_end
        self.log: Log = log or (lambda line: logger.info("%s", line))
        self.resume_state = state
        self.engine: RoundEngine | None = None
        self.stopped_by_budget = False
        self._sent_at = 0.0
        self._last_outcome: RoundOutcome | None = None
        self._asked: set[int] = set()

    def summary(self) -> None:
        """Log the settings."""
        c = self.config
        dp = f"client-level DP σ={c.noise_multiplier}, C={c.clip_norm}" if c.client_dp else "no client-level DP"
        self.log(
            f"DPFedAvgM: {c.strategy}, η={c.server_lr}, β={c.momentum}, fraction={c.fraction_train}, "
            f"min_sites={c.min_sites}, {dp}"
        )

    def _engine(self) -> RoundEngine:
        if self.engine is None:
            raise RuntimeError("DPFedAvgM: start() creates the round engine; call it first")
        return self.engine

    # ------------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's sites (seeded) and build one train message per site."""
        eng = self._engine()
        nodes = list(grid.get_node_ids())
        sampled = eng.sample(nodes, server_round)
        eng.begin_round(server_round, sampled, total_sites=len(nodes))
        record = RecordDict({ARRAYS: arrays, CONFIG: _config_record(eng.round_config(server_round))})
        self._sent_at = time.time()
        return [Message(record, n, MessageType.TRAIN, group_id=str(server_round)) for n in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the replies one by one; returns the new global weights, or ``(None, None)`` for a failed round."""
        eng = self._engine()
        for msg in replies:
            eng.fold(_reply_to_site(msg, eng.site_names, self._sent_at))
        outcome = eng.close_round()
        self._last_outcome = outcome
        if outcome.status != "completed":
            return None, None
        return arrays_to_record(eng.weights), MetricRecord(dict(outcome.train_metrics))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message per site drawn for evaluation (``fraction_evaluate``)."""
        eng = self._engine()
        nodes = eng.sample_evaluate(grid.get_node_ids(), server_round)
        record = RecordDict({ARRAYS: arrays, CONFIG: _config_record(eng.round_config(server_round))})
        self._sent_at = time.time()
        return [Message(record, n, MessageType.EVALUATE, group_id=str(server_round)) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted global evaluation metrics (also recorded per site and globally)."""
        eng = self._engine()
        outcome = self._last_outcome
        if outcome is None or outcome.round != server_round:
            outcome = RoundOutcome(round=server_round, status="completed", sampled=0, ok=0, failed=0)
        metrics = eng.record_evaluation(outcome, (_reply_to_site(m, eng.site_names, self._sent_at) for m in replies))
        return MetricRecord(dict(metrics)) if metrics else None

    # ------------------------------------------------------------------ transport helpers
    def _stream(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Iterator[Message]:
        """Push messages, then yield replies as they arrive until all came back or ``timeout`` passed."""
        ids = set(grid.push_messages(list(messages)))
        deadline = time.time() + timeout
        while ids and time.time() < deadline:
            got = list(grid.pull_messages(ids))
            for msg in got:
                ids.discard(msg.metadata.reply_to_message_id)
                yield msg
            if ids and not got:
                time.sleep(0.1)

    def learn_site_names(self, grid: Grid, timeout: float) -> None:
        """Ask connected sites without a known name for it (a ``query`` message, at most ``timeout`` s).

        A node is asked with the full ``timeout`` the first time (a site's ClientApp may still be
        starting: torch import, data catalogue, model load) and with :data:`NAME_REASK_TIMEOUT_S` in
        later rounds while it has not answered; until then it is recorded as ``node-<id>``.
        """
        eng = self._engine()
        unknown = [n for n in grid.get_node_ids() if n not in eng.site_names]
        if not unknown:
            return
        first = [n for n in unknown if n not in self._asked]
        self._asked.update(unknown)
        record = RecordDict({CONFIG: ConfigRecord({QUERY_KEY: SITE_NAME_KEY})})
        msgs = [Message(record, n, MessageType.QUERY) for n in unknown]
        for reply in self._stream(grid, msgs, timeout if first else min(timeout, NAME_REASK_TIMEOUT_S)):
            if reply.has_error():
                continue
            cfg = reply.content.config_records.get(CONFIG)
            name = None if cfg is None else cfg.get(SITE_NAME_KEY)
            if isinstance(name, str) and name:
                eng.site_names[int(reply.metadata.src_node_id)] = name

    def _wait_for_sites(self, grid: Grid, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        while len(nodes := list(grid.get_node_ids())) < self.config.min_sites and time.time() < deadline:
            time.sleep(0.5)
        return nodes

    # ------------------------------------------------------------------ the run
    def start(  # noqa: D417 - Flower's arguments are documented on Strategy.start
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds ``last+1 .. num_rounds`` (``config.rounds`` by default), stopping early at the ε budget.

        Unlike ``Strategy.start``: it continues after a resumed state, stops cleanly before a round over
        the client-level budget (:attr:`stopped_by_budget`), streams replies into the aggregator as they
        arrive, and calls :attr:`on_round_end` before committing each round.

        Args:
            initial_arrays: the global weights to start from (the resumed round's weights when resuming).
            num_rounds: last round to run (default ``config.rounds``).
            timeout: seconds to wait for a round's replies (default ``config.round_timeout_s``).

        Returns:
            Flower's ``Result`` with the final arrays and per-round aggregated metrics.
        """
        c = self.config
        last = num_rounds if num_rounds is not None else c.rounds
        wait = float(timeout if timeout is not None else c.round_timeout_s)
        self.engine = RoundEngine(
            c, arrays_from_record(initial_arrays), registry=self.registry, run_id=self.run_id, log=self.log
        )
        if self.resume_state is not None:
            self.engine.load_state_dict(self.resume_state, self.engine.weights)
        eng = self.engine
        self.summary()
        result = Result(arrays=initial_arrays)
        nodes = self._wait_for_sites(grid, wait)
        self.log(f"{len(nodes)} site(s) connected; rounds {eng.round + 1}..{last}")
        for rnd in range(eng.round + 1, last + 1):
            self.learn_site_names(grid, min(wait, NAME_QUERY_TIMEOUT_S))
            t0 = time.time()
            try:
                messages = list(self.configure_train(rnd, arrays_to_record(eng.weights), ConfigRecord(), grid))
            except PrivacyBudgetExceeded as err:
                self.stopped_by_budget = True
                self.log(f"round {rnd}: stopping before it: {err}")
                break
            new_arrays, train_metrics = self.aggregate_train(rnd, self._stream(grid, messages, wait))
            outcome = self._last_outcome
            assert outcome is not None  # set by aggregate_train
            if new_arrays is not None:
                result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            if outcome.status == "completed":
                eval_msgs = list(
                    self.configure_evaluate(rnd, new_arrays or arrays_to_record(eng.weights), ConfigRecord(), grid)
                )
                if eval_msgs:
                    agg = self.aggregate_evaluate(rnd, self._stream(grid, eval_msgs, wait))
                    if agg is not None:
                        result.evaluate_metrics_clientapp[rnd] = agg
                if evaluate_fn is not None:
                    res = evaluate_fn(rnd, result.arrays)
                    if res is not None:
                        result.evaluate_metrics_serverapp[rnd] = res
            if self.on_round_end is not None:
                self.on_round_end(eng, outcome)
            eng.commit_round(outcome)
            self.log(_round_line(outcome, time.time() - t0, last))
        return result


def _round_line(o: RoundOutcome, seconds: float, last: int) -> str:
    """One human line per round (printed by the simulation)."""
    parts = [f"round {o.round}/{last} {o.status}: {o.ok}/{o.sampled} updates"]
    if o.failed:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(o.statuses.items()) if v != "ok")
        parts.append(f"({bad})")
    if o.update_norm is not None:
        parts.append(f"|Δ̄|={o.update_norm:.3g}")
    for k in ("train_loss", "val_loss", "val_auc", "val_dice"):
        v = o.train_metrics.get(k, o.eval_metrics.get(k))
        if v is not None:
            parts.append(f"{k}={v:.4g}")
    if o.epsilon is not None:
        parts.append(f"ε={o.epsilon:.3g}")
    parts.append(f"{seconds:.1f} s")
    return " ".join(parts)

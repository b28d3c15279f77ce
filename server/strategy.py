"""DP-FedAvgM as a Flower 1.42 Message-API strategy, around a Flower-free round engine.

:class:`~server.round_engine.RoundEngine` holds everything a round needs and knows nothing about
Flower: the global weights, the server momentum buffer, the client-level accountant, site sampling,
the fold of one reply at a time into :class:`~server.aggregation.StreamingAggregator`, and
what goes into the registry. Its state is checkpointable
(:meth:`~server.round_engine.RoundEngine.state_dict`). The plain values a round exchanges live in
:mod:`server.round_types`.

:class:`DPFedAvgM` is the Flower glue: it turns engine decisions into ``Message`` objects and replies
back into :class:`~server.round_types.SiteReply`, and runs the rounds (:meth:`DPFedAvgM.start`). It owns aggregation
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
2. a run over its client-level ε budget stops *before* this round; the sites are drawn from the
   connected ones sorted by name: with ``site_sampling = "poisson"`` each independently with probability
   ``fraction_train``, with ``"fixed"`` ``max(⌊fraction·N⌋, min_sites)`` of them; a draw below
   ``min_sites`` asks nobody and the round fails;
3. replies are folded as they arrive: error replies are ``failed``, non-finite, wrongly shaped or
   oversized updates are ``rejected``, sites that do not answer within ``round_timeout_s`` are
   ``timeout``; none of them is aggregated and the round goes on;
4. with at least ``min_sites`` folded updates the mean update (with client-level DP: clipped sum plus
   Gaussian noise, divided by the expected ``q·N`` sites) goes through server momentum; otherwise the
   round is ``failed`` and the model and the momentum do not move. Under client-level DP the accountant
   takes one step either way (a failed round is a release too);
5. release once: the round's checkpoint is written (``on_round_end``) and the round committed to the
   registry, and only then is the new global model sent out for evaluation; a crash after that resumes
   after this round and never draws it again;
6. after ``max_failed_rounds`` failed rounds in a row (the engine decides,
   :meth:`~server.round_engine.RoundEngine.abort_reason`) the run stops with
   :class:`~server.round_types.RunAborted`; the ServerApp records it ``failed``.

The site sample, the noise and the evaluation sites come from fresh OS entropy, never stored or sent
(:func:`server.round_engine.round_rng`); only ``reproducible_noise`` (research, not private) seeds them
from ``(seed, round)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from federation.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, QUERY_KEY, SITE_NAME_KEY
from federation.records import RecordError, arrays_from_record, arrays_to_record, config_record
from privacy.accountant import PrivacyBudgetExceeded
from server.config import ServerConfig
from server.registry import Registry
from server.round_engine import Log, RoundEngine, RoundHook
from server.round_types import DEFAULT_MAX_FAILED_ROUNDS, RoundOutcome, RunAborted, SiteReply

__all__ = ["DPFedAvgM"]

logger = logging.getLogger(__name__)

#: Longest wait for the sites' names (the query is cheap; a silent site must not hold every round up).
NAME_QUERY_TIMEOUT_S = 300.0
#: Wait for a site that did not answer the first name query, in each later round.
NAME_REASK_TIMEOUT_S = 10.0


def _reply_to_site(
    msg: Message, site_names: Mapping[int, str], sent_at: float, sent_to: Mapping[str, int] | None = None
) -> SiteReply:
    """Turn a Flower reply into a :class:`SiteReply` (content that cannot be read becomes an error).

    ``sent_to`` maps the ids of the messages sent to their destination node: an error reply the
    SuperLink writes for a node that went offline comes from the SuperLink itself (its ``src_node_id``
    is the SuperLink's), so the site it stands for is the one the original message went to.
    """
    node = int((sent_to or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
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
    except (RecordError, ValueError, TypeError, KeyError) as err:
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
        on_round_end: called after each closed round (completed or failed), before it is committed and
            before anything derived from it leaves the server (the ServerApp writes the round's checkpoint
            there).
        log: one line per round (and per notable event).
        state: an engine state to resume from (see :meth:`RoundEngine.state_dict`); the weights are the
            ``initial_arrays`` given to :meth:`start`.
        max_failed_rounds: abort the run (:class:`~server.round_types.RunAborted`) after this many failed
            rounds in a row; 0 = never.
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
        max_failed_rounds: int = DEFAULT_MAX_FAILED_ROUNDS,
    ) -> None:
        self.config = config
        self.max_failed_rounds = max_failed_rounds
        self.registry = registry
        self.run_id = run_id
        self.on_round_end = on_round_end
        self.log: Log = log or (lambda line: logger.info("%s", line))
        self.resume_state = state
        self.engine: RoundEngine | None = None
        self.stopped_by_budget = False
        self._sent_at = 0.0
        self._sent_to: dict[str, int] = {}  # message id -> destination node, for the replies of a round
        self._last_outcome: RoundOutcome | None = None
        self._asked: set[int] = set()

    def summary(self) -> None:
        """Log the settings."""
        c = self.config
        dp = f"client-level DP σ={c.client_noise_multiplier}, C={c.clip_norm}" if c.client_dp else "no client-level DP"
        noise = "noise reproducible: not private" if c.reproducible_noise else "noise and sampling secret"
        self.log(
            f"DPFedAvgM: {c.strategy}, η={c.server_lr}, β={c.momentum}, {c.site_sampling} sampling "
            f"fraction={c.fraction_train}, min_sites={c.min_sites}, {dp}, {noise}"
        )

    def _engine(self) -> RoundEngine:
        if self.engine is None:
            raise RuntimeError("DPFedAvgM: start() creates the round engine; call it first")
        return self.engine

    # ------------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's sites and build one train message per site (none for a draw below ``min_sites``)."""
        eng = self._engine()
        nodes = list(grid.get_node_ids())
        sampled = eng.sample(nodes, server_round)
        eng.begin_round(server_round, sampled, total_sites=len(nodes))
        if eng.too_few_sampled():
            return []
        record = RecordDict({ARRAYS: arrays, CONFIG: config_record(eng.round_config(server_round))})
        self._sent_at = time.time()
        return [Message(record, n, MessageType.TRAIN, group_id=str(server_round)) for n in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold the replies one by one; returns the new global weights, or ``(None, None)`` for a failed round."""
        eng = self._engine()
        for msg in replies:
            eng.fold(_reply_to_site(msg, eng.site_names, self._sent_at, self._sent_to))
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
        record = RecordDict({ARRAYS: arrays, CONFIG: config_record(eng.round_config(server_round))})
        self._sent_at = time.time()
        return [Message(record, n, MessageType.EVALUATE, group_id=str(server_round)) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted global evaluation metrics (also recorded per site and globally)."""
        eng = self._engine()
        outcome = self._last_outcome
        if outcome is None or outcome.round != server_round:
            outcome = RoundOutcome(round=server_round, status="completed", sampled=0, ok=0, failed=0)
        sites = (_reply_to_site(m, eng.site_names, self._sent_at, self._sent_to) for m in replies)
        metrics = eng.record_evaluation(outcome, sites)
        return MetricRecord(dict(metrics)) if metrics else None

    # ------------------------------------------------------------------ transport helpers
    def _stream(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Iterator[Message]:
        """Push messages, then yield replies as they arrive until all came back or ``timeout`` passed."""
        batch = list(messages)
        pushed = list(grid.push_messages(batch))
        self._sent_to = {mid: int(m.metadata.dst_node_id) for mid, m in zip(pushed, batch, strict=False) if mid}
        ids = set(pushed)
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
        arrive, and releases each round once: :attr:`on_round_end` (checkpoint), then the registry
        commit, and only then the evaluate messages carrying the new weights.

        Args:
            initial_arrays: the global weights to start from (the resumed round's weights when resuming).
            num_rounds: last round to run (default ``config.rounds``).
            timeout: seconds to wait for a round's replies (default ``config.round_timeout_s``).

        Returns:
            Flower's ``Result`` with the final arrays and per-round aggregated metrics.

        Raises:
            RunAborted: ``max_failed_rounds`` failed rounds in a row (raised once the last was committed).
        """
        c = self.config
        last = num_rounds if num_rounds is not None else c.rounds
        wait = float(timeout if timeout is not None else c.round_timeout_s)
        self.engine = RoundEngine(
            c,
            arrays_from_record(initial_arrays),
            registry=self.registry,
            run_id=self.run_id,
            log=self.log,
            max_failed_rounds=self.max_failed_rounds,
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
            replies = self._stream(grid, messages, wait) if messages else iter(())
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            t_train = time.time() - t0
            outcome = self._last_outcome
            assert outcome is not None  # set by aggregate_train
            # Release once: checkpoint and commit before anything derived from the new weights leaves.
            if self.on_round_end is not None:
                self.on_round_end(eng, outcome)
            eng.commit_round(outcome)
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
            self.log(_round_line(outcome, time.time() - t0, last, train_s=t_train))
            reason = eng.abort_reason()
            if reason is not None:
                self.log(f"round {rnd}: {reason}")
                raise RunAborted(reason)
        return result


def _round_line(o: RoundOutcome, seconds: float, last: int, train_s: float | None = None) -> str:
    """One human line per round (printed by the simulation); ``train_s``: seconds until the train replies."""
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
    if train_s is not None:
        parts.append(f"(train replies {train_s:.1f} s, aggregate + checkpoint + evaluate {seconds - train_s:.1f} s)")
    return " ".join(parts)

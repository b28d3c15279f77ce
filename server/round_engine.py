"""The Flower-free DP-FedAvgM round engine.

:class:`RoundEngine` holds everything a round needs and knows nothing about Flower: the global weights,
the server momentum buffer, the client-level accountant, site sampling, the fold of one reply at a time
into :class:`~server.aggregation.StreamingAggregator`, and what goes into the registry. Its state is
checkpointable (:meth:`RoundEngine.state_dict`). Its inputs and outputs are the plain values of
:mod:`server.round_types`; :class:`~server.strategy.DPFedAvgM` drives it over Flower's Message API.
The round itself is described in :mod:`server.strategy`.

Randomness (:func:`round_rng`): the site sample, the aggregation noise and the evaluation sites of a
round each come from a generator seeded with 128 bits of OS entropy (:func:`secrets.randbits`), made
fresh for that draw and never stored (not in checkpoints, not in the registry) or sent, so that no
site, knowing its own update, the round config, the seed and both global models, can replay the noise
and subtract it. Only with ``ServerConfig.reproducible_noise`` (research, *not private*) are they
seeded from ``(seed, round, stream)`` (plus a hash of ``noise_key`` for the noise), which makes a
simulation, and its resumption, repeatable bit for bit.

Every round opened under client-level DP is charged to ε when it closes, ``completed`` or ``failed``
(DESIGN.md section 4, "release once").
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from federation.metrics import weighted_means
from federation.protocol import NUM_EXAMPLES, RoundConfig
from privacy.budget import ClientLevelAccountant
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
from server.round_types import RoundOutcome, SiteReply
from server.site_dro import dro_scales, dro_weights, update_log_weights

__all__ = ["EVAL_STREAM", "NOISE_STREAM", "SAMPLE_STREAM", "Log", "RoundEngine", "RoundHook", "round_rng"]

logger = logging.getLogger(__name__)

Log = Callable[[str], None]
#: Called after a round closes, before it is committed: ``(engine, outcome)`` (checkpoint writing).
RoundHook = Callable[["RoundEngine", "RoundOutcome"], None]

#: The draws of a round; with ``reproducible_noise`` the streams of ``default_rng([seed, round, stream])``.
SAMPLE_STREAM, NOISE_STREAM, EVAL_STREAM = 0, 1, 2


def round_rng(config: ServerConfig, rnd: int, stream: int) -> np.random.Generator:
    """The generator of one draw of round ``rnd``: the site sample, the noise or the evaluation sites.

    By default seeded with 128 bits from the OS's CSPRNG, fresh for every call, and kept nowhere: nobody
    (the server's operators included) can draw it again. With ``config.reproducible_noise`` (research
    only, not private): ``default_rng([seed, rnd, stream])``, and for the noise stream with a non-empty
    ``noise_key`` also four words of its SHA-256, so that runs sharing a seed (a study's cells) still
    draw different noise.
    """
    if not config.reproducible_noise:
        return np.random.default_rng(secrets.randbits(128))
    words = [config.seed, rnd, stream]
    if stream == NOISE_STREAM and config.noise_key:
        digest = hashlib.sha256(config.noise_key.encode("utf-8")).digest()
        words += [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(words)


class RoundEngine:
    """Flower-free DP-FedAvgM rounds: sampling, folding replies, momentum, accounting, bookkeeping.

    Args:
        config: the server settings.
        initial_arrays: global weights ``w_0`` (one float32 array per exchanged model tensor).
        registry: where rounds, participation, metrics and ε are recorded (None: nothing is recorded).
        run_id: the registry run (required with ``registry``).
        log: one line per notable event (a round's summary, a rejected update...).
        max_failed_rounds: after this many ``failed`` rounds in a row :meth:`abort_reason` says why the
            run must stop (0 = never). The streak starts again at 0 after a ``completed`` round and in a
            resumed run.
    """

    def __init__(
        self,
        config: ServerConfig,
        initial_arrays: Sequence[np.ndarray],
        *,
        registry: Registry | None = None,
        run_id: int | None = None,
        log: Log | None = None,
        max_failed_rounds: int = 0,
    ) -> None:
        if registry is not None and run_id is None:
            raise ValueError("RoundEngine: a registry needs the run_id to record into")
        if isinstance(max_failed_rounds, bool) or not isinstance(max_failed_rounds, int) or max_failed_rounds < 0:
            raise ValueError(f"RoundEngine: max_failed_rounds must be an integer >= 0, got {max_failed_rounds!r}")
        self.max_failed_rounds = max_failed_rounds
        self.failed_streak = 0  # failed rounds in a row, up to the last closed round
        self.config = config
        self.weights: Arrays = [np.array(a, dtype=np.float32, copy=True) for a in initial_arrays]
        self.shapes = shapes_of(self.weights)
        self.momentum: Arrays | None = None
        self.momentum_round = 0  # the round whose update last moved the momentum buffer
        self.site_log_weights: dict[str, float] = {}  # group DRO over sites (server.site_dro)
        self.dro_phase = 0  # the curriculum phase the log-weights belong to
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
        self._total_sites = 0
        self._charged = False

    # ------------------------------------------------------------------ naming and sampling
    def label(self, node_id: int) -> str:
        """The site's name, or ``node-<id>`` before it has told its name."""
        return self.site_names.get(node_id) or f"node-{node_id}"

    def sample(self, node_ids: Iterable[int], rnd: int) -> list[int]:
        """The sites that train in round ``rnd``, drawn (:func:`round_rng`) over the sites sorted by name.

        ``site_sampling = "poisson"``: each site independently with probability ``fraction_train`` (all of
        them at 1), so the realised count varies around ``q·N``; ``"fixed"``: ``sample_size(N)`` sites
        without replacement. With ``reproducible_noise`` the draw depends on ``(seed, rnd)`` and the set
        of site names only (not on Flower's node ids, which change between runs), so a resumed run
        samples as the uninterrupted one would; otherwise it is secret and fresh.
        """
        ordered = sorted(set(node_ids), key=lambda n: (self.label(n), n))
        c = self.config
        if not ordered:
            return []
        if c.site_sampling == "poisson":
            if c.fraction_train >= 1:
                return ordered
            keep = round_rng(c, rnd, SAMPLE_STREAM).random(len(ordered)) < c.fraction_train
            return [n for n, kept in zip(ordered, keep.tolist(), strict=True) if kept]
        k = c.sample_size(len(ordered))
        rng = round_rng(c, rnd, SAMPLE_STREAM)
        picked = sorted(rng.choice(len(ordered), size=k, replace=False).tolist()) if k else []
        return [ordered[i] for i in picked]

    def sample_evaluate(self, node_ids: Iterable[int], rnd: int) -> list[int]:
        """The sites that evaluate the global model after round ``rnd`` (``fraction_evaluate``; 0 → none)."""
        ordered = sorted(set(node_ids), key=lambda n: (self.label(n), n))
        if self.config.fraction_evaluate == 0 or not ordered:
            return []
        k = min(len(ordered), max(1, math.ceil(len(ordered) * self.config.fraction_evaluate)))
        rng = round_rng(self.config, rnd, EVAL_STREAM)
        return [ordered[i] for i in sorted(rng.choice(len(ordered), size=k, replace=False).tolist())]

    def round_config(self, rnd: int) -> RoundConfig:
        """The config record sent with round ``rnd``'s train and evaluate messages."""
        return self.config.round_config(rnd)

    # ------------------------------------------------------------------ a round
    def _ensure_accountant(self, total_sites: int, expected_sites: float) -> ClientLevelAccountant:
        acc = self.accountant
        if acc is None or acc.total_sites != total_sites or acc.expected_sites != expected_sites:
            c = self.config
            fresh = ClientLevelAccountant(
                total_sites=total_sites,
                expected_sites=expected_sites,
                noise_multiplier=c.client_noise_multiplier,
                delta=c.delta,
                target_epsilon=c.target_epsilon or None,
                accountant=c.accountant,
            )
            if acc is not None:  # the federation changed size: keep the steps already taken
                fresh.load_state_dict(acc.state_dict())
            self.accountant = acc = fresh
        return acc

    def too_few_sampled(self) -> bool:
        """Whether the open round's draw holds fewer than ``min_sites`` sites (nobody is asked; it fails)."""
        return len(self._sampled) < self.config.min_sites

    def begin_round(self, rnd: int, sampled: Sequence[int], total_sites: int) -> None:
        """Open round ``rnd`` with the ``sampled`` node ids out of ``total_sites`` connected.

        With client-level DP the round is charged to ε when it closes, whatever its outcome (a draw below
        ``min_sites`` included), with ``q = fraction_train`` for Poisson sampling (the accountant's
        ``expected_sites`` is ``q·N``, never the realised count).

        Raises:
            PrivacyBudgetExceeded: with client-level DP, when this round would take ε past ``target_epsilon``
                (nothing is recorded; the caller stops the run).
            ValueError: a round already open, a round number that does not follow the last one, or a
                clipped mean whose divisor ``q·N`` would be below 1 (raise ``fraction_train``).
        """
        if self._current is not None:
            raise ValueError(f"round {self._current} is still open; close_round() it first")
        if rnd != self.round + 1:
            raise ValueError(f"round {rnd} does not follow the last closed round {self.round}")
        c = self.config
        expected = c.expected_sites(total_sites)
        if c.clip_norm and total_sites > 0 and expected < 1:
            raise ValueError(
                f"round {rnd}: fraction_train={c.fraction_train} of {total_sites} site(s) expects {expected:g} < 1 "
                "site per round, the divisor of the clipped mean; raise fraction_train"
            )
        charged = c.client_dp and total_sites > 0
        if charged:
            self._ensure_accountant(total_sites, expected).check_next_round()
        if self.registry is not None and self.run_id is not None:
            self.registry.start_round(self.run_id, rnd, sampled=len(sampled))
        self._current = rnd
        self._sampled = {n: self.label(n) for n in sampled}
        self._seen = set()
        dro = self.config.site_dro_step > 0
        self._agg = StreamingAggregator(  # with site DRO the weights are the sites' λ, not their example counts
            self.shapes, clip_norm=self.config.clip_norm or None, weighted=False if dro else None
        )
        self._dro_scales = self._begin_dro(rnd, list(self._sampled.values())) if dro else {}
        self._site_losses: dict[str, float] = {}
        self._train_rows = []
        self._statuses = {}
        self._failed = 0
        self._total_sites = total_sites
        self._charged = charged

    def _begin_dro(self, rnd: int, sites: list[str]) -> dict[str, float]:
        """Group DRO over sites: each sampled site's scale for round ``rnd`` (log-weights reset per phase)."""
        phase = self.config.phase_index(rnd)  # by position: two phases may have equal settings
        if phase != self.dro_phase:
            self.site_log_weights, self.dro_phase = {}, phase
        return dro_scales(self.site_log_weights, sites) if sites else {}

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
            info = self._agg.add(delta, int(reply.num_examples), scale=self._dro_scales.get(name, 1.0))
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
        if "train_loss" in reply.metrics:
            self._site_losses[name] = float(reply.metrics["train_loss"])
        self._record_site(reply)
        return "ok"

    def _record_site(self, reply: SiteReply) -> None:
        """Per-site metrics, and the site's own patient-level ε when it reports one."""
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
                noise_multiplier=m.get("dp_sgd_noise_multiplier", 0.0),
                sample_rate=m.get("sample_rate", 0.0),
                steps=int(m.get("dp_steps", 0)),
                accountant="site",
            )

    def close_round(self) -> RoundOutcome:
        """Record the sampled sites that never answered as ``timeout`` and aggregate (or fail) the round.

        With client-level DP the accountant takes the round's step here, ``completed`` or ``failed``.
        The round is not yet marked closed in the registry: :meth:`commit_round` does that once the
        caller has written the round's checkpoint, and only then may anything derived from the new
        weights leave the server.
        """
        if self._current is None or self._agg is None:
            raise ValueError("close_round() outside a round")
        rnd, c = self._current, self.config
        if self.too_few_sampled():
            drawn = len(self._sampled)
            self.log(f"round {rnd}: {drawn} site(s) sampled < min_sites={c.min_sites}; nobody was asked to train")
        else:
            for node_id in sorted(set(self._sampled) - self._seen, key=self.label):
                self.log(f"round {rnd}: {self.label(node_id)} did not reply within {c.round_timeout_s:g} s")
                reason = f"no reply within {c.round_timeout_s} s"
                self._participation(SiteReply(node_id=node_id), "timeout", reason=reason)
        ok = self._agg.count
        outcome = RoundOutcome(
            round=rnd, status="failed", sampled=len(self._sampled), ok=ok, failed=self._failed, statuses=self._statuses
        )
        if ok >= c.min_sites and ok > 0:
            mean = self._agg.finalize(
                expected_sites=c.expected_sites(self._total_sites) if c.clip_norm else None,
                noise_multiplier=c.client_noise_multiplier,
                rng=round_rng(c, rnd, NOISE_STREAM) if c.client_noise_multiplier > 0 else None,
            )
            if self.momentum is not None and c.momentum_reset(self.momentum_round, rnd):
                self.log(f"round {rnd}: curriculum stage {self.round_config(rnd).stage!r} starts from zero momentum")
                self.momentum = None
            self.weights, self.momentum = apply_server_momentum(
                self.weights, mean, self.momentum, server_lr=c.server_lr, server_momentum=c.momentum
            )
            self.momentum_round = rnd
            if c.site_dro_step > 0:
                self._dro_step(rnd)
            outcome.status = "completed"
            outcome.update_norm = l2_norm(mean)
            outcome.train_metrics = weighted_means(self._train_rows)
        else:
            self.log(f"round {rnd}: {ok} usable update(s) < min_sites={c.min_sites}; the model does not move")
        if self._charged and self.accountant is not None:  # every opened round is a release (DESIGN.md 4)
            outcome.epsilon = self.accountant.step_round()
            self._record_client_privacy(rnd)
        self._charged = False
        if self.registry is not None and self.run_id is not None and outcome.train_metrics:
            self.registry.record_metrics(self.run_id, rnd, "global", outcome.train_metrics)
        self._agg = None
        self.round = rnd
        self.failed_streak = self.failed_streak + 1 if outcome.status == "failed" else 0
        return outcome

    def _dro_step(self, rnd: int) -> None:
        """Move the sites' DRO log-weights by the round's training losses; record the new weights."""
        self.site_log_weights = update_log_weights(self.site_log_weights, self._site_losses, self.config.site_dro_step)
        if not self.site_log_weights:
            return
        weights = dro_weights(self.site_log_weights, sorted(self.site_log_weights))
        self.log(f"round {rnd}: site DRO weights " + ", ".join(f"{s} {w:.3f}" for s, w in weights.items()))
        if self.registry is not None and self.run_id is not None:
            for site, w in weights.items():
                self.registry.record_metrics(self.run_id, rnd, f"site:{site}", {"dro_weight": w})

    def abort_reason(self) -> str | None:
        """Why the run must stop now: ``max_failed_rounds`` failed rounds in a row (None: go on).

        Decided on the rounds closed so far; with ``max_failed_rounds = 0`` never.
        """
        n, streak = self.max_failed_rounds, self.failed_streak
        if n == 0 or streak < n:
            return None
        return (
            f"{streak} consecutive failed rounds (rounds {self.round - streak + 1}-{self.round}) reached "
            f"max-consecutive-failed-rounds = {n}; the run is aborted"
        )

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
        """Record the sites' evaluation of the new global model; returns the example-weighted global metrics.

        Called after :meth:`commit_round`: the evaluated model was released only once its round was committed.
        """
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
        outcome.eval_metrics = weighted_means(rows)
        if self.registry is not None and self.run_id is not None and outcome.eval_metrics:
            self.registry.record_metrics(self.run_id, outcome.round, "global", outcome.eval_metrics)
        return outcome.eval_metrics

    def commit_round(self, outcome: RoundOutcome) -> None:
        """Mark the round ``completed``/``failed`` in the registry (after its checkpoint is written).

        From here on the round is released: a resumed run continues after it and never draws it again.
        """
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
            ``{"round", "momentum" (list of arrays or None), "momentum_round" (the round that last moved
            it), "site_log_weights" and "dro_phase" (group DRO over sites), "accountant" (settings +
            history or None), "site_names", "config"}``.
        """
        acc = self.accountant
        return {
            "round": self.round,
            "momentum_round": self.momentum_round,
            "site_log_weights": dict(self.site_log_weights),
            "dro_phase": self.dro_phase,
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
        self.momentum_round = int(state.get("momentum_round", self.round))  # older checkpoints: the last round
        self.site_log_weights = {str(k): float(v) for k, v in dict(state.get("site_log_weights") or {}).items()}
        self.dro_phase = int(state.get("dro_phase", 0))
        self.site_names = {int(k): str(v) for k, v in dict(state.get("site_names", {})).items()}
        self.accountant = None
        acc = state.get("accountant")
        if acc is not None and self.config.client_dp:
            self._ensure_accountant(int(acc["total_sites"]), float(acc["expected_sites"])).load_state_dict(acc["state"])

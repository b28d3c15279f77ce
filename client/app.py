"""The site's Flower ClientApp (thin): unpack, call :class:`~client.trainer.SiteTrainer`, audit, pack.

Which site a process serves comes from the node config:

- a deployed SuperNode: ``flower-supernode --node-config "site-dir='/data/site' model-dir='/opt/model'"``
  (``state-dir`` optional; ``model-dir`` may also come from site.toml ``[training] model_dir``);
- Flower's simulation engine only gives ``partition-id``: :func:`make_client_app` takes the list of
  :class:`SiteEndpoint` that partition ids index (``lungvl simulate``); without that list (``flwr run``
  on a local simulation federation) :func:`simulated_endpoint` maps the partition to a site from the run
  config: the ``sites`` list when given, else a synthetic site generated on first use.

Run config keys read here (relative paths resolve against the Flower App directory, :func:`app_dir`):

- ``sites``: comma-separated site directories; partition ``i`` serves the ``i``-th (empty: synthetic);
- ``synthetic-studies``, ``synthetic-matrix``, ``synthetic-z-extent-mm``, ``synthetic-seed``: the
  synthetic sites (cohorts screening, referral, low_resource by partition id, cycled; site seed
  ``synthetic-seed + partition id``), generated into ``<run-dir>/synthetic_sites/`` by the first
  process that needs one (a file lock plus an atomic rename: safe when several start at once) and
  reused afterwards;
- ``run-dir`` (each partition's ledger and accountant state in ``<run-dir>/state/partition-<i>``) and
  ``init-model`` (the model package the sites load), as the ServerApp reads them.

Messages:

- ``train``: arrays + :class:`~federation.protocol.RoundConfig` in; the update (float32)
  and a metrics record (``num_examples`` + whitelisted metrics) out.
- ``evaluate``: the global model scored on the site's hold-out patients; metrics only.
- ``query`` asking for ``site_name``: the site's name (the server attributes failures and timeouts to it).

A request outside the site's own policy (site.toml ``[privacy]``: DP-SGD required, σ floor, steps per
round, rounds, evaluations per round, no evaluation on training studies under DP-SGD, fewest hold-out
studies; :class:`~privacy.site_policy.SitePolicyRefusal`) or its ε budget (``PrivacyBudgetExceeded``)
is refused whatever the server asks: nothing is trained or scored, and the error reply's reason starts
with "site refused: " and says why (it is logged and written to the audit ledger like every reply).
Any other failure answers with an error reply naming only the exception type (its message could carry
local paths or identifiers: the details stay in the site's log).

Every reply is written to the audit ledger (kind, run id, round, exact payload bytes, metrics) before
it is returned; the site's policy counts its rounds and evaluations per round from the ledger's train
and evaluate replies. The train reply's payload is the concatenation of the ``np.save`` bytes of its
arrays exactly as they sit in the ``ArrayRecord``: the packed values and shape table
(:func:`~federation.protocol.flatten_arrays`; what :func:`client.trainer.payload_bytes`
computes for them).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.config import ClientConfig
from client.ledger import LEDGER_FILENAME, AuditLedger, filter_metrics
from client.simulated_sites import SYNTHETIC_COHORTS, synthetic_site
from client.trainer import EVALUATE_REPLY, TRAIN_REPLY, SiteTrainer
from federation.app_paths import app_dir, under
from federation.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, QUERY_KEY, SITE_NAME_KEY, RoundConfig
from federation.records import (
    arrays_from_record,
    arrays_to_record,
    metric_record,
    packed_payload,
    round_config_from_record,
)
from privacy.accountant import PrivacyBudgetExceeded
from privacy.site_policy import SitePolicyRefusal

__all__ = ["SYNTHETIC_COHORTS", "SiteEndpoint", "app", "app_dir", "make_client_app", "simulated_endpoint"]

logger = logging.getLogger(__name__)

_ERROR_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
#: Tracebacks of failed rounds, in the site's state directory (the reply carries only the exception type).
SITE_ERROR_LOG = "site_errors.log"
_MAX_TRAINERS = 4


@dataclass(frozen=True)
class SiteEndpoint:
    """Where one site's data, initial model package and state live.

    Attributes:
        site_dir: the site directory (with site.toml).
        model_dir: the initial model package (None: site.toml ``[training] model_dir``).
        state_dir: accountant state and audit ledger (None: ``<site_dir>/.lungvl_state``).
        holdout_fraction: overrides site.toml ``[training] holdout_fraction`` (None: keep the file's).
        min_eval_studies: overrides site.toml ``[privacy] min_eval_studies`` (None: keep the file's; a
            simulation of public synthetic sites sets it from the scenario).
    """

    site_dir: Path
    model_dir: Path | None = None
    state_dir: Path | None = None
    holdout_fraction: float | None = None
    min_eval_studies: int | None = None

    def client_config(self) -> ClientConfig:
        """The site's :class:`ClientConfig` with these paths."""
        overrides: dict[str, Any] = {}
        if self.model_dir is not None:
            overrides["model_dir"] = Path(self.model_dir)
        if self.state_dir is not None:
            overrides["state_dir"] = Path(self.state_dir)
        if self.holdout_fraction is not None:
            overrides["holdout_fraction"] = float(self.holdout_fraction)
        if self.min_eval_studies is not None:
            overrides["min_eval_studies"] = int(self.min_eval_studies)
        return ClientConfig.from_toml(Path(self.site_dir) / "site.toml", **overrides)


def _node_value(node_config: dict[str, Any], key: str) -> str | None:
    value = node_config.get(key, node_config.get(key.replace("-", "_")))
    return None if value in (None, "") else str(value)


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def simulated_endpoint(run_config: Mapping[str, Any], partition_id: int, base: Path) -> SiteEndpoint:
    """The site of ``partition_id`` in a simulation without a site table (``flwr run`` on the simulation engine).

    Args:
        run_config: the run config (keys in the module docstring).
        partition_id: Flower's partition id of the node.
        base: the directory relative paths resolve against (the app directory).

    Raises:
        KeyError: ``sites`` lists fewer directories than there are partitions.
    """
    run_dir = under(base, str(run_config.get("run-dir") or "runs/server"))
    model_dir = under(base, str(run_config.get("init-model") or "runs/init_model"))
    listed = [p.strip() for p in str(run_config.get("sites") or "").split(",") if p.strip()]
    if listed:
        if partition_id >= len(listed):
            raise KeyError(
                f"run config 'sites' lists {len(listed)} site(s), none for partition-id {partition_id}: "
                f"run with num-supernodes <= {len(listed)} or list more sites"
            )
        site_dir = under(base, listed[partition_id])
    else:
        site_dir = synthetic_site(run_config, partition_id, run_dir / "synthetic_sites")
    return SiteEndpoint(site_dir, model_dir, run_dir / "state" / f"partition-{partition_id}")


def resolve_endpoint(context: Context, sites: Sequence[SiteEndpoint] = ()) -> SiteEndpoint:
    """The site this node serves: ``site-dir``/``model-dir``/``state-dir``, or by ``partition-id``.

    A ``partition-id`` indexes ``sites`` when given, else the run config maps it
    (:func:`simulated_endpoint`).

    Raises:
        KeyError: neither a ``site-dir`` nor a ``partition-id``, or a partition with no site.
    """
    cfg = dict(context.node_config)
    site_dir = _node_value(cfg, "site-dir")
    if site_dir is not None:
        model_dir, state_dir = _node_value(cfg, "model-dir"), _node_value(cfg, "state-dir")
        return SiteEndpoint(
            Path(site_dir),
            None if model_dir is None else Path(model_dir),
            None if state_dir is None else Path(state_dir),
        )
    pid = cfg.get("partition-id")
    if pid is not None and sites:
        if 0 <= int(pid) < len(sites):
            return sites[int(pid)]
        raise KeyError(f"partition-id {pid} is not among the {len(sites)} sites of this simulation")
    if pid is not None:
        return simulated_endpoint(context.run_config, int(pid), app_dir())
    raise KeyError(f"node config must give 'site-dir' (or a 'partition-id' in a simulation), got {sorted(cfg)}")


_TRAINERS: dict[SiteEndpoint, SiteTrainer] = {}


def get_trainer(endpoint: SiteEndpoint) -> SiteTrainer:
    """The process's :class:`SiteTrainer` for ``endpoint`` (built once; a few sites per process at most)."""
    trainer = _TRAINERS.get(endpoint)
    if trainer is None:
        if len(_TRAINERS) >= _MAX_TRAINERS:
            old = _TRAINERS.pop(next(iter(_TRAINERS)))
            old.close()
        trainer = _TRAINERS[endpoint] = SiteTrainer(endpoint.client_config())
    return trainer


def _round_config(msg: Message) -> RoundConfig:
    return round_config_from_record(msg.content.config_records[CONFIG])


def _serve(msg: Message, endpoint: SiteEndpoint) -> SiteTrainer:
    """The endpoint's trainer, told which server run the message belongs to (its counts are per run)."""
    trainer = get_trainer(endpoint)
    trainer.run_id = str(msg.metadata.run_id)
    return trainer


def _error_reply(msg: Message, reason: str, trainer: SiteTrainer | None, rnd: int) -> Message:
    if trainer is not None:
        trainer.record_outbound(rnd, "error_reply", reason.encode(), {}, dp={})
    return Message(Error(code=_ERROR_CODE, reason=reason), reply_to=msg)


def _log_site_error(trainer: SiteTrainer, rnd: int, what: str) -> None:
    """Append the current exception's traceback to ``<state_dir>/site_errors.log`` (stays at the site)."""
    assert trainer.config.state_dir is not None  # resolved by ClientConfig
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with (trainer.config.state_dir / SITE_ERROR_LOG).open("a") as fh:
        fh.write(f"--- {stamp} round {rnd}: {what}\n{traceback.format_exc()}\n")


def handle_train(msg: Message, endpoint: SiteEndpoint) -> Message:
    """Local training on the received global arrays; the reply carries Δ and the metrics."""
    trainer = _serve(msg, endpoint)
    rc = _round_config(msg)
    try:
        result = trainer.fit(arrays_from_record(msg.content.array_records[ARRAYS]), rc)
    except (PrivacyBudgetExceeded, SitePolicyRefusal) as err:
        logger.warning("round %d: site refuses to train: %s", rc.server_round, err)
        return _error_reply(msg, f"site refused: {err}", trainer, rc.server_round)
    except Exception as err:
        logger.exception("round %d: local training failed", rc.server_round)
        _log_site_error(trainer, rc.server_round, "local training failed")
        reason = f"local training failed ({type(err).__name__}; see {SITE_ERROR_LOG} at the site)"
        return _error_reply(msg, reason, trainer, rc.server_round)
    arrays = arrays_to_record(result.delta)
    metrics = filter_metrics({**result.metrics, NUM_EXAMPLES: int(result.num_examples)})
    payload = packed_payload(arrays)
    trainer.record_outbound(rc.server_round, TRAIN_REPLY, payload, metrics)
    return Message(RecordDict({ARRAYS: arrays, METRICS: metric_record(metrics)}), reply_to=msg)


def handle_evaluate(msg: Message, endpoint: SiteEndpoint) -> Message:
    """Score the received global arrays on the site's hold-out studies; the reply carries metrics only."""
    trainer = _serve(msg, endpoint)
    rc = _round_config(msg)
    try:
        n, metrics = trainer.evaluate(arrays_from_record(msg.content.array_records[ARRAYS]), rc)
    except SitePolicyRefusal as err:
        logger.warning("round %d: site refuses to evaluate: %s", rc.server_round, err)
        return _error_reply(msg, f"site refused: {err}", trainer, rc.server_round)
    except Exception as err:
        logger.exception("round %d: evaluation failed", rc.server_round)
        _log_site_error(trainer, rc.server_round, "evaluation failed")
        return _error_reply(
            msg, f"evaluation failed ({type(err).__name__}; see {SITE_ERROR_LOG} at the site)", trainer, rc.server_round
        )
    metrics = filter_metrics({**metrics, NUM_EXAMPLES: int(n)})
    trainer.record_outbound(rc.server_round, EVALUATE_REPLY, b"", metrics)
    return Message(RecordDict({METRICS: metric_record(metrics)}), reply_to=msg)


def handle_query(msg: Message, endpoint: SiteEndpoint) -> Message:
    """Answer ``{"query": "site_name"}`` with the site's name (written to the ledger too)."""
    asked = msg.content.config_records.get(CONFIG, ConfigRecord()).get(QUERY_KEY)
    if asked != SITE_NAME_KEY:
        return Message(Error(code=_ERROR_CODE, reason=f"unknown query {asked!r}"), reply_to=msg)
    config = endpoint.client_config()
    assert config.state_dir is not None  # resolved by ClientConfig
    config.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = AuditLedger(config.state_dir / LEDGER_FILENAME)
    try:
        ledger.record(
            round=0,
            kind="query_reply",
            payload=config.name.encode(),
            metrics={},
            dp={},
            epsilon=None,
            delta=None,
            run_id=str(msg.metadata.run_id),
        )
    finally:
        ledger.close()
    return Message(RecordDict({CONFIG: ConfigRecord({SITE_NAME_KEY: config.name})}), reply_to=msg)


def _setup_error(msg: Message, err: Exception) -> Message:
    """The reply when the node cannot serve any site (no site directory, unreadable site.toml...)."""
    logger.error("site setup failed: %s: %s", type(err).__name__, err, exc_info=err)
    reason = f"site setup failed ({type(err).__name__}; see the node's log)"
    return Message(Error(code=_ERROR_CODE, reason=reason), reply_to=msg)


def make_client_app(sites: Sequence[SiteEndpoint] = ()) -> ClientApp:
    """A ClientApp serving the site named by the node config (``partition-id`` indexes ``sites``).

    A node that cannot set its site up (no site directory, a bad ``sites`` entry, an unreadable
    site.toml) answers every message with an error reply naming the exception type only; the
    details go to the node's log.
    """
    client_app = ClientApp()
    table = tuple(sites)

    def endpoint_for(context: Context) -> SiteEndpoint:
        endpoint = resolve_endpoint(context, table)
        endpoint.client_config()  # fails early on a missing site directory or a bad site.toml
        return endpoint

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            endpoint = endpoint_for(context)
        except Exception as err:
            return _setup_error(msg, err)
        return handle_train(msg, endpoint)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            endpoint = endpoint_for(context)
        except Exception as err:
            return _setup_error(msg, err)
        return handle_evaluate(msg, endpoint)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        try:
            endpoint = endpoint_for(context)
        except Exception as err:
            return _setup_error(msg, err)
        return handle_query(msg, endpoint)

    return client_app


#: The ClientApp of ``flower-supernode`` / ``flwr run`` deployments (the site from the node config).
app = make_client_app()

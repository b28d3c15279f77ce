"""A long-lived ClientApp process for a deployed site (``flower-supernode --isolation process``).

Flower 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process (both isolation modes:
``subprocess`` spawns it through an internal SuperExec, ``process`` expects an outside executor to do
so). For lungvl that start-up (torch/monai/transformers imports, catalogue, model package) took ~95% of
a round on the tiny federation. This worker takes the executor's place: one process polls the SuperNode's
local Runtime API for tasks and answers each one in-process with :data:`client.app.app`, so the
:class:`~client.trainer.SiteTrainer` (model, data cache, accountant) lives across rounds.

It also never executes code shipped by the coordinator: the ClientApp is the installed ``client.app``,
whatever the run's FAB (Flower App Bundle) says; a run whose FAB is not lungvl's is answered with an
error reply. Run it as ``python -m client.deploy_worker --runtime-api-address 127.0.0.1:PORT``
(:func:`client.deploy.join_site` does).

This leans on Flower's Runtime API client helpers (``flwr.supernode.runtime.run_clientapp``); it is
checked against flwr 1.42.0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

__all__ = ["ALLOWED_FAB_PREFIX", "main", "run_one_task", "serve"]

logger = logging.getLogger("lungvl.site.worker")

#: FAB ids (``publisher/name``) this worker answers; other runs get an error reply.
ALLOWED_FAB_PREFIX = "lungvl/"
POLL_INTERVAL_S = 0.5
_stop = False
_in_task = False


def _client(address: str, token: str | None = None, max_tries: int | None = None) -> RuntimeHttpClient:
    invoker = make_simple_http_retry_invoker()
    if max_tries is not None:
        invoker.max_tries = max_tries
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's Runtime API listens on loopback only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=invoker,
    )


def run_one_task(address: str, token: str) -> str:
    """Answer the task behind ``token`` with lungvl's ClientApp; returns the final sub-status.

    Any failure becomes an error reply naming only the exception type (details stay in this log).
    """
    from client.app import app as client_app  # the installed ClientApp, never the FAB's code

    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context: Context | None = None
    message: Message | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, run, _fab = pull_task_input(client)
        if not run.fab_id.startswith(ALLOWED_FAB_PREFIX):
            raise PermissionError(f"run {run.run_id} is FAB {run.fab_id!r}, not lungvl's; refused")
        t0 = time.perf_counter()
        reply = client_app(message=message, context=context)
        logger.info(
            "run %s: answered %s in %.2f s", run.run_id, message.metadata.message_type, time.perf_counter() - t0
        )
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # a task's failure must not end the worker
        logger.exception("task failed")
        details = f"{type(err).__name__} in the site's ClientApp (see the site log)"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            logger.exception("could not push the reply")
            status = SubStatus.FAILED
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _stop
    _stop = True
    if not _in_task:
        raise SystemExit(0)
    logger.info("signal %d: stopping after the current task", signum)


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(address: str, *, parent_pid: int | None = None, poll_interval: float = POLL_INTERVAL_S) -> None:
    """Poll the SuperNode's Runtime API at ``address`` and answer ClientApp tasks until stopped.

    Args:
        address: ``host:port`` of the SuperNode's Runtime API (its ``--port``; loopback).
        parent_pid: exit when this process (the SuperNode) is gone.
        poll_interval: seconds between polls.
    """
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    global _in_task
    import client.app  # noqa: F401  # warm up (torch, monai, transformers) before taking a task

    runtime = _client(address, max_tries=3)
    logger.info("lungvl site worker polling %s (pid %d)", address, os.getpid())
    try:
        while not _stop and _parent_alive(parent_pid):
            try:
                res = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as err:  # SuperNode restarting: keep polling
                logger.debug("AcquireTask failed: %s", err)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                _in_task = True
                try:
                    run_one_task(address, res.token)
                finally:
                    _in_task = False
                continue
            time.sleep(poll_interval)
    finally:
        runtime.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m client.deploy_worker --runtime-api-address HOST:PORT [--parent-pid PID]``."""
    parser = argparse.ArgumentParser(description="lungvl's long-lived ClientApp worker for a SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="SuperNode Runtime API, e.g. 127.0.0.1:9094")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "flwr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    serve(args.runtime_api_address, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

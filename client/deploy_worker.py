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

A stale task never blocks the worker. Flower 1.42's SuperNode creates the task for a message *before*
it downloads the message's content; when the run turns out to be over (a server killed and resumed: the
old run's round-``n`` message is still queued at the SuperLink) it drops the download but leaves the
task pending, and pulling its content would wait for objects that never come (Flower's default is up to
two hours). The SuperNode receives messages one at a time, so once a newer task exists the older task's
content is complete or abandoned: the worker pulls content in short slices and, between slices, looks
for a newer task; when there is one (or ``max_wait_s`` has passed) the old task is finished as FAILED
without a reply and the newer one is answered.

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
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.message_pb2 import PullObjectRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_confirm_message_received_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from federation.transport import PULL_BACKOFF_CAP_S, PULL_BACKOFF_S

__all__ = [
    "ALLOWED_FAB_PREFIX",
    "PullPolicy",
    "StaleTaskError",
    "TaskSource",
    "main",
    "pull_task_message",
    "run_one_task",
    "serve",
]

logger = logging.getLogger("lungvl.site.worker")

#: FAB ids (``publisher/name``) this worker answers; other runs get an error reply.
ALLOWED_FAB_PREFIX = "lungvl/"
POLL_INTERVAL_S = 0.5
_stop = False
_in_task = False


class StaleTaskError(RuntimeError):
    """A task whose message content will never reach this SuperNode (its run is over)."""


class _ObjectMissing(Exception):
    """The SuperNode's object store does not know the object (dropped): no point retrying."""


def _pull_object_fn(client: RuntimeHttpClient, node: Node, run_id: int) -> Callable[[str], bytes]:
    """Flower's protobuf pull function, except that a missing object raises :class:`_ObjectMissing`."""

    def pull(object_id: str) -> bytes:
        res = client.PullObject(PullObjectRequest(node=node, run_id=run_id, object_id=object_id))
        if not res.object_found:
            raise _ObjectMissing(object_id)
        if not res.object_available:
            raise ObjectUnavailableError(object_id)
        return bytes(res.object_content)

    return pull


@dataclass(frozen=True)
class PullPolicy:
    """How long the worker waits for a task's message content.

    Attributes:
        slice_s: seconds of one pull attempt; between attempts ``give_up`` is asked.
        max_wait_s: give up on a task whose content has not arrived after this many seconds, even when
            no newer task is waiting (Flower's own default is 7,200 s).
        last_try_s: one more attempt of this length after giving up: the SuperNode creates a newer task
            only once the older message is complete or dropped, so content that is there arrives at once.
        backoff_s: first wait before asking again for content not there yet; doubles up to
            ``backoff_cap_s``. The Runtime API is on loopback, so short waits cost nothing (Flower's 1 s
            doubling to 10 s added up to 8 s to a round whenever the SuperNode was still downloading).
        backoff_cap_s: longest wait between two asks.
    """

    slice_s: float = 5.0
    max_wait_s: float = 1800.0
    last_try_s: float = 2.0
    backoff_s: float = PULL_BACKOFF_S
    backoff_cap_s: float = PULL_BACKOFF_CAP_S


def pull_task_message(
    client: RuntimeHttpClient,
    give_up: Callable[[], str | None],
    policy: PullPolicy = PullPolicy(),
) -> tuple[Message, Context, Run]:
    """Pull the claimed task's context, run and message from the SuperNode.

    Like Flower's ``pull_task_input`` but the message content is pulled in slices of
    ``policy.slice_s``; after each slice that did not complete, ``give_up()`` is asked and a non-empty
    answer (why) ends the wait after one last short try.

    Returns:
        The task's message, the run's context and the run.

    Raises:
        StaleTaskError: the content did not arrive and ``give_up`` said why, or ``max_wait_s`` passed.
        RuntimeError: the SuperNode holds no message for the task.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError(f"run {run.run_id}: the SuperNode holds no message for task {res.task_id}")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)

    def stale(why: str) -> StaleTaskError:
        return StaleTaskError(
            f"run {run.run_id}, task {res.task_id}: message {tree.object_id[:12]}… never reached this SuperNode "
            f"({why}); the run is probably over (server restarted)"
        )

    start, why = time.monotonic(), None
    while True:
        try:
            message = pull_and_inflate_object_from_tree(
                tree,
                _pull_object_fn(client, node, run.run_id),
                make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run.run_id),
                return_type=Message,
                max_time=policy.last_try_s if why else policy.slice_s,
                max_tries_per_object=None,  # bounded by max_time
                initial_backoff=policy.backoff_s,
                backoff_cap=policy.backoff_cap_s,
            )
            break
        except _ObjectMissing as err:
            raise stale(f"object {str(err)[:12]}… is not in its store") from err
        except ObjectPullError as err:
            if why:  # the last try after giving up: the content is complete by now or never comes
                raise stale(why) from err
            waited = time.monotonic() - start
            why = give_up() or (f"waited {waited:.0f} s" if waited >= policy.max_wait_s else None)
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run


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


def run_one_task(
    address: str,
    token: str,
    give_up: Callable[[], str | None] = lambda: None,
    policy: PullPolicy = PullPolicy(),
) -> str:
    """Answer the task behind ``token`` with lungvl's ClientApp; returns the final sub-status.

    Any failure becomes an error reply naming only the exception type (details stay in this log); a
    stale task (see :class:`StaleTaskError`) is finished as FAILED without a reply.
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
        message, context, run = pull_task_message(client, give_up, policy)
        if not run.fab_id.startswith(ALLOWED_FAB_PREFIX):
            raise PermissionError(f"run {run.run_id} is FAB {run.fab_id!r}, not lungvl's; refused")
        t0 = time.perf_counter()
        reply = client_app(message=message, context=context)
        logger.info(
            "run %s: answered %s in %.2f s", run.run_id, message.metadata.message_type, time.perf_counter() - t0
        )
        status, details = SubStatus.COMPLETED, ""
    except StaleTaskError as err:
        logger.warning("skipped a stale task: %s", err)
        details = str(err)
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


class TaskSource:
    """Claims tasks from the SuperNode, holding at most one claimed ahead while an older task waits.

    Args:
        acquire: claims the oldest pending task; returns its token, or None when there is none.
    """

    def __init__(self, acquire: Callable[[], str | None]) -> None:
        self._acquire = acquire
        self._ahead: str | None = None

    def next(self) -> str | None:
        """The token of the next task to answer: the one claimed ahead, else a fresh claim (may raise)."""
        if self._ahead is not None:
            token, self._ahead = self._ahead, None
            return token
        return self._acquire()

    def newer_waiting(self) -> str | None:
        """Why to give up on the current task's content (a newer task is claimed), or None."""
        if self._ahead is None:
            try:
                self._ahead = self._acquire()
            except Exception:  # the SuperNode is busy or restarting: ask again after the next slice
                return None
        return "a newer task is waiting" if self._ahead is not None else None


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


def serve(
    address: str,
    *,
    parent_pid: int | None = None,
    poll_interval: float = POLL_INTERVAL_S,
    policy: PullPolicy = PullPolicy(),
) -> None:
    """Poll the SuperNode's Runtime API at ``address`` and answer ClientApp tasks until stopped.

    Args:
        address: ``host:port`` of the SuperNode's Runtime API (its ``--port``; loopback).
        parent_pid: exit when this process (the SuperNode) is gone.
        poll_interval: seconds between polls.
        policy: how long to wait for a task's message content (see :class:`PullPolicy`).
    """
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    global _in_task
    import client.app  # noqa: F401  # warm up (torch, monai, transformers) before taking a task

    runtime = _client(address, max_tries=3)

    def acquire() -> str | None:
        res = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        return res.token if res.HasField("task") and res.token else None

    tasks = TaskSource(acquire)
    logger.info("lungvl site worker polling %s (pid %d)", address, os.getpid())
    try:
        while not _stop and _parent_alive(parent_pid):
            try:
                token = tasks.next()
            except Exception as err:  # SuperNode restarting: keep polling
                logger.debug("AcquireTask failed: %s", err)
                time.sleep(1.0)
                continue
            if token is not None:
                _in_task = True
                try:
                    run_one_task(address, token, tasks.newer_waiting, policy)
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

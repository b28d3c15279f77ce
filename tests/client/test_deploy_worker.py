"""The site worker's task handling against a fake SuperNode Runtime API (Flower's real inflate path).

The fault these pin down: Flower 1.42's SuperNode creates a task for a message of a run that is already
over (a server killed and resumed) and then drops the message's content, so the task's objects are
registered but never arrive. The worker must give that task up once a newer task is waiting instead
of waiting out Flower's two-hour pull limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.serde import context_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    ConfirmMessageReceivedResponse,
    PullObjectResponse,
)
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.deploy_worker import PullPolicy, StaleTaskError, TaskSource, pull_task_message

RUN_ID, NODE_ID = 4242, 77
FAST = PullPolicy(slice_s=0.05, max_wait_s=60.0, last_try_s=0.05)


def _message() -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, NODE_ID, 1
    return Message(RecordDict({"arrays": ArrayRecord([np.arange(6.0)])}), dst_node_id=NODE_ID, message_type="train")


@dataclass
class FakeRuntime:
    """The SuperNode's Runtime API for one claimed task; ``store`` maps object id -> content or None."""

    message: Message
    store: dict[str, bytes | None]
    pulls: int = 0
    confirmed: list[str] = field(default_factory=list)

    def PullTaskInput(self, _req: Any) -> PullTaskInputResponse:  # noqa: N802 (Flower's RPC names)
        ctx = Context(run_id=RUN_ID, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config={})
        return PullTaskInputResponse(
            context=context_to_proto(ctx), run=run_to_proto(Run.create_empty(RUN_ID)), task_id=9
        )

    def PullMessages(self, _req: Any) -> PullAppMessagesResponse:  # noqa: N802
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(self.message)], message_object_trees=[get_object_tree(self.message)]
        )

    def PullObject(self, req: Any) -> PullObjectResponse:  # noqa: N802
        self.pulls += 1
        if req.object_id not in self.store:
            return PullObjectResponse(object_found=False, object_available=False)
        content = self.store[req.object_id]
        if content is None:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, req: Any) -> ConfirmMessageReceivedResponse:  # noqa: N802
        self.confirmed.append(req.message_object_id)
        return ConfirmMessageReceivedResponse()


def _runtime(available: bool) -> FakeRuntime:
    msg = _message()
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    return FakeRuntime(msg, {oid: (content if available else None) for oid, content in objects.items()})


def test_pulls_a_complete_message() -> None:
    rt = _runtime(available=True)
    msg, ctx, run = pull_task_message(rt, give_up=lambda: pytest.fail("nothing to give up"), policy=FAST)  # type: ignore[arg-type]
    assert run.run_id == RUN_ID and ctx.node_id == NODE_ID
    assert msg.metadata.message_id == rt.message.object_id
    np.testing.assert_array_equal(msg.content["arrays"].to_numpy_ndarrays()[0], np.arange(6.0))
    assert rt.confirmed == [rt.message.object_id]


def test_gives_up_a_stale_task_once_a_newer_one_waits() -> None:
    rt = _runtime(available=False)  # registered, never arrives: the dropped message of a finished run
    answers = iter([None, None, "a newer task is waiting"])
    asked = []

    def give_up() -> str | None:
        asked.append(1)
        return next(answers)

    with pytest.raises(StaleTaskError, match=rf"run {RUN_ID}.*a newer task is waiting"):
        pull_task_message(rt, give_up, FAST)  # type: ignore[arg-type]
    assert len(asked) == 3 and rt.confirmed == []


def test_a_last_try_catches_content_that_completed_meanwhile() -> None:
    rt = _runtime(available=False)
    complete = {oid: obj.deflate() for oid, obj in get_all_nested_objects(rt.message).items()}

    def give_up() -> str | None:
        rt.store.update(complete)  # the SuperNode finished the download just as a newer task appeared
        return "a newer task is waiting"

    msg, _ctx, _run = pull_task_message(rt, give_up, FAST)  # type: ignore[arg-type]
    assert msg.metadata.message_id == rt.message.object_id


def test_gives_up_after_max_wait_without_a_newer_task() -> None:
    rt = _runtime(available=False)
    policy = PullPolicy(slice_s=0.05, max_wait_s=0.0, last_try_s=0.05)
    with pytest.raises(StaleTaskError, match="waited"):
        pull_task_message(rt, lambda: None, policy)  # type: ignore[arg-type]


def test_a_dropped_object_is_stale_at_once() -> None:
    rt = _runtime(available=True)
    rt.store.pop(next(iter(rt.store)))  # not in the store at all
    with pytest.raises(StaleTaskError, match="not in its store"):
        pull_task_message(rt, lambda: pytest.fail("no wait for a dropped object"), FAST)  # type: ignore[arg-type]


def test_task_source_holds_one_newer_task_ahead() -> None:
    queue = ["stale", None, "fresh", "later"]

    def acquire() -> str | None:
        return queue.pop(0) if queue else None

    tasks = TaskSource(acquire)
    assert tasks.next() == "stale"
    assert tasks.newer_waiting() is None  # nothing newer yet
    assert tasks.newer_waiting() == "a newer task is waiting"  # claims "fresh"
    assert tasks.newer_waiting() == "a newer task is waiting"  # still holds it, claims nothing more
    assert tasks.next() == "fresh"
    assert tasks.next() == "later"
    assert tasks.next() is None


def test_task_source_keeps_waiting_when_the_supernode_is_unreachable() -> None:
    def acquire() -> str | None:
        raise ConnectionError("SuperNode restarting")

    tasks = TaskSource(acquire)
    assert tasks.newer_waiting() is None
    with pytest.raises(ConnectionError):
        tasks.next()

"""Celery glue of the batching worker: the task strategy and batch completion.

The strategy replaces Celery's per-task execution for ``predict`` and ``predict_batch``:
each delivered message becomes a Celery ``Request`` (so revocation, expiry, worker state
and task events behave as usual) and is handed to the model server's batcher. When a batch
finishes, its results are stored with one pipelined round trip (SETEX + PUBLISH per task,
as Celery's Redis backend does) and its messages are acknowledged with another, only after
the results are stored (``acks_late``). A worker killed before that leaves the messages
unacknowledged, and the Redis transport redelivers them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from celery import states
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from kombu.serialization import registry as codecs
from kombu.transport import virtual

from common import keys
from common.errors import InferenceError, PayloadTooLargeError, RejectedMessageError
from common.settings import serving_settings
from loader.batching import Item, Outcome
from loader.cache import ModelKey
from loader.server import ModelServer
from tasks.routing import PREDICT

logger = logging.getLogger(__name__)


class HeldMessages:
    """Messages this worker holds (batching, running, storing): their leases get renewed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tags: dict[str, Any] = {}

    def add(self, tag: str, request: Any) -> None:
        with self._lock:
            self._tags[tag] = request

    def discard(self, tags: list[str]) -> None:
        with self._lock:
            for tag in tags:
                self._tags.pop(tag, None)

    def tags(self) -> list[str]:
        with self._lock:
            return list(self._tags)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tags)


class Completer:
    """Stores a batch's results, sends its task events and acknowledges its messages."""

    def __init__(self, app: Any, held: HeldMessages) -> None:
        self.app = app
        self.held = held
        self.call_soon: Callable[[Callable[[], None]], Any] | None = None
        self.eventer: Any = None
        # This worker's own queue and name: requests routed to it were counted in flight.
        self.instance_queue = ""
        self.hostname = ""

    def __call__(self, outcomes: list[Outcome]) -> None:
        requests = [o.item.ticket for o in outcomes]
        self.store(outcomes)
        self.send_events(outcomes)
        answered: Counter[ModelKey] = Counter(
            o.item.key
            for o in outcomes
            if o.item.key is not None and routed_here(o.item.ticket.message, self.instance_queue)
        )
        self.acknowledge(requests, answered)

    def store(self, outcomes: list[Outcome]) -> None:
        backend = self.app.backend
        failure_expires = getattr(backend, "failure_expires", None) or backend.expires
        pipe = backend.client.pipeline(transaction=False)
        for outcome in outcomes:
            request = outcome.item.ticket
            if request.ignore_result:
                continue
            if outcome.error is None:
                state, result, tb, expires = states.SUCCESS, outcome.value, None, backend.expires
            else:
                state, tb, expires = states.FAILURE, _traceback(outcome.error), failure_expires
                result = backend.encode_result(outcome.error, state)
            meta = backend._get_result_meta(result=result, state=state, traceback=tb, request=None)
            meta["task_id"] = request.id
            key = backend.get_key_for_task(request.id)
            value = backend.encode(meta)
            if expires:
                pipe.setex(key, int(expires), value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        pipe.execute()

    def send_events(self, outcomes: list[Outcome]) -> None:
        eventer = self.eventer
        if eventer is None or not eventer.enabled:
            return
        for outcome in outcomes:
            request = outcome.item.ticket
            runtime = outcome.finished - outcome.started
            if outcome.error is None:
                eventer.send("task-succeeded", uuid=request.id, result="<output>", runtime=runtime)
            else:
                eventer.send(
                    "task-failed",
                    uuid=request.id,
                    exception=f"{type(outcome.error).__name__}({str(outcome.error)!r})",
                    traceback="",
                )

    def acknowledge(self, requests: list[Any], answered: Counter[ModelKey] | None = None) -> None:
        """One pipelined round trip for the whole batch where the transport allows it; it
        also takes the batch's instance-routed requests off their in-flight counters."""
        messages = [r.message for r in requests if not r.message.acknowledged]
        tags = [m.delivery_tag for m in messages]
        qos = messages[0].channel.qos if messages else None
        if qos is not None and hasattr(qos, "_remove_from_indices"):
            with qos.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                for tag in tags:
                    qos._remove_from_indices(tag, pipe)
                for key, n in (answered or {}).items():
                    pipe.hincrby(keys.routing_state_key(*key), f"inflight:{self.hostname}", -n)
                pipe.execute()
            for message in messages:
                virtual.QoS.ack(qos, message.delivery_tag)
                message._state = "ACK"
        else:
            for message in messages:
                message.ack()
        for request in requests:
            worker_state.task_ready(request)
        self.held.discard(tags)
        if self.call_soon is not None:
            # Wake the consumer loop: it stops fetching while the prefetch window is full.
            self.call_soon(_noop)

    def requeue(self, items: list[Item]) -> None:
        """Give waiting requests back to the head of their queues (a warm shutdown)."""
        for item in items:
            request = item.ticket
            message = request.message
            if not message.acknowledged:
                # Back to the end BRPOP reads next, where it was (kombu's reject would
                # append it behind every request queued since).
                qos = message.channel.qos
                qos.restore_by_tag(message.delivery_tag, leftmost=False)
                virtual.QoS.ack(qos, message.delivery_tag)
                message._state = "REQUEUED"
            worker_state.task_ready(request)
            self.held.discard([message.delivery_tag])


def _noop() -> None:
    return None


def forward_to_shared(message: Any, key: ModelKey, hostname: str) -> None:
    """Move a delivered request to the head of its version's shared queue, then ack it; it
    no longer counts as in flight here."""
    from tasks.failover import destination

    envelope = dict(message._raw)
    target = destination(envelope)
    if target is None:
        return
    with message.channel.conn_or_acquire() as client:
        pipe = client.pipeline()
        pipe.rpush(target, json.dumps(envelope))
        pipe.hincrby(keys.routing_state_key(*key), f"inflight:{hostname}", -1)
        pipe.execute()
    message.ack()


def routed_here(message: Any, instance_queue: str) -> bool:
    return bool(instance_queue) and message.delivery_info.get("routing_key") == instance_queue


def _traceback(error: BaseException) -> str | None:
    if isinstance(error, InferenceError) or error.__traceback__ is None:
        return None
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def admit(items: list[Item]) -> list[Item]:
    """Drop requests revoked or expired while they waited (Celery stores and acks those)."""
    kept = []
    for item in items:
        request = item.ticket
        if (request.expires or request.id in worker_state.revoked) and request.revoked():
            continue
        kept.append(item)
    return kept


def batching_strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Callable[..., None]:
    """Celery task strategy: hand each request to the worker's model server."""
    server: ModelServer | None = getattr(consumer.controller, "model_server", None)
    if server is None:
        raise RuntimeError(
            "this worker has no model server: start it with `celery -A workers worker`"
        )
    completer: Completer = consumer.controller.model_completer
    health = consumer.controller.model_health
    held: HeldMessages = consumer.controller.held_messages
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    completer.eventer = eventer
    if consumer.hub is not None:
        completer.call_soon = consumer.hub.call_soon
    Request = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )
    accept = set(app.conf.accept_content)
    accepted_types = {codecs.name_to_type.get(name, name) for name in accept}
    max_bytes = serving_settings().max_payload_bytes
    single = task.name == PREDICT
    connection_errors = consumer.connection_errors

    def refuse(message: Any, error: InferenceError) -> None:
        task_id = message.headers.get("id")
        logger.warning("refusing task %s: %s", task_id, error)
        if task_id:
            task.backend.mark_as_failure(task_id, error)
        message.reject_log_error(logger, connection_errors)  # no requeue: it can never run

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        size = len(message.body or b"")
        if size > max_bytes:
            return refuse(
                message,
                PayloadTooLargeError(
                    f"request of {size} bytes exceeds the limit of {max_bytes} bytes "
                    "(MAX_PAYLOAD_BYTES)"
                ),
            )
        if message.content_type not in accepted_types:
            return refuse(
                message,
                RejectedMessageError(
                    f"content type {message.content_type!r} is not accepted; "
                    f"use one of {sorted(accept)}"
                ),
            )
        try:
            request = Request(
                message, on_ack=ack, on_reject=reject, app=app, hostname=hostname,
                eventer=eventer, task=task, connection_errors=connection_errors,
                body=message.body, headers=message.headers, decoded=False, utc=True,
            )  # fmt: skip
        except Exception as exc:  # a body that does not decode: its caller must hear of it
            return refuse(message, RejectedMessageError(f"undecodable {task.name} request: {exc}"))
        if (request.expires or request.id in worker_state.revoked) and request.revoked():
            return None
        if eventer is not None and eventer.enabled and task.send_events:
            eventer.send(
                "task-received", uuid=request.id, name=request.name,
                args=request.argsrepr, kwargs=request.kwargsrepr,
                root_id=request.root_id, parent_id=request.parent_id,
                retries=0, eta=None,
                expires=request.expires and request.expires.isoformat(),
            )  # fmt: skip
        worker_state.task_reserved(request)
        held.add(message.delivery_tag, request)
        args, kwargs = request.args, request.kwargs or {}
        try:
            model = args[0] if args else kwargs.get("model")
            inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
            key = server.resolve(model, kwargs.get("version"))
        except (InferenceError, TypeError, IndexError) as exc:
            error = (
                exc
                if isinstance(exc, InferenceError)
                else RejectedMessageError(f"malformed {task.name} call: {exc}")
            )
            now = time.monotonic()
            outcome = Outcome(
                Item(key=None, inputs=None, single=single, ticket=request),  # type: ignore[arg-type]
                error=error,
                started=now,
                finished=now,
            )
            server.batcher.finish_now([outcome])
            return None
        if key in health.unhealthy_now and routed_here(message, completer.instance_queue):
            # Sent here before this instance left routing: to the shared queue with it.
            forward_to_shared(message, key, hostname)
            held.discard([message.delivery_tag])
            worker_state.task_ready(request)
            return None
        published = message.headers.get("published_at")
        queued_s = max(time.time() - published, 0.0) if isinstance(published, float) else 0.0
        server.submit(key, inputs, single=single, ticket=request, queued_s=queued_s)
        return None

    return handler

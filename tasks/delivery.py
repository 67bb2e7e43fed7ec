"""A request's way through a worker: received, batched, answered, acknowledged.

``Receiver`` turns fetched messages into batcher submissions: a message that can never run
(a pickle, garbage, over the size limit, an unknown model) is answered at once with a typed
error; a revoked or expired one with ``TaskRevokedError``. ``Completer`` answers a finished
batch: every result stored and announced, then every message acknowledged, in one round
trip (the acknowledgement after the store, so a worker killed in between redelivers, it
never loses). A lost Redis delays the answer, it does not drop it: the store is retried
until Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis
from celery import states
from celery.exceptions import TaskRevokedError
from celery.worker import state as worker_state

from common import keys
from common.contracts import ModelKey
from common.errors import InferenceError, RejectedMessageError
from common.redis import Outage, ThreadLinks
from loader.batching import Item, Outcome
from loader.server import ModelServer
from tasks import broker
from tasks.routing import MODEL_TASKS, PREDICT

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Delivery:
    """One fetched request (the batcher's ticket)."""

    tag: str
    source: broker.Source
    task_id: str | None = None
    reply_channel: str | None = None

    @property
    def routed_here(self) -> bool:
        """Sent to this instance's own queue by a balancing strategy (counted in flight)."""
        return self.source.queue != self.source.shared


class HeldMessages:
    """What this worker holds: fetched, not yet acknowledged or given back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Delivery] = {}

    def add(self, delivery: Delivery) -> None:
        with self._lock:
            self._held[delivery.tag] = delivery

    def discard(self, tags: list[str]) -> None:
        with self._lock:
            for tag in tags:
                self._held.pop(tag, None)

    def tags(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


def _revoked(expired: bool) -> TaskRevokedError:
    return TaskRevokedError("expired" if expired else "revoked")


class Completer:
    """Answers requests: results stored and announced, messages acknowledged (in the
    serving loop's round trip), or given back unrun; then task events."""

    def __init__(self, app: Any, held: HeldMessages, url: str, hostname: str) -> None:
        self.app = app
        self.held = held
        self.hostname = hostname
        self.links = ThreadLinks(url, on_noscript=broker.load_scripts, socket_timeout=10)
        self.loop: Any = None  # the worker loop: its consumer, and room to release
        self.events: Callable[[], Any] = lambda: None
        self.expires_s = int(app.backend.expires or 86400)
        self.outage = Outage(f"worker {hostname} (give back)")

    def commands(self, outcomes: list[Outcome]) -> list[tuple[Any, ...]]:
        """Store and announce every result, then acknowledge every message: the order a
        worker killed between the two needs (it redelivers, it never loses)."""
        if not outcomes:
            return []
        results: list[tuple[str, bytes, str | None]] = []
        deliveries: list[Delivery] = []
        date_done = datetime.now(timezone.utc).isoformat()  # one batch, one time
        for outcome in outcomes:
            delivery: Delivery = outcome.item.ticket
            deliveries.append(delivery)
            if delivery.task_id is None:
                continue  # nobody to answer: not even a task id could be read
            if outcome.error is None:
                state, value = states.SUCCESS, outcome.value
            else:
                revoked = isinstance(outcome.error, TaskRevokedError)
                state, value = (states.REVOKED if revoked else states.FAILURE), outcome.error
            meta = broker.result_meta(
                self.app, delivery.task_id, state, value, date_done=date_done,
                extra=self._served(outcome, delivery),
            )  # fmt: skip
            results.append((delivery.task_id, meta, delivery.reply_channel))
        commands = broker.results_commands(results, expires_s=self.expires_s)
        done = [(d.tag, d.source.label) for d in deliveries]
        commands.append(broker.ack_command(self.loop.consumer, done))
        return commands + self._in_flight_commands(deliveries)

    def _served(self, outcome: Outcome, delivery: Delivery) -> dict[str, Any]:
        """Celery's extended result fields, and how the batch served the request."""
        item = outcome.item
        ran = outcome.started > 0
        return {
            "worker": self.hostname,
            "queue": delivery.source.queue,
            "inference": {
                "version": delivery.source.label.rpartition("/")[2],
                "batch_size": outcome.batch_size,
                "queue_wait_ms": round(
                    (item.queued_s + max(outcome.started - item.received, 0.0)) * 1000, 3
                )
                if ran
                else None,
                "inference_ms": round((outcome.finished - outcome.started) * 1000, 3)
                if ran and outcome.finished
                else None,
            },
        }

    def answered(self, outcomes: list[Outcome]) -> None:
        """After the round trip of ``commands``: room for more, and the task events."""
        self._release([o.item.ticket for o in outcomes])
        self.send_events(outcomes)

    def give_back(self, deliveries: list[Delivery]) -> None:
        """Requests not run: back to the head of their (shared) queues (a round trip of its
        own, from any thread)."""
        if not deliveries:
            return
        tags = [d.tag for d in deliveries]
        commands = [broker.give_back_command(self.loop.consumer, tags)]
        commands += self._in_flight_commands(deliveries)
        while True:
            try:
                self.links.execute(commands)
                self.outage.ok()
                break
            except redis.RedisError as exc:
                since = self.outage.since
                stopping = self.loop is not None and self.loop.stopping
                if stopping and since is not None and time.monotonic() - since > 10:
                    # Stopping with Redis gone: they come back when the lease ends.
                    logger.error("worker %s could not give back requests: %s", self.hostname, exc)
                    return
                time.sleep(self.outage.failed(exc))
        self._release(deliveries)

    def _in_flight_commands(self, deliveries: list[Delivery]) -> list[tuple[Any, ...]]:
        # Requests a balancer routed here leave this instance's in-flight count.
        routed = Counter(d.source.label for d in deliveries if d.routed_here)
        return [
            broker.in_flight_done_command(
                keys.routing_state_key(*ModelKey.parse(label)), f"inflight:{self.hostname}", n
            )
            for label, n in routed.items()
        ]

    def _release(self, deliveries: list[Delivery]) -> None:
        self.held.discard([d.tag for d in deliveries])
        if self.loop is not None:
            self.loop.release(len(deliveries))

    def send_events(self, outcomes: list[Outcome]) -> None:
        eventer = self.events()
        if eventer is None or not eventer.enabled:
            return
        for outcome in outcomes:
            task_id = outcome.item.ticket.task_id
            if task_id is None:
                continue
            if outcome.error is None:
                runtime = outcome.finished - outcome.started
                eventer.send("task-succeeded", uuid=task_id, result="<output>", runtime=runtime)
            else:
                eventer.send(
                    "task-failed",
                    uuid=task_id,
                    exception=f"{type(outcome.error).__name__}({str(outcome.error)!r})",
                    traceback="",
                )


def admit(items: list[Item]) -> tuple[list[Item], list[Outcome]]:
    """Requests revoked or expired while they waited are answered with TaskRevokedError."""
    kept, refused = [], []
    now = time.monotonic()
    for item in items:
        delivery: Delivery = item.ticket
        expired = item.expires_at is not None and item.expires_at <= time.time()
        if expired or delivery.task_id in worker_state.revoked:
            refused.append(Outcome(item, error=_revoked(expired), started=now, finished=now))
        else:
            kept.append(item)
    return kept, refused


class Receiver:
    """Fetched messages -> batcher submissions (runs in the serving loop's thread)."""

    def __init__(
        self,
        app: Any,
        server: ModelServer,
        completer: Completer,
        held: HeldMessages,
        *,
        max_body_bytes: int,
        unhealthy: Callable[[], frozenset[ModelKey]] = frozenset,
    ) -> None:
        self.app = app
        self.server = server
        self.completer = completer
        self.held = held
        self.max_body_bytes = max_body_bytes
        self.accept = list(app.conf.accept_content)
        self.unhealthy = unhealthy

    def __call__(self, fetched: list[broker.Fetched]) -> None:
        give_back: list[Delivery] = []
        for item in fetched:
            delivery = Delivery(item.tag, item.source)
            self.held.add(delivery)
            if item.source.forward or self._receive(delivery, item.raw):
                give_back.append(delivery)
        self.completer.give_back(give_back)

    def _fail(self, delivery: Delivery, error: BaseException, single: bool = True) -> None:
        now = time.monotonic()
        item = Item(key=None, inputs=None, single=single, ticket=delivery)  # type: ignore[arg-type]
        self.server.batcher.finish_now([Outcome(item, error=error, started=now, finished=now)])

    def _receive(self, delivery: Delivery, raw: bytes) -> bool:
        """Hand one request on; True if it must go back to its queue unrun."""
        try:
            message = broker.decode_task_message(
                raw, accept=self.accept, max_body_bytes=self.max_body_bytes
            )
        except broker.Refused as refused:
            delivery.task_id, delivery.reply_channel = refused.task_id, refused.reply_channel
            logger.warning("refusing task %s: %s", refused.task_id, refused.error)
            self._fail(delivery, refused.error)
            return False
        delivery.task_id, delivery.reply_channel = message.task_id, message.reply_channel
        single = message.task_name == PREDICT
        if message.task_name not in MODEL_TASKS:
            self._fail(
                delivery,
                RejectedMessageError(f"{message.task_name} is not served by model workers"),
            )
            return False
        if message.expired or message.task_id in worker_state.revoked:
            self._fail(delivery, _revoked(message.expired), single)
            return False
        self._announce(message)
        args, kwargs = message.args, message.kwargs
        try:
            model = args[0] if args else kwargs.get("model")
            inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
            key = self.server.resolve(model, kwargs.get("version"))
        except (InferenceError, TypeError, IndexError) as exc:
            error = (
                exc
                if isinstance(exc, InferenceError)
                else RejectedMessageError(f"malformed {message.task_name} call: {exc}")
            )
            self._fail(delivery, error, single)
            return False
        if key in self.unhealthy():
            return True  # taken just before this instance left: another one serves it
        published = message.published_at
        queued_s = max(time.time() - published, 0.0) if published is not None else 0.0
        expires_at = message.expires.timestamp() if message.expires is not None else None
        self.server.submit(
            key, inputs, single=single, ticket=delivery, queued_s=queued_s, expires_at=expires_at,
            cold_start=message.cold_start, priority=message.priority,
        )  # fmt: skip
        return False

    def _announce(self, message: broker.TaskMessage) -> None:
        eventer = self.completer.events()
        if eventer is not None and eventer.enabled:
            eventer.send(
                "task-received", uuid=message.task_id, name=message.task_name,
                args=message.headers.get("argsrepr", ""),
                kwargs=message.headers.get("kwargsrepr", ""),
                root_id=message.task_id, parent_id=None, retries=0, eta=None,
                expires=message.expires and message.expires.isoformat(),
            )  # fmt: skip

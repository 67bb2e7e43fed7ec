"""The worker's reader of its model queues (a thread of its own).

It waits for a wake token, takes what its room allows with the broker's atomic fetch and
hands the messages to the worker; while messages keep coming it fetches again at once
(one round trip per fetch, however many messages). Its queues change at run time
(``add_consumer``/``cancel_consumer``, a model turning unhealthy): a change wakes it at
once. A lost connection is routine: it logs once per outage, backs off, reconnects and
gives back anything a fetch whose reply was lost had taken.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from common import keys
from common.contracts import ModelKey
from common.redis import redis_client
from tasks import broker

logger = logging.getLogger(__name__)

WAIT_S = 1.0


class Outage:
    """Logs a lost Redis once per outage, and its end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None

    def failed(self, exc: BaseException) -> float:
        """Returns the back-off to sleep."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            logger.warning("%s: Redis unreachable (%s); retrying", self.what, exc)
        return min(0.1 * 2 ** min((now - self.since) / 2, 4), 2.0)

    def ok(self) -> None:
        if self.since is not None:
            logger.warning(
                "%s: Redis reachable again after %.1f s", self.what, time.monotonic() - self.since
            )
            self.since = None


class Fetcher:
    def __init__(
        self,
        url: str,
        hostname: str,
        *,
        prefetch: int,
        lease_s: float,
        sweep_interval_s: float,
        deliver: Callable[[list[broker.Fetched]], None],
        held_tags: Callable[[], set[str]],
        paused: Callable[[], frozenset[ModelKey]] = frozenset,
    ) -> None:
        self.consumer = broker.ConsumerState(hostname)
        self.hostname = hostname
        self.prefetch = prefetch
        self.lease_s = lease_s
        self.sweep_interval_s = sweep_interval_s
        self.deliver = deliver
        self.held_tags = held_tags
        self.paused = paused
        self.client = redis_client(url, socket_timeout=WAIT_S + 10)
        self.control = redis_client(url, socket_timeout=5)
        self.own_wake = keys.own_wake(hostname)
        self._lock = threading.Condition()
        self._queues: dict[str, ModelKey] = {}  # shared queue -> version
        self._previous: set[str] = set()
        self._retired: set[str] = set()  # versions served before: instance queue forwarded
        self._held = 0
        self._stopping = False
        self._changed = True
        self._paused_seen: frozenset[ModelKey] = frozenset()
        self._reconcile = True  # leftovers of an earlier process, a fetch reply lost
        self._swept_at = 0.0
        self.outage = Outage(f"worker {hostname}")
        self._thread = threading.Thread(target=self._run, name="fetcher", daemon=True)

    # -- queues -----------------------------------------------------------------------------
    def queues(self) -> list[str]:
        with self._lock:
            return sorted(self._queues)

    def add(self, queue: str) -> bool:
        label = keys.queue_label(queue)
        if label is None or not queue.startswith(keys.QUEUE_PREFIX):
            return False
        with self._lock:
            if queue in self._queues:
                return True
            self._queues[queue] = ModelKey.parse(label)
            self._changed = True
        self._wake()
        return True

    def remove(self, queue: str) -> bool:
        with self._lock:
            key = self._queues.pop(queue, None)
            self._changed = True
        if key is None:
            return False
        self._wake()
        return True

    def release(self, n: int) -> None:
        """``n`` held messages were acknowledged or given back: room for more."""
        with self._lock:
            self._held = max(0, self._held - n)
            self._lock.notify()

    @property
    def held(self) -> int:
        return self._held

    def _wake(self) -> None:
        commands = [("LPUSH", self.own_wake, b"1"), ("LTRIM", self.own_wake, 0, 0)]
        with contextlib.suppress(redis.RedisError):  # the wait ends within a second anyway
            broker.run(self.control, commands)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._wake()
        self._thread.join(timeout_s)

    # -- the loop ---------------------------------------------------------------------------
    def _sources(self) -> list[broker.Source]:
        """Both queues of every version served. A worker also keeps reading the instance
        queue of a version it stopped serving, or that turned unhealthy here, to send what
        still arrives there on to the shared queue: a producer's view of the instances can
        be a moment (or, misconfigured, much longer) behind."""
        paused = self.paused()
        with self._lock:
            if not self._changed and paused is self._paused_seen:
                return self.consumer.sources
            serving = dict(self._queues)
            self._retired.update(self._previous - set(serving))
            self._retired -= set(serving)
            self._previous = set(serving)
            retired = set(self._retired)
            self._changed, self._paused_seen = False, paused
        sources = []
        for queue in sorted(set(serving) | retired):
            key = ModelKey.parse(keys.queue_label(queue) or "/")
            label = str(key)
            instance = keys.instance_queue(key.name, key.version, self.hostname)
            forward = queue in retired or key in paused
            if not forward:
                sources.append(broker.Source(queue, queue, label))
            sources.append(broker.Source(instance, queue, label, forward=forward))
        instances = [s.queue for s in sources if s.queue != s.shared]
        if instances:
            self.client.sadd(keys.INSTANCE_QUEUES, *instances)
        self.consumer.sources = sources
        return sources

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # a bug here must not stop the worker's reading for good
                logger.exception("worker %s: fetch failed", self.hostname)
                time.sleep(1.0)

    def _step(self) -> None:
        with self._lock:
            while self._held >= self.prefetch and not self._stopping:
                self._lock.wait(0.5)
            if self._stopping:
                return
            room = self.prefetch - self._held
        try:
            self._maintain()
            self._sources()
            fetched = broker.fetch(self.client, self.consumer, room, self.lease_s)
            self.outage.ok()
            if fetched:
                with self._lock:
                    self._held += len(fetched)
                self.deliver(fetched)
                return  # more may wait: fetch again before waiting
            broker.wait_for_wake(self.client, self.consumer, self.own_wake, WAIT_S)
        except redis.RedisError as exc:
            self._reconcile = True
            time.sleep(self.outage.failed(exc))

    def _maintain(self) -> None:
        if self._reconcile:
            # Entries in Redis this process does not hold: taken by a fetch whose reply was
            # lost, or left by an earlier process of this name. Back to their queues.
            held = self.held_tags()
            stray = [
                t
                for t in (broker.text(x) for x in self.client.hkeys(self.consumer.held_key))
                if t not in held
            ]
            if stray:
                moved = broker.give_back(self.client, self.consumer, stray)
                logger.warning("worker %s gave back %d stray messages", self.hostname, moved)
            self._reconcile = False
        now = time.monotonic()
        if now - self._swept_at >= self.sweep_interval_s:
            self._swept_at = now
            moved = broker.sweep(self.client, self.lease_s)
            if moved:
                logger.warning("%d messages of workers whose lease expired went back", moved)

    def describe(self) -> dict[str, Any]:
        return {"held": self._held, "queues": self.queues()}

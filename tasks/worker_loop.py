"""The worker's serving loop: fetch, run, answer, on one thread and one connection.

Each turn sends, in one write, the last batch's results and acknowledgements followed by
the fetch of what the freed room allows (the broker's atomic fetch: a message is in a
queue or in this worker's held hash, never only in memory), runs the next batch while
Redis answers, then reads the replies. Under load a turn is one forward pass with its
round trip hidden behind it; with nothing to do the loop blocks on its wake lists until a
producer leaves a token (or a second passes, or a batch's wait ends), so an idle worker
costs nothing and a lone request is answered after two round trips.

Its queues change at run time (``add_consumer``/``cancel_consumer``, a model turning
unhealthy, a load finishing): each change wakes it at once. A lost connection is routine:
it logs once per outage, backs off, sends the answers again (storing and acknowledging
twice is harmless) and gives back anything a fetch whose reply was lost had taken.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from common import keys
from common.contracts import ModelKey
from common.redis import Outage, redis_client
from common.resp3 import Connection, Endpoint
from loader.batching import Batcher, Outcome
from tasks import broker
from tasks.delivery import Completer, Receiver

logger = logging.getLogger(__name__)

WAIT_S = 1.0
# A batch's wait (max_batch_delay_ms) shorter than this is waited out without blocking.
MIN_WAIT_S = 0.001


@dataclass
class _Trip:
    """A round trip sent and not yet read."""

    count: int  # replies due
    answering: list[Outcome]
    plan: broker.FetchPlan | None
    room: int
    waiting: bool


class WorkerLoop:
    def __init__(
        self,
        url: str,
        hostname: str,
        *,
        batcher: Batcher,
        receiver: Receiver,
        completer: Completer,
        prefetch: int,
        lease_s: float,
        sweep_interval_s: float,
        held_tags: Callable[[], set[str]],
        paused: Callable[[], frozenset[ModelKey]] = frozenset,
    ) -> None:
        self.consumer = broker.ConsumerState(hostname)
        self.hostname = hostname
        self.batcher = batcher
        self.receiver = receiver
        self.completer = completer
        self.prefetch = prefetch
        self.lease_s = lease_s
        self.sweep_interval_s = sweep_interval_s
        self.held_tags = held_tags
        self.paused = paused
        # The hot path on a lean connection of this thread's own.
        self.conn = Connection(Endpoint.from_url(url), on_push=lambda push: None)
        self.client = redis_client(url, socket_timeout=10)
        self.control = redis_client(url, socket_timeout=5)
        self.own_wake = keys.own_wake(hostname)
        self._lock = threading.Lock()
        self._queues: dict[str, ModelKey] = {}  # shared queue -> version
        self._previous: set[str] = set()
        self._retired: set[str] = set()  # versions served before: instance queue forwarded
        self._held = 0
        self._stopping = False
        self._changed = True
        self._paused_seen: frozenset[ModelKey] = frozenset()
        self._reconcile = True  # leftovers of an earlier process, a fetch reply lost
        self._drained = False  # the last fetch found every queue empty
        self._swept_at = 0.0
        self._unanswered: list[Outcome] = []
        self._trip: _Trip | None = None
        self.outage = Outage(f"worker {hostname}")
        self._thread = threading.Thread(target=self._run, name="worker-loop", daemon=True)
        batcher.on_wake = self.wake

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
        self.wake()
        return True

    def remove(self, queue: str) -> bool:
        with self._lock:
            key = self._queues.pop(queue, None)
            self._changed = True
        if key is None:
            return False
        self.wake()
        return True

    def release(self, n: int) -> None:
        """``n`` held messages were acknowledged or given back: room for more."""
        with self._lock:
            self._held = max(0, self._held - n)

    @property
    def held(self) -> int:
        return self._held

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wake(self) -> None:
        """End the loop's wait now (called from other threads)."""
        commands = [("LPUSH", self.own_wake, b"1"), ("LTRIM", self.own_wake, 0, 0)]
        with contextlib.suppress(redis.RedisError):  # the wait ends within a second anyway
            broker.run(self.control, commands)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop fetching; the batch under way is run and answered first."""
        self._stopping = True
        self.wake()
        self._thread.join(timeout_s)

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        self.batcher.cache.pin_threads()
        while not self._stopping:
            try:
                self._turn()
            except Exception:  # a bug here must not stop the worker's serving for good
                logger.exception("worker %s: serving loop failed", self.hostname)
                time.sleep(1.0)
        self._answer_remaining()

    def _turn(self) -> None:
        picked, wait_s = self.batcher.next_batch()
        self._unanswered += self.batcher.finished_early()
        if self._trip is None:
            self._start_trip(idle=picked is None, wait_s=wait_s)
        if picked is not None:  # computed while Redis works on the round trip
            self._unanswered += self.batcher.run_batch(*picked)
        if self._trip is not None:
            self._finish_trip()

    def _start_trip(self, *, idle: bool, wait_s: float | None) -> None:
        answering, self._unanswered = self._unanswered, []
        with self._lock:
            room = self.prefetch - self._held + len(answering)
        try:
            self._maintain()
            if not self._sources():
                self._drained = True  # nothing to fetch from: wait, do not spin (a standby)
            commands = self.completer.commands(answering)
            # Nothing to run or answer, and the last fetch found every queue empty: wait
            # for a wake token. The fetch goes in the same write, behind the wait: Redis
            # runs it the moment the wait ends, so a request that wakes an idle worker
            # costs one round trip, not two.
            waiting = idle and not answering and self._drained and not self._stopping
            if waiting:
                timeout = WAIT_S if wait_s is None else min(wait_s, WAIT_S)
                if timeout < MIN_WAIT_S:
                    self._unanswered = answering
                    return  # a batch's short wait: look again at once
                commands.append(broker.wait_command(self.consumer, self.own_wake, timeout))
            # Fetch with every answer and every wait (it rides the same round trip), and
            # otherwise unless the last fetch found the queues empty.
            plan = None
            if (
                room > 0
                and bool(self.consumer.sources)
                and not self._stopping
                and (bool(commands) or not self._drained)
            ):
                plan = broker.fetch_command(self.consumer, room, self.lease_s)
                commands.append(plan.command)
            if not commands:
                return
            if not self.conn.connected:
                self.conn.open()
            self.conn.send(commands)
            self._trip = _Trip(len(commands), answering, plan, room, waiting)
        except redis.RedisError as exc:
            self._failed(answering, exc)

    def _finish_trip(self) -> None:
        trip, self._trip = self._trip, None
        assert trip is not None
        try:
            replies = self.conn.receive(trip.count, timeout_s=WAIT_S + 10)
            self.outage.ok()
        except redis.exceptions.NoScriptError as exc:
            broker.load_scripts(self.client)  # a restarted Redis forgot them: send again
            self._failed(trip.answering, exc, pause=False)
            return
        except redis.RedisError as exc:
            self._failed(trip.answering, exc)
            return
        if trip.answering:
            self.completer.answered(trip.answering)
            self.batcher.record(trip.answering)
        if trip.plan is not None:
            fetched = trip.plan.parse(replies[-1])
            self._drained = len(fetched) < trip.room
            if fetched:
                with self._lock:
                    self._held += len(fetched)
                self.receiver(fetched)
        elif trip.waiting:
            self._drained = False  # woken (or a second passed): look again

    def _failed(self, answering: list[Outcome], exc: Exception, *, pause: bool = True) -> None:
        """Answers are sent again next turn; a fetch may have taken messages: reconcile."""
        self._unanswered = answering + self._unanswered
        self._reconcile = True
        self.conn.close()
        if pause:
            time.sleep(self.outage.failed(exc))

    def _answer_remaining(self) -> None:
        """At a stop: answer what ran, within a few seconds even if Redis is away."""
        self._unanswered += self.batcher.finished_early()
        if self._trip is not None:
            self._finish_trip()
        deadline = time.monotonic() + 10.0
        while self._unanswered and time.monotonic() < deadline:
            try:
                if not self.conn.connected:
                    self.conn.open()
                self.conn.execute(self.completer.commands(self._unanswered))
            except redis.exceptions.NoScriptError:
                broker.load_scripts(self.client)
                continue
            except redis.RedisError as exc:
                self.conn.close()
                time.sleep(self.outage.failed(exc))
                continue
            self.completer.answered(self._unanswered)
            self.batcher.record(self._unanswered)
            self._unanswered = []
        if self._unanswered:
            logger.error(
                "worker %s stops with %d answers unsent: their requests come back from its lease",
                self.hostname,
                len(self._unanswered),
            )

    def _sources(self) -> list[broker.Source]:
        """Both queues of every version served. A worker also keeps reading the instance
        queue of a version it stopped serving, or that turned unhealthy here, to send what
        still arrives there on to the shared queue: a producer's view of the instances can
        be a moment (or, misconfigured, much longer) behind."""
        paused = self.paused()
        with self._lock:
            if not self._changed and paused == self._paused_seen:
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
        self.consumer.set_sources(sources)
        return sources

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
                moved = broker.give_back(
                    functools.partial(broker.run, self.client), self.consumer, stray
                )
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

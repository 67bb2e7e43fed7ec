"""Routing a prediction to its model version, in the producer, without I/O of its own.

The producer's lookups (registry entries, routing state, the set of served versions) are
cached; on a miss they *yield* the Redis commands they need and get the replies back, so
that one piece of logic serves a synchronous caller (``run_sync``) and an event loop
(``run_async``) alike. A version is resolved explicitly, else by the model's traffic
split, else to its default; an unknown model or version fails here, naming what exists.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

from kombu import Exchange, Queue

from common import keys
from common.errors import RegistryUnavailableError, UnknownModelError
from loader.spec import check_name, check_version

PREDICT = "tasks.predict"
PREDICT_BATCH = "tasks.predict_batch"
MODEL_TASKS = frozenset([PREDICT, PREDICT_BATCH])

T = TypeVar("T")
Commands = list[tuple[Any, ...]]
# A lookup: yields the commands it needs, receives their replies, returns its value.
Reads = Generator[Commands, list[Any], T]


def run_sync(reads: Reads[T], execute: Callable[[Sequence[Any]], list[Any]]) -> T:
    try:
        commands = next(reads)
        while True:
            commands = reads.send(execute(commands))
    except StopIteration as done:
        return done.value


async def run_async(
    reads: Reads[T],
    execute: Callable[[Sequence[Any]], Awaitable[list[Any]]],
    first: Sequence[Any] | None = None,
) -> T:
    """Drive ``reads`` (``first``: its first commands, when the caller already took them)."""
    try:
        commands = next(reads) if first is None else first
        while True:
            commands = reads.send(await execute(commands))
    except StopIteration as done:
        return done.value


class RegistryView:
    """A producer's short-lived copy of registry entries (one round trip on a miss)."""

    def __init__(self, *, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        # Kept across ``forget`` (a Redis restart): what serves while the registry is gone.
        self._last_seen: dict[str, dict[str, Any]] = {}

    def entry(self, name: str) -> Reads[dict[str, Any]]:
        now = time.monotonic()
        cached = self._entries.get(name)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        raw, exists, split = yield [
            ("HGET", keys.REGISTRY, name),
            ("EXISTS", keys.REGISTRY),
            ("HGET", keys.TRAFFIC, name),
        ]
        if raw is None:
            last = self._last_seen.get(name)
            if not exists and last is not None:
                # A Redis restarted without persistence lost the registry; the scaler and
                # the workers publish it again within a tick: the last entry seen serves.
                return last
            if not exists:
                raise RegistryUnavailableError(
                    "the model registry is empty: no worker or scaler has published the model "
                    "repository to this Redis yet"
                )
            (names,) = yield [("HKEYS", keys.REGISTRY)]
            known = sorted(keys.text(k) for k in names)
            raise UnknownModelError(f"unknown model {name!r}; models: {', '.join(known)}")
        entry: dict[str, Any] = json.loads(raw)
        if split is not None:
            # A split or default version set through the API overrides the model config.
            override = json.loads(split)
            if override.get("weights"):
                entry["traffic"] = override["weights"]
            if override.get("default_version") in entry["versions"]:
                entry["default_version"] = override["default_version"]
        with self._lock:
            self._entries[name] = (now, entry)
            self._last_seen[name] = entry
        return entry

    def resolve(self, name: str, version: str | None) -> Reads[str]:
        check_name(name)
        if version is not None:
            check_version(version)
        entry = yield from self.entry(name)
        versions = entry["versions"]
        if version is None:
            version = pick_version(entry)
        if version not in versions:
            raise UnknownModelError(
                f"model {name!r} has no version {version!r}; versions: {', '.join(versions)}"
            )
        return version

    def splits(self, name: str) -> bool:
        """Whether the cached entry picks a version per request (a traffic split)."""
        cached = self._entries.get(name)
        if cached is None:
            return True
        entry = cached[1]
        return sum(1 for v, w in entry.get("traffic", {}).items() if w > 0) > 1

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()


# A producer pokes the scaler about a version nobody serves at most this often.
POKE_INTERVAL_S = 1.0


class ServedView:
    """Which versions have an instance (the scaler's ``served`` set), refreshed at most
    every ``ttl_s``: a request for any other version pokes the scaler (a cold start)."""

    def __init__(self, *, ttl_s: float) -> None:
        self.ttl_s = self._ttl_s = ttl_s
        self._served: frozenset[str] = frozenset()
        self._at = -1e9
        self._poked: dict[str, float] = {}
        # A scaler publishes the set: without one (a static fleet) nothing is known served.
        self.scaler = False

    def is_served(self, text: str) -> Reads[bool]:
        now = time.monotonic()
        if now - self._at >= self._ttl_s:
            members, scaler = yield [("SMEMBERS", keys.SERVED), ("EXISTS", keys.SCALER_STATUS)]
            self._served, self._at = frozenset(keys.text(m) for m in members), now
            self.scaler = bool(scaler)
        return text in self._served

    def poke_due(self, text: str) -> bool:
        """A version found not served: not poked for within ``POKE_INTERVAL_S``."""
        now = time.monotonic()
        if now - self._poked.get(text, -1e9) < POKE_INTERVAL_S:
            return False
        if len(self._poked) > 10_000:
            self._poked.clear()
        self._poked[text] = now
        return True


def pick_version(entry: dict[str, Any], rng: random.Random | None = None) -> str:
    """The version for a request that names none: by traffic weight, else the default."""
    traffic = {
        v: w for v, w in entry.get("traffic", {}).items() if w > 0 and v in entry["versions"]
    }
    if traffic:
        versions, weights = zip(*traffic.items(), strict=True)
        return (rng or random).choices(versions, weights=weights)[0]
    return str(entry["default_version"])


# Publishing to the default exchange goes straight to the list named by the routing key.
_DEFAULT_EXCHANGE = Exchange("")
_queues: dict[str, Queue] = {}


def model_queue_named(queue_name: str) -> Queue:
    queue = _queues.get(queue_name)
    if queue is None:
        queue = _queues[queue_name] = Queue(queue_name, _DEFAULT_EXCHANGE, routing_key=queue_name)
    return queue


class ModelRouter:
    """The Celery router (``task_routes``) of ``send_task("tasks.predict", ...)``: the same
    resolution as ``predict.delay``, for callers that go through Celery's own publish."""

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
    ) -> dict[str, Any] | None:
        if name not in MODEL_TASKS:
            return None
        if kwargs is None:
            raise TypeError(f"{name} needs a kwargs dict so that the router can record the version")
        from tasks.producer import shared_producer

        producer = shared_producer()
        model = args[0] if args else kwargs.get("model")
        resolved = producer.run(producer.registry.resolve(model, kwargs.get("version")))
        kwargs["version"] = resolved
        return {"queue": model_queue_named(keys.queue_name(model, resolved))}

"""Routing a prediction to its model version's queue, in the producer.

The router (``celeryconfig.task_routes``) resolves the version from the model registry in
Redis (explicit, else the model's traffic split, else its default version), writes the
resolved version into the task's kwargs so that the worker runs exactly what was routed,
and returns that version's queue. An unknown model or version fails here, in
``apply_async``, naming what exists: the producer never waits on a queue nobody serves.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from kombu import Exchange, Queue

from common import keys
from common.errors import RegistryUnavailableError, UnknownModelError
from loader.spec import check_name, check_version
from tasks.balancing import Balancer

PREDICT = "tasks.predict"
PREDICT_BATCH = "tasks.predict_batch"
MODEL_TASKS = frozenset([PREDICT, PREDICT_BATCH])

# Publishing to the default exchange goes straight to the list named by the routing key;
# a named exchange would cost kombu a binding lookup in Redis on every publish.
_DEFAULT_EXCHANGE = Exchange("")


class RegistryView:
    """A producer's short-lived copy of registry entries, one HGET per model on a miss."""

    def __init__(self, client_factory: Callable[[], redis.Redis], *, ttl_s: float) -> None:
        self._client_factory = client_factory
        self._client: redis.Redis | None = None
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._served: set[str] = set()
        self._served_at = -1e9
        self._poked: dict[str, float] = {}
        self._prioritised: set[str] = set()

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def entry(self, name: str) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            cached = self._entries.get(name)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        pipe = self._redis().pipeline(transaction=False)
        pipe.hget(keys.REGISTRY, name)
        pipe.exists(keys.REGISTRY)
        pipe.hget(keys.TRAFFIC, name)
        raw, exists, split = pipe.execute()
        if raw is None:
            if not exists:
                raise RegistryUnavailableError(
                    "the model registry is empty: no worker or scaler has published the model "
                    "repository to this Redis yet"
                )
            known = sorted(keys.text(k) for k in self._redis().hkeys(keys.REGISTRY))
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
        return entry

    def resolve(self, name: str, version: str | None) -> str:
        check_name(name)
        entry = self.entry(name)
        versions = entry["versions"]
        if version is None:
            version = pick_version(entry)
        else:
            check_version(version)
        if version not in versions:
            raise UnknownModelError(
                f"model {name!r} has no version {version!r}; versions: {', '.join(versions)}"
            )
        return version

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()

    def note_priority(self, queue: str) -> None:
        """Record once per process that ``queue`` gets prioritised requests."""
        if queue not in self._prioritised:
            self._redis().sadd(keys.PRIORITY_QUEUES, queue)
            self._prioritised.add(queue)

    def poke_if_unserved(self, name: str, version: str) -> None:
        """Wake the scaler when this version has no instance (a cold start)."""
        now = time.monotonic()
        if now - self._served_at >= max(self._ttl_s, 0.5):
            self._served = {keys.text(m) for m in self._redis().smembers(keys.SERVED)}
            self._served_at = now
        text = keys.model_key_text(name, version)
        if text not in self._served and now - self._poked.get(text, -1e9) >= 1.0:
            self._poked[text] = now
            self._redis().publish(keys.SCALER_POKE, text)


def pick_version(entry: dict[str, Any], rng: random.Random | None = None) -> str:
    """The version for a request that names none: by traffic weight, else the default."""
    traffic = {
        v: w for v, w in entry.get("traffic", {}).items() if w > 0 and v in entry["versions"]
    }
    if traffic:
        versions, weights = zip(*traffic.items(), strict=True)
        return (rng or random).choices(versions, weights=weights)[0]
    return str(entry["default_version"])


_queues: dict[str, Queue] = {}


def model_queue(name: str, version: str) -> Queue:
    return model_queue_named(keys.queue_name(name, version))


def model_queue_named(queue_name: str) -> Queue:
    queue = _queues.get(queue_name)
    if queue is None:
        queue = _queues[queue_name] = Queue(queue_name, _DEFAULT_EXCHANGE, routing_key=queue_name)
    return queue


class ModelRouter:
    """The Celery router for ``tasks.predict`` and ``tasks.predict_batch``."""

    def __init__(self, registry: RegistryView, balancer: Balancer | None = None) -> None:
        self.registry = registry
        self.balancer = balancer or Balancer(registry._client_factory, ttl_s=1.0)

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
    ) -> dict[str, Any] | None:
        if name not in MODEL_TASKS:
            return None
        if kwargs is None:
            raise TypeError(f"{name} needs a kwargs dict so that the router can record the version")
        model = args[0] if args else kwargs.get("model")
        version = kwargs.get("version")
        resolved = self.registry.resolve(model, version)
        kwargs["version"] = resolved
        return {"queue": model_queue(model, resolved)}

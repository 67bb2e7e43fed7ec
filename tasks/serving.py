"""The worker's model-serving bootstep, its report to Redis and its remote-control commands.

``celery -A workers worker`` adds the ``ModelServing`` step: it builds the model server
before the consumer starts (the batching strategy needs it), writes a report to Redis
about every second (under a key that expires when the worker stops reporting), publishes
the model repository to the registry, and renews the leases of the messages it holds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from celery import bootsteps
from celery.worker.control import control_command, inspect_command

from common import keys
from common.errors import InferenceError
from common.redis import redis_client
from common.settings import (
    ServingSettings,
    WorkerSettings,
    metrics_settings,
    serving_settings,
    worker_settings,
)
from loader.cache import ModelKey
from loader.health import UNHEALTHY, HealthChecker
from loader.registry import RegistryPublisher
from loader.server import ModelServer
from monitoring.metrics import WORKER, MetricsRecorder
from monitoring.resources import ProcessSampler, gpu_reading
from tasks.strategy import Completer, HeldMessages, admit

logger = logging.getLogger(__name__)


class Reporter:
    """Writes the worker report, renews message leases and keeps the registry current."""

    def __init__(
        self,
        worker: Any,
        server: ModelServer,
        held: HeldMessages,
        serving: ServingSettings,
        settings: WorkerSettings,
        health: HealthChecker | None = None,
    ) -> None:
        self.health = health
        self.worker = worker
        self.server = server
        self.held = held
        self.interval_s = settings.report_interval_s
        self.ttl_s = max(3 * settings.report_interval_s, 3.0)
        self.nvml_index = settings.nvml_index
        self.client = redis_client(serving.redis_url, socket_timeout=5)
        self.sampler = ProcessSampler()
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-report", daemon=True)
        self.registry = RegistryPublisher(server.repository)
        self.orphan_exit_s = settings.orphan_exit_s
        self._last_ok = time.monotonic()
        # Metrics are recorded by the batcher's completion thread and the cache's loaders;
        # this thread writes them, so a prediction never waits on a metrics write.
        self.metrics = MetricsRecorder(self.client, metrics_settings())
        server.batcher.observers.append(self.metrics.observe)
        server.cache.on_loaded = lambda key, load_s: self.metrics.loaded(str(key), load_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.metrics.flush()
        except Exception as exc:
            logger.warning(
                "worker %s could not write its last metrics: %s", self.worker.hostname, exc
            )
        try:
            self.client.delete(keys.worker_report_key(self.worker.hostname))
            self.client.zrem(keys.WORKERS, self.worker.hostname)
            # Its own queue stays announced: producers may still route there for a moment,
            # and the scaler's failover moves what lands there and forgets the queue.
        except Exception as exc:
            logger.warning("worker %s could not remove its report: %s", self.worker.hostname, exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                self.tick(now)
                self._last_ok = time.monotonic()
            except Exception as exc:
                # Redis away for a moment: the next tick tries again, serving goes on.
                logger.warning("worker %s report failed: %s", self.worker.hostname, exc)
                away_s = time.monotonic() - self._last_ok
                if self.orphan_exit_s and away_s > self.orphan_exit_s:
                    logger.error(
                        "worker %s: Redis unreachable for %.0f s; shutting down",
                        self.worker.hostname,
                        away_s,
                    )
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            try:
                self.metrics.flush()
            except Exception as exc:
                logger.warning("worker %s metrics write failed: %s", self.worker.hostname, exc)
            self._stop.wait(self.interval_s)

    def queues(self) -> list[str]:
        # The queues the worker is told to consume (-Q, add_consumer, cancel_consumer), also
        # before its consumer has connected.
        consume_from = self.worker.app.amqp.queues.consume_from or {}
        return sorted(consume_from)

    def report(self, now: float) -> dict[str, Any]:
        server = self.server
        stats = server.batcher.stats
        device = server.device
        if device.type == "cuda":
            index = self.nvml_index if self.nvml_index is not None else (device.index or 0)
            device_reading = gpu_reading(index)
        else:
            device_reading = {"gpu": None, "reason": "no GPU: this worker runs on the CPU"}
        models = server.cache.describe()
        health = self.health.describe() if self.health is not None else {}
        unhealthy = any(h["state"] == UNHEALTHY for h in health.values())
        return {
            "hostname": self.worker.hostname,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": now,
            "started_at": self.started_at,
            "device": str(device),
            "queues": self.queues(),
            "models": models["loaded"],
            "loading": models["loading"],
            "failed_models": models["failed"],
            "loaded_bytes": server.cache.loaded_bytes(),
            "in_flight": len(self.held),
            "busy": {str(k): n for k, n in server.batcher.busy().items()},
            "capacity_bytes": server.cache.cache_size_bytes,
            "max_models": server.cache.max_loaded_models,
            "served": stats.served,
            "failed": stats.failed,
            "batches": stats.batches,
            "rows": stats.rows,
            "max_batch_rows": stats.max_batch_rows,
            "batching": {k: dict(v) for k, v in list(stats.per_model.items())},
            "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses,
            "evictions": server.cache.evictions,
            "loads": server.cache.loads,
            "load_failures": server.cache.load_failures,
            "latency_ms": {"p50": stats.latency_ms(0.5), "p99": stats.latency_ms(0.99)},
            "resources": self.sampler.sample(),
            "device_memory": device_reading,
            "health": "degraded" if unhealthy else "ok",
            # Per loaded model version: healthy / unhealthy / retrying, failures, reason.
            "instances_health": health,
            # Seconds of metrics given up while Redis was unreachable for over a minute.
            "metrics_dropped_seconds": self.metrics.dropped_seconds,
            "report_interval_s": self.interval_s,
        }

    def tick(self, now: float) -> None:
        report = self.report(now)
        hostname = self.worker.hostname
        self._record_resources(report, now)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.worker_report_key(hostname), json.dumps(report), ex=int(self.ttl_s))
        pipe.zadd(keys.WORKERS, {hostname: now})
        tags = self.held.tags()
        pipe.sadd(keys.INSTANCE_QUEUES, keys.instance_queue(hostname))
        # What this worker holds, for the scaler to restore at once if it dies.
        held_key = keys.held_key(hostname)
        pipe.delete(held_key)
        if tags:
            pipe.sadd(held_key, *tags)
            pipe.expire(held_key, 3600)
        for text, ms in list(self.server.batcher.stats.latency_ewma_ms.items()):
            name, _, version = text.partition("/")
            pipe.hset(keys.routing_state_key(name, version), f"latency:{hostname}", round(ms, 3))
        if tags:
            # Push the delivery time of held messages forward: only a dead worker's messages
            # outlive the visibility timeout and get redelivered.
            pipe.zadd(keys.UNACKED_INDEX, dict.fromkeys(tags, now), xx=True)
        for failed in report["failed_models"]:
            record = {
                "error": failed["error"],
                "error_type": failed["error_type"],
                "worker": hostname,
                "time": now,
            }
            pipe.hset(
                keys.LOAD_FAILURES, f"{failed['name']}/{failed['version']}", json.dumps(record)
            )
        pipe.exists(keys.REGISTRY)
        *_, registry_exists = pipe.execute()
        if not registry_exists or self.registry.due():
            self.registry.publish_if_changed(self.client, exists=bool(registry_exists))

    def _record_resources(self, report: dict[str, Any], now: float) -> None:
        resources = report["resources"]
        values = {
            "cpu": float(resources["cpu_percent"]),
            "rss": float(resources["rss_bytes"]),
            "mem": float(resources["system_memory_percent"]),
        }
        device = report["device_memory"]
        if device.get("gpu") is not None:
            values |= {
                "gpu_util": float(device["utilization_percent"]),
                "gpu_mem": float(device["memory_used_bytes"]),
                "gpu_n": 1.0,
            }
        self.metrics.gauge(WORKER, self.worker.hostname, values, now)


class ModelServing(bootsteps.StartStopStep):
    """Worker bootstep: the model server, the completer and the reporter."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        worker.model_server = None

    def create(self, worker: Any) -> ModelServing:
        serving, settings = serving_settings(), worker_settings()
        held = HeldMessages()
        completer = Completer(worker.app, held)
        completer.hostname = worker.hostname
        completer.instance_queue = keys.instance_queue(worker.hostname)
        server = ModelServer(serving, settings, complete=completer, admit=admit)
        health = HealthChecker(
            server.cache,
            interval_s=settings.health_check_interval_s,
            max_failures=settings.health_max_failures,
            probe_timeout_s=settings.health_probe_timeout_s,
            cooldown_s=settings.health_cooldown_s,
        )
        # Requests waiting on a model that turns unhealthy go back to their queues.
        health.on_unhealthy = lambda key: completer.requeue(server.batcher.take(key))
        worker.model_server = server
        worker.model_completer = completer
        worker.held_messages = held
        worker.model_health = health
        self.server = server
        self.health = health
        self.reporter = Reporter(worker, server, held, serving, settings, health)
        # Every worker consumes its own queue: the load-balancing strategies route there.
        own = keys.instance_queue(worker.hostname)
        worker.app.amqp.queues.select_add(own, routing_key=own)
        self.preload = settings.models
        for spec in settings.models:
            name, _, version = spec.partition(":")
            versions = [version] if version else server.repository.versions(name)
            for v in versions:
                queue = keys.queue_name(name, v)
                worker.app.amqp.queues.select_add(queue, routing_key=queue)
        return self

    def start(self, worker: Any) -> None:
        self.server.start()
        try:
            self.reporter.registry.publish_if_changed(self.reporter.client, exists=False)
        except Exception as exc:
            logger.warning("worker %s could not publish the registry: %s", worker.hostname, exc)
        for spec in self.preload:
            name, _, version = spec.partition(":")
            try:
                self.server.cache.preload(self.server.resolve(name, version or None))
            except InferenceError as exc:
                logger.error("worker %s cannot preload %s: %s", worker.hostname, spec, exc)
        self.reporter.start()
        self.health.start()

    def close(self, worker: Any) -> None:
        # Warm shutdown calls close() on every step before any stops, while the broker
        # connection still works: finish the running batch, give the waiting ones back.
        waiting = self.server.batcher.drain()
        if waiting:
            logger.info(
                "worker %s returns %d waiting requests to their queues",
                worker.hostname,
                len(waiting),
            )
            worker.model_completer.requeue(waiting)

    def stop(self, worker: Any) -> None:
        self.health.stop()
        self.reporter.stop()
        self.server.stop()


def _server(state: Any) -> ModelServer:
    return state.consumer.controller.model_server


@control_command(args=[("model", str), ("version", str)], signature="<model> [version]")
def preload_model(state: Any, model: str, version: str | None = None) -> dict[str, str]:
    """Start loading a model version into this worker's cache."""
    server = _server(state)
    try:
        key = server.resolve(model, version)
    except InferenceError as exc:
        return {"error": str(exc)}
    return {"ok": f"{key} {server.cache.preload(key).value}"}


@control_command(args=[("model", str), ("version", str)], signature="<model> [version]")
def unload_model(state: Any, model: str, version: str | None = None) -> dict[str, str]:
    """Drop a model version from this worker's cache (after its running batch)."""
    server = _server(state)
    try:
        key = server.resolve(model, version) if version is None else ModelKey(model, version)
    except InferenceError as exc:
        return {"error": str(exc)}
    dropped = server.cache.unload(key)
    return {"ok": f"{key} unloaded"} if dropped else {"error": f"{key} is not cached"}


@inspect_command()
def cached_models(state: Any) -> dict[str, Any]:
    """The models this worker holds, is loading, or failed to load."""
    return _server(state).cache.describe()

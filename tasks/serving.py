"""The worker's model-serving bootstep, its report to Redis and its remote-control commands.

``celery -A workers worker`` adds the ``ModelServing`` step: the model server, the serving
loop that reads the model queues, runs batches and answers (``tasks.worker_loop``; Celery's
own consumer keeps remote control, events and any other queue), a report to Redis about
every second (which also renews the worker's lease on what it holds), and the model
repository published to the registry. ``ServingConsumer`` sends ``add_consumer`` and
``cancel_consumer`` of model queues to the loop, so the scaler retargets a worker without
restarting it.
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

import psutil
import redis
from celery import bootsteps, signals
from celery.worker.consumer import Consumer
from celery.worker.control import control_command, inspect_command

from common import keys
from common.contracts import ModelKey, report_ttl_s
from common.errors import InferenceError, InsufficientMemoryError
from common.redis import Outage, redis_client
from common.settings import (
    ServingSettings,
    WorkerSettings,
    metrics_settings,
    serving_settings,
    worker_settings,
)
from loader.formats import prewarm
from loader.health import UNHEALTHY, HealthChecker
from loader.registry import RegistryPublisher
from loader.server import ModelServer, keep_freed_memory
from monitoring.metrics import WORKER, MetricsRecorder
from monitoring.resources import ProcessSampler, gpu_reading
from tasks import broker
from tasks.delivery import Completer, HeldMessages, Receiver, admit
from tasks.worker_loop import WorkerLoop

logger = logging.getLogger(__name__)


class Reporter:
    """Writes the worker report, renews message leases and keeps the registry current."""

    def __init__(
        self,
        worker: Any,
        server: ModelServer,
        loop: WorkerLoop,
        serving: ServingSettings,
        settings: WorkerSettings,
        health: HealthChecker | None = None,
    ) -> None:
        self.health = health
        self.worker = worker
        self.server = server
        self.loop = loop
        self.lease_s = serving.visibility_timeout_s
        self.interval_s = settings.report_interval_s
        self.ttl_s = report_ttl_s(settings.report_interval_s)
        self.nvml_index = settings.nvml_index
        self.client = redis_client(serving.redis_url, socket_timeout=5)
        self.sampler = ProcessSampler()
        self.started_at = time.time()
        self.prewarm: threading.Thread | None = None
        self._stop = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-report", daemon=True)
        self.registry = RegistryPublisher(server.repository)
        self.orphan_exit_s = settings.orphan_exit_s
        self._last_ok = time.monotonic()
        self.outage = Outage(f"worker {worker.hostname} (report)")
        self.ready = False
        # Metrics are recorded by the batcher's completion thread and the cache's loaders;
        # this thread writes them, so a prediction never waits on a metrics write.
        self.metrics = MetricsRecorder(self.client, metrics_settings())
        server.batcher.observers.append(self.metrics.observe)
        server.cache.on_loaded = lambda key, load_s: self.metrics.loaded(str(key), load_s)

    def start(self) -> None:
        # The first report before anything is fetched: a worker that holds messages and
        # has never reported looks gone to the scaler.
        try:
            self.tick(time.time())
        except Exception as exc:
            logger.warning("worker %s report failed: %s", self.worker.hostname, exc)
        self._thread.start()

    def nudge(self) -> None:
        """Report now, not at the next interval."""
        self._nudged.set()

    def stop(self) -> None:
        self._stop.set()
        self._nudged.set()
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
            # Its instance queues stay announced: producers may still route there for a
            # moment, and the scaler's failover moves what lands there and forgets them.
        except Exception as exc:
            logger.warning("worker %s could not remove its report: %s", self.worker.hostname, exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                self.tick(now)
                self._last_ok = time.monotonic()
                self.outage.ok()
            except Exception as exc:
                # Redis away for a moment: the next tick tries again, serving goes on.
                self.outage.failed(exc)
                away_s = time.monotonic() - self._last_ok
                if self.orphan_exit_s and away_s > self.orphan_exit_s:
                    logger.error(
                        "worker %s: Redis unreachable for %.0f s; shutting down",
                        self.worker.hostname,
                        away_s,
                    )
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            if self.outage.since is None:
                try:
                    self.metrics.flush()
                except Exception as exc:
                    logger.warning("worker %s metrics write failed: %s", self.worker.hostname, exc)
            self._nudged.wait(self.interval_s)
            self._nudged.clear()

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
            "queues": self.loop.queues(),
            "models": models["loaded"],
            "loading": models["loading"],
            "failed_models": models["failed"],
            "loaded_bytes": server.cache.loaded_bytes(),
            "held": self.loop.held,
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
            # What a new model could take here: NVML's free memory of this GPU, or the
            # host's available RAM.
            "device_free_bytes": int(
                device_reading["memory_free_bytes"]
                if device_reading.get("gpu") is not None
                else psutil.virtual_memory().available
            ),
            "health": "degraded" if unhealthy else "ok",
            # Its consumer listens for remote control (add_consumer, preload_model).
            "ready": self.ready,
            # Paying a model format's first-use cost (a CPU's seconds, once, at start).
            "prewarming": self.prewarm is not None and self.prewarm.is_alive(),
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
        commands: list[tuple[Any, ...]] = [
            # Only a dead worker's messages outlive their lease and come back.
            broker.heartbeat_command(hostname, json.dumps(report), self.ttl_s, now, self.lease_s)
        ]
        ready = {str(k) for k in self.server.cache.ready_keys()}
        latencies = self.server.batcher.stats.latency_ewma_ms
        for text, ms in list(latencies.items()):
            key, field = ModelKey.parse(text), f"latency:{hostname}"
            if text in ready:
                commands.append(("HSET", keys.routing_state_key(*key), field, round(ms, 3)))
            else:  # unloaded here: it leaves the routing state (no key outlives its use)
                latencies.pop(text, None)
                commands.append(("HDEL", keys.routing_state_key(*key), field))
        for failed in report["failed_models"]:
            record = {
                "error": failed["error"],
                "error_type": failed["error_type"],
                "worker": hostname,
                "time": now,
            }
            commands.append(
                (
                    "HSET",
                    keys.LOAD_FAILURES,
                    f"{failed['name']}/{failed['version']}",
                    json.dumps(record),
                )
            )
        commands.append(("EXISTS", keys.REGISTRY))
        *_, registry_exists = broker.run(self.client, commands)
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
    """Worker bootstep: the model server, its serving loop and its reporter."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        worker.model_server = None
        worker.model_loop = None

    def create(self, worker: Any) -> ModelServing:
        serving, settings = serving_settings(), worker_settings()
        keep_freed_memory()
        held = HeldMessages()
        completer = Completer(worker.app, held, serving.redis_url, worker.hostname)
        server = ModelServer(serving, settings, admit=admit)
        health = HealthChecker(
            server.cache,
            interval_s=settings.health_check_interval_s,
            max_failures=settings.health_max_failures,
            probe_timeout_s=settings.health_probe_timeout_s,
            cooldown_s=settings.health_cooldown_s,
        )
        receiver = Receiver(
            worker.app, server, completer, held,
            max_body_bytes=serving.max_payload_bytes,
            unhealthy=lambda: health.unhealthy_now,
        )  # fmt: skip
        loop = WorkerLoop(
            serving.redis_url,
            worker.hostname,
            batcher=server.batcher,
            receiver=receiver,
            completer=completer,
            prefetch=settings.prefetch_count,
            lease_s=serving.visibility_timeout_s,
            sweep_interval_s=serving.unacked_restore_interval_s,
            held_tags=held.tags,
            paused=lambda: health.unhealthy_now,
        )
        completer.loop = loop
        completer.events = lambda: getattr(worker.consumer, "event_dispatcher", None)
        # Requests waiting on a model that turns unhealthy go back to their queues; the
        # loop stops reading its shared queue (health.unhealthy_now) until it is retried.
        health.on_unhealthy = lambda key: completer.give_back(
            [item.ticket for item in server.batcher.take(key)]
        )
        server.cache.on_load_failed = lambda key, error: self._hand_over(
            worker.hostname, key, error
        )
        worker.model_server = server
        worker.model_loop = loop
        worker.model_health = health
        self.server, self.health, self.loop, self.completer = server, health, loop, completer
        self.reporter = Reporter(worker, server, loop, serving, settings, health)
        # Model queues are read by the serving loop, never by Celery's consumer (which would
        # take messages out of the reliable path): -Q's model queues move over.
        selected = [q for q in worker.app.amqp.queues.consume_from if keys.queue_label(q)]
        for queue in selected:
            loop.add(queue)
        if selected:
            worker.app.amqp.queues.deselect(selected)
        self.preload = settings.models
        for spec in settings.models:
            name, _, version = spec.partition(":")
            versions = [version] if version else server.repository.versions(name)
            for v in versions:
                loop.add(keys.queue_name(name, v))
        return self

    def _hand_over(self, hostname: str, key: ModelKey, error: InferenceError) -> None:
        """A load that ran out of memory here: the first such failure of the version in a
        while makes it unhealthy here, so its requests go back to their queue and the
        scaler places it on another worker; a second one fails its callers."""
        if not isinstance(error, InsufficientMemoryError):
            return
        command = (
            "SET",
            keys.LOAD_OOM_PREFIX + str(key),
            hostname,
            "NX",
            "EX",
            keys.LOAD_OOM_TTL_S,
        )
        try:
            first = self.completer.links.execute([command])[0]
        except Exception as exc:
            logger.warning("cannot hand %s over: %s", key, exc)
            return
        if first:
            self.health.mark_unhealthy(key, f"load failed: {error}")

    def start(self, worker: Any) -> None:
        self.server.start(threads=False)
        try:
            self.reporter.registry.publish_if_changed(self.reporter.client, exists=False)
        except Exception as exc:
            logger.warning("worker %s could not publish the registry: %s", worker.hostname, exc)
        repository = self.server.repository  # read in the thread: a large one takes a while
        self.reporter.prewarm = threading.Thread(
            target=lambda: prewarm(repository.formats()), name="prewarm", daemon=True
        )
        self.reporter.prewarm.start()
        for spec in self.preload:
            name, _, version = spec.partition(":")
            try:
                self.server.cache.preload(self.server.resolve(name, version or None))
            except InferenceError as exc:
                logger.error("worker %s cannot preload %s: %s", worker.hostname, spec, exc)
        self.reporter.start()
        self.health.start()
        self.loop.start()

        def consumer_ready(sender: Any = None, **_: Any) -> None:
            threading.Thread(
                target=self._listening, args=(worker,), name="ready-check", daemon=True
            ).start()

        signals.worker_ready.connect(consumer_ready, weak=False)

    def _listening(self, worker: Any, within_s: float = 10.0) -> None:
        """Report ready once the worker answers remote control: its broadcast subscription
        goes live a moment after Celery's "ready", and a command sent before is lost."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                if worker.app.control.ping(destination=[worker.hostname], timeout=0.3):
                    break
            except Exception as exc:  # Redis away: the deadline still ends the wait
                logger.debug("ready check of %s: %s", worker.hostname, exc)
        self.reporter.ready = True
        self.reporter.nudge()  # tell the scaler now, not at the next report

    def close(self, worker: Any) -> None:
        # Warm shutdown calls close() on every step before any stops: stop fetching, answer
        # the batch under way, give the waiting ones back to the head of their queues.
        self.loop.stop()
        waiting = self.server.batcher.drain()
        if waiting:
            logger.info(
                "worker %s returns %d waiting requests to their queues",
                worker.hostname,
                len(waiting),
            )
            self.completer.give_back([item.ticket for item in waiting])

    def stop(self, worker: Any) -> None:
        self.health.stop()
        self.reporter.stop()
        self.server.stop()


class ServingConsumer(Consumer):
    """Celery's consumer, with model queues added and cancelled in the serving loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A full Redis (maxmemory reached) refuses kombu's start-up writes (a mutex, the
        # control queue): Celery retries them as a lost connection instead of exiting. The
        # workers already running drain it (their scripts may write past the limit).
        self.connection_errors = (
            *self.connection_errors,  # type: ignore[has-type]
            redis.exceptions.OutOfMemoryError,
            redis.exceptions.ExecAbortError,
        )

    def add_task_queue(self, queue: str, *args: Any, **options: Any) -> None:
        loop: WorkerLoop | None = getattr(self.controller, "model_loop", None)
        if loop is not None and loop.add(queue):
            logger.info("Started consuming from %s", queue)
            return
        super().add_task_queue(queue, *args, **options)

    def cancel_task_queue(self, queue: str) -> None:
        loop: WorkerLoop | None = getattr(self.controller, "model_loop", None)
        if loop is not None and loop.remove(queue):
            logger.info("Canceling queue %s", queue)
            return
        super().cancel_task_queue(queue)


@inspect_command()
def active_queues(state: Any) -> list[dict[str, Any]]:
    """The queues this worker consumes: Celery's, and the model queues of its loop."""
    from tasks.routing import model_queue_named

    consumer = state.consumer
    queues = [
        dict(q.as_dict(recurse=True))
        for q in (consumer.task_consumer.queues if consumer.task_consumer else [])
    ]
    loop: WorkerLoop | None = getattr(consumer.controller, "model_loop", None)
    if loop is not None:
        queues += [dict(model_queue_named(q).as_dict(recurse=True)) for q in loop.queues()]
    return queues


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

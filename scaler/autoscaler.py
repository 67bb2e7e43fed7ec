"""SEED.md's Python API on the queue shape: ``Autoscaler``, ``ZeroScaler``, ``DynamicModelLoader``.

``Autoscaler.start()`` runs the scaler loop (the same ``ScalerLoop`` that ``celery -A
workers beat`` runs) in a background thread of this process; a leader lock in Redis makes
it safe beside a beat scaler, only one of them acts. ``predict`` queues like
``predict.delay`` and awaits the result without blocking the event loop. Manual control
(``scale_model``, ``load_model``, ``unload_model``) is written to Redis, where every scaler
(this one, a beat process, a restarted one) reads it. ``model_manager`` is accepted for
SEED.md's signature and not used: models come from the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from common import keys
from common.contracts import ModelKey
from common.redis import redis_client
from common.settings import metrics_settings, serving_settings
from monitoring.alerts import AlertListener, active_alerts
from monitoring.metrics import MetricsHistory
from scaler.beat import build_loop
from scaler.config import (
    AutoscalerConfig,
    LoadBalancingStrategy,
    ModelLoaderConfig,
    ZeroScalingConfig,
)
from scaler.loop import ScalerLoop
from scaler.store import ScalerStore, instance_states

logger = logging.getLogger(__name__)

AlertCallback = Callable[[str, str], None]


class Autoscaler:
    def __init__(
        self,
        config: AutoscalerConfig | None = None,
        model_manager: Any = None,
        *,
        run_scaler: bool = True,
    ) -> None:
        self.config = config or AutoscalerConfig()
        self.run_scaler = run_scaler
        self._client = redis_client(serving_settings().redis_url)
        self.store = ScalerStore(self._client)
        self._loop: ScalerLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._alerts = AlertListener(self._client)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.run_scaler or self._thread is not None:
            return
        from workers import app

        self._loop = build_loop(app, self.config)
        # One tick before returning: the registry is published, producers can route.
        await asyncio.to_thread(self._loop.tick)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="scaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._loop is not None
        self._loop.run(self._stopping)

    async def stop(self, *, stop_workers: bool = False) -> None:
        """Stop this process's scaler loop; with ``stop_workers``, also the workers it started
        (when it led: the leader's fleet is not another scaler's to stop)."""
        self._stopping.set()
        self._alerts.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None
        if self._loop is not None:
            # A scaler that did not lead leaves the fleet to the one that does.
            led = self._loop.last is not None and self._loop.last.leader
            self._loop.store.resign()
            backend = self._loop.backend
            if stop_workers and led and hasattr(backend, "stop_all"):
                await asyncio.to_thread(backend.stop_all)

    # -- requests ---------------------------------------------------------------------------
    async def predict(
        self,
        model_name: str,
        inputs: Any,
        *,
        version: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        from tasks import predict

        timeout = timeout or self.config.zero_scaling.cold_start_timeout + 30.0
        return await predict.aio(
            model_name, inputs, version=version, priority=priority or 0, timeout=timeout
        )

    # -- manual control ---------------------------------------------------------------------
    def _key(self, model_name: str, version: str | None) -> ModelKey:
        from tasks.producer import shared_producer

        producer = shared_producer()
        return ModelKey(model_name, producer.run(producer.registry.resolve(model_name, version)))

    async def scale_model(
        self, model_name: str, target_instances: int | None, *, version: str | None = None
    ) -> dict[str, Any] | None:
        """Pin a version's instances; ``None`` gives it back to the automatic policy.
        Returns the manual command this replaced (a pin, a load or an unload), if any."""
        if target_instances is not None and target_instances < 0:
            raise ValueError(f"target_instances={target_instances} is below 0")
        key = self._key(model_name, version)
        record = None if target_instances is None else {"instances": int(target_instances)}
        return await asyncio.to_thread(self.store.set_override, key, record)

    async def load_model(
        self, model_name: str, version: str | None = None
    ) -> dict[str, Any] | None:
        """Load a version now and keep it loaded until ``unload_model`` (returns the manual
        command this replaced, if any)."""
        key = self._key(model_name, version)
        return await asyncio.to_thread(self.store.set_override, key, {"load": True})

    async def unload_model(
        self, model_name: str, version: str | None = None
    ) -> dict[str, Any] | None:
        """Take a version to zero now; a later request brings it back (returns the manual
        command this replaced, if any)."""
        key = self._key(model_name, version)
        return await asyncio.to_thread(self.store.set_override, key, {"unload_at": time.time()})

    async def set_traffic_split(
        self,
        model_name: str,
        weights: dict[str, float] | None = None,
        *,
        default_version: str | None = None,
    ) -> dict[str, Any]:
        """Requests that name no version go by ``weights`` (``{"v1": 90, "v2": 10}``: a
        canary at 10%), else to ``default_version``; both None restores the model config."""
        return await asyncio.to_thread(self._set_traffic, model_name, weights, default_version)

    def _set_traffic(
        self, model_name: str, weights: dict[str, float] | None, default_version: str | None
    ) -> dict[str, Any]:
        from tasks.producer import shared_producer

        producer = shared_producer()
        registry = producer.registry
        versions = producer.run(registry.entry(model_name))["versions"]
        for version in [*(weights or {}), *([default_version] if default_version else [])]:
            producer.run(registry.resolve(model_name, version))  # names the versions that exist
        if weights is not None:
            bad = {v: w for v, w in weights.items() if not w >= 0}
            if bad or not sum(weights.values()) > 0:
                raise ValueError(
                    f"traffic weights {weights} must be non-negative with a positive sum"
                )
        if weights is None and default_version is None:
            self._client.hdel(keys.TRAFFIC, model_name)
            record: dict[str, Any] = {}
        else:
            record = {"weights": weights or {}, "default_version": default_version}
            self._client.hset(keys.TRAFFIC, model_name, json.dumps(record))
        producer.forget()
        return {"model": model_name, "versions": sorted(versions), **record}

    async def set_load_balancing(
        self,
        model_name: str,
        strategy: LoadBalancingStrategy | str | None,
        *,
        weights: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """The strategy of one model's requests (None: the config's default), with
        instance weights (hostname -> weight) for ``WEIGHTED_ROUND_ROBIN``."""
        self._key(model_name, None)  # an unknown model raises here
        from tasks.producer import shared_producer

        if strategy is None:
            await asyncio.to_thread(self._client.hdel, keys.BALANCING, model_name)
            result: dict[str, Any] = {"model": model_name, "strategy": None}
        else:
            chosen = LoadBalancingStrategy(strategy)
            if weights and any(not w > 0 for w in weights.values()):
                raise ValueError(f"instance weights {weights} must be positive")
            record = {"strategy": chosen.value, "weights": dict(weights or {})}
            await asyncio.to_thread(
                self._client.hset, keys.BALANCING, model_name, json.dumps(record)
            )
            result = {"model": model_name, **record}
        shared_producer().forget()  # other processes see it within their caches' second
        return result

    # -- reading ----------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        status = self.store.status() or {}
        return {
            "scaler": {
                k: status.get(k) for k in ("time", "leader", "tick_ms", "registered_versions")
            },
            "desired_instances": status.get("desired", {}),
            "active_instances": status.get("instances", {}),
            "queued": status.get("queued", {}),
            "workers": status.get("workers", {}),
            # Every registered version's queue, those at zero included.
            "queues": self.store.queue_depths(),
            "decisions": self.store.decisions(50),
            "cold_starts": self._cold_starts(),
        }

    def _cold_starts(self, window_s: int = 3600) -> dict[str, dict[str, Any]]:
        """Per version over the last hour: the requests that arrived at zero instances and
        their average wait, publish to answer (from the compact per-minute counters: a
        dashboard polls this)."""
        history = MetricsHistory(self._client, metrics_settings())
        _, inputs = history.forecast_inputs(window_s, current=True)
        out = {}
        for label, fields in sorted(inputs.items()):
            n = sum(fields["cold_req"])
            if n:
                average = round(sum(fields["cold_req_ms"]) / n, 3)
                out[label] = {"requests": int(n), "average_ms": average}
        return out

    def get_metrics(self, window_seconds: int = 3600, model: str | None = None) -> dict[str, Any]:
        """SEED.md's key metrics over the last ``window_seconds``: the window's values from
        the history, plus the instances, queues, popularity and alerts of now."""
        metrics = MetricsHistory(self._client, metrics_settings()).window(
            window_seconds, model=model
        )
        instances = instance_states(self.store.status() or {})
        active = sum(c["active"] for c in instances.values())
        loading = sum(c["loading"] for c in instances.values())
        popularity = {
            keys.text(k): round(float(v), 3)
            for k, v in self._client.hgetall(keys.POPULARITY).items()
        }
        return metrics | {
            "active_instances": active,
            "loading_instances": loading,
            "total_instances": active + loading,
            "instances": instances,
            "queue_depths": self.store.queue_depths(),
            "popularity": dict(sorted(popularity.items())),
            "alerts": active_alerts(self._client),
        }

    def get_metrics_series(
        self,
        window_seconds: int = 300,
        step_seconds: int = 5,
        *,
        model: str | None = None,
        version: str | None = None,
        metric: str | None = None,
    ) -> dict[str, Any]:
        """Per-step points of the history over the last ``window_seconds`` (SEED.md's
        historical analysis): per model version, requests, latency percentiles, instances,
        queued and running requests, cold starts; for the fleet, instances and tick time.
        ``model``/``version`` narrow it to one model or version, ``metric`` to one metric."""
        return MetricsHistory(self._client, metrics_settings()).series(
            window_seconds, step_seconds, model=model, version=version, metric=metric
        )

    def get_workers(self) -> dict[str, Any]:
        """Each live worker as its last report tells: host, device, loaded models and their
        bytes, requests held, CPU, RSS, GPU memory and health."""
        workers = {}
        for name, report in sorted(self.store.live_reports().items()):
            resources = report.get("resources", {})
            workers[name] = {
                "host": report.get("host"),
                "pid": report.get("pid"),
                "device": report.get("device"),
                "started_at": report.get("started_at"),
                "report_time": report.get("time"),
                "queues": report.get("queues", []),
                "models": [
                    {k: m.get(k) for k in ("name", "version", "bytes", "load_time_s", "idle_s")}
                    for m in report.get("models", [])
                ],
                "loading": [f"{m['name']}/{m['version']}" for m in report.get("loading", [])],
                "loaded_bytes": report.get("loaded_bytes"),
                "held": report.get("held"),
                "served": report.get("served"),
                "failed": report.get("failed"),
                "cpu_percent": resources.get("cpu_percent"),
                "rss_bytes": resources.get("rss_bytes"),
                "gpu": report.get("device_memory", {}),
                "health": report.get("health", "ok"),
                "instances_health": report.get("instances_health", {}),
            }
        return {"workers": workers}

    def get_health_status(self) -> dict[str, Any]:
        try:
            self._client.ping()
            redis_ok = True
        except Exception:
            redis_ok = False
        status = self.store.status() if redis_ok else None
        scaler_age = time.time() - status["time"] if status else None
        healthy_scaler = scaler_age is not None and scaler_age < 5 * self.config.tick_interval_s + 5
        workers = status.get("workers", {}) if status else {}
        reports = self.store.live_reports() if redis_ok else {}
        instances: dict[str, dict[str, dict[str, Any]]] = {}
        for name, report in reports.items():
            checks = report.get("instances_health", {})
            for model in report.get("models", []):
                text = keys.model_key_text(model["name"], model["version"])
                check = checks.get(text, {"state": "healthy", "failures": 0, "reason": ""})
                instances.setdefault(text, {})[name] = {
                    "state": check["state"],
                    "reason": check["reason"] or "probe passed",
                    "failures": check["failures"],
                    "routable": keys.queue_name(model["name"], model["version"])
                    in report.get("queues", [])
                    and check["state"] != "unhealthy",
                }
            for text, check in checks.items():  # sick ones the worker already dropped
                if check["state"] == "unhealthy" and name not in instances.get(text, {}):
                    instances.setdefault(text, {})[name] = {**check, "routable": False}
        return {
            "healthy": redis_ok and healthy_scaler,
            "redis": "ok" if redis_ok else "unreachable",
            "scaler": "ok" if healthy_scaler else "no recent tick",
            "scaler_last_tick_age_s": None if scaler_age is None else round(scaler_age, 3),
            "workers": {
                n: "starting" if w["starting"] else reports.get(n, {}).get("health", "no report")
                for n, w in workers.items()
            }
            | {n: r.get("health", "ok") for n, r in reports.items() if n not in workers},
            "instances": dict(sorted(instances.items())),
        }

    def routable_instances(self, model_name: str, version: str | None = None) -> list[str]:
        """The workers the load-balancing strategies route this version to (healthy, serving,
        holding the model), as the scaler last published them."""
        key = self._key(model_name, version)
        raw = self._client.hget(keys.INSTANCES, keys.model_key_text(*key))
        return list(json.loads(raw)) if raw else []

    def add_alert_callback(self, callback: AlertCallback) -> None:
        """Register ``callback(alert_key, message)``.

        The scaler leader (this process's or a beat process's) evaluates the alert rules
        (``alert_thresholds``) every tick and publishes each event; this process calls its
        callbacks for every one: when an alert fires, when it repeats after
        ``alert_cooldown_seconds``, and when it resolves (a message starting ``resolved``).
        """
        self._alerts.add(callback)

    def get_alerts(self) -> dict[str, Any]:
        from monitoring.alerts import history

        return {"active": active_alerts(self._client), "history": history(self._client, 50)}


class ZeroScaler:
    """Scale to zero and back with SEED.md's ``ZeroScalingConfig``."""

    def __init__(self, config: ZeroScalingConfig | None = None) -> None:
        self.autoscaler = Autoscaler(AutoscalerConfig(zero_scaling=config or ZeroScalingConfig()))

    @contextlib.asynccontextmanager
    async def scaler_context(self) -> AsyncIterator[ZeroScaler]:
        """The scaler runs inside; leaving drains and stops the workers it started."""
        await self.autoscaler.start()
        try:
            yield self
        finally:
            await self.autoscaler.stop(stop_workers=True)

    async def predict(self, model_name: str, inputs: Any, *, version: str | None = None) -> Any:
        return await self.autoscaler.predict(model_name, inputs, version=version)


class DynamicModelLoader:
    """On-demand loading and multi-version serving with SEED.md's ``ModelLoaderConfig``."""

    def __init__(self, config: ModelLoaderConfig | None = None) -> None:
        self.autoscaler = Autoscaler(AutoscalerConfig(model_loading=config or ModelLoaderConfig()))

    async def start(self) -> None:
        await self.autoscaler.start()

    async def stop(self) -> None:
        await self.autoscaler.stop()

    async def load_model(self, model_name: str, version: str | None = None) -> None:
        await self.autoscaler.load_model(model_name, version)

    async def unload_model(self, model_name: str, version: str | None = None) -> None:
        await self.autoscaler.unload_model(model_name, version)

    async def predict(self, model_name: str, inputs: Any, *, version: str | None = None) -> Any:
        return await self.autoscaler.predict(model_name, inputs, version=version)

    def list_loaded_models(self) -> list[dict[str, Any]]:
        """Every loaded model version with the workers that hold it."""
        status = self.autoscaler.store.status() or {}
        holders: dict[str, list[str]] = {}
        for worker, info in status.get("workers", {}).items():
            for text in info.get("loaded", []):
                holders.setdefault(text, []).append(worker)
        return [
            {"model": text.split("/")[0], "version": text.split("/")[1], "workers": sorted(w)}
            for text, w in sorted(holders.items())
        ]

    def get_stats(self) -> dict[str, Any]:
        return self.autoscaler.get_stats()

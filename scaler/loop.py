"""The scaler's run loop: a tick (lead, read, decide, apply, record), then a wait for the next
tick or a producer's poke. Beat's scheduler and ``Autoscaler`` both turn ``run_once``;
``tick(now)`` is what tests call directly."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from common import keys
from common.contracts import ModelKey
from common.settings import metrics_settings
from loader.registry import RegistryPublisher
from loader.repository import ModelRepository
from monitoring.alerts import AlertManager
from monitoring.metrics import FLEET, MODEL, MetricsHistory, MetricsRecorder
from monitoring.metrics import field as metric_field
from scaler.backends import Backend, LocalBackend, StaticBackend
from scaler.config import AutoscalerConfig
from scaler.forecast import LEVEL_S, forecast_rates
from scaler.node import NodeBackend
from scaler.policy import (
    NEW_WORKER_PREFIX,
    Decision,
    Forecast,
    Plan,
    PolicyState,
    Snapshot,
    decide,
)
from scaler.store import FleetView, ScalerStore, queue_to_key
from tasks import broker

logger = logging.getLogger(__name__)

# A remote-control command a worker has not acted on is sent again after this long.
RESEND_S = 3.0
_OPPOSITE = {"add": "cancel", "cancel": "add", "preload": "unload", "unload": "preload"}
# Forecasts are made from the minute history, again once a minute.
FORECAST_REFRESH_S = 60.0


class Waiter:
    """Sleeps until the next tick, a poke or a stop, whichever comes first."""

    def __init__(self, client: Any) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._subscribed = False

    def wait(self, seconds: float, stop: threading.Event | None = None) -> None:
        deadline = time.monotonic() + seconds
        # A stop is looked at every quarter second; beat has none (it exits by signal).
        slice_s = 0.25 if stop is not None else seconds
        try:
            if not self._subscribed:
                self._pubsub.subscribe(keys.SCALER_POKE)
                self._subscribed = True
            while (left := deadline - time.monotonic()) > 0:
                if stop is not None and stop.is_set():
                    return
                if self._pubsub.get_message(timeout=min(left, slice_s)) is not None:
                    return
        except Exception as exc:  # Redis away: sleep the tick out, try again next time
            logger.warning("scaler: waiting for pokes failed: %s", exc)
            self._subscribed = False
            left = max(0.0, deadline - time.monotonic())
            if stop is not None:
                stop.wait(left)
            else:
                time.sleep(left)

    def close(self) -> None:
        self._pubsub.close()


@dataclass
class TickResult:
    leader: bool
    plan: Plan | None = None
    tick_ms: float = 0.0
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


class ScalerLoop:
    def __init__(
        self,
        config: AutoscalerConfig,
        *,
        client: redis.Redis,
        app: Any,
        backend: Backend | None = None,
        repository: ModelRepository | None = None,
    ) -> None:
        self.config = config
        self.app = app
        self.store = ScalerStore(client)
        self.backend: Backend = backend or self._backend(config.backend)
        self.registry = RegistryPublisher(repository) if repository is not None else None
        self.state = PolicyState()
        self._sent: dict[tuple[str, str, str], float] = {}
        self._forecasts: dict[ModelKey, Forecast] = {}
        self._forecast_at = -math.inf
        self._forecasting: threading.Thread | None = None
        self.last: TickResult | None = None
        settings = metrics_settings()
        # The forecasts read the learning window and the hour before it (their level).
        learning_s = config.zero_scaling.learning_window_hours * 3600 + LEVEL_S
        if config.enable_metrics and settings.minute_retention_s < learning_s:
            logger.warning(
                "METRICS_MINUTE_RETENTION_S=%d keeps less than learning_window_hours=%g of "
                "history and an hour; raise it to at least %d",
                settings.minute_retention_s,
                config.zero_scaling.learning_window_hours,
                learning_s,
            )
        self.metrics = MetricsRecorder(client, settings)
        self.history = MetricsHistory(client, settings)
        self.alerts = AlertManager(
            client,
            config.alert_thresholds,
            window_s=config.alert_window_seconds,
            cooldown_s=config.alert_cooldown_seconds,
            webhook_url=config.alert_webhook_url,
            webhook_timeout_s=config.alert_webhook_timeout_s,
            for_s=config.alert_for_seconds,
            min_samples=config.alert_min_samples,
        )

    def _backend(self, kind: str) -> Backend:
        if kind == "local":
            return LocalBackend(self.store)
        if kind == "nodes":
            return NodeBackend(self.store)
        return StaticBackend()

    # -- the run loop -----------------------------------------------------------------------
    def run_once(
        self,
        waiter: Waiter,
        *,
        stop: threading.Event | None = None,
        between: Callable[[], float | None] | None = None,
    ) -> None:
        """A tick, then the wait for the next one (cut short by a poke or ``stop``);
        ``between`` runs in between and may shorten the wait (beat's periodic tasks)."""
        started = time.monotonic()
        try:
            self.tick()
        except Exception:
            # Redis down or a bad answer: log it, keep running, try on the next tick.
            logger.exception("scaler tick failed")
        period = self.config.tick_interval_s
        limit = between() if between is not None else None
        waiter.wait(max(0.0, min(period - (time.monotonic() - started), limit or period)), stop)

    def run(self, stop: threading.Event) -> None:
        """Ticks until ``stop`` is set."""
        waiter = Waiter(self.store.client)
        try:
            while not stop.is_set():
                self.run_once(waiter, stop=stop)
        finally:
            with contextlib.suppress(Exception):
                waiter.close()

    # -- the tick ---------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> TickResult:
        now = time.time() if now is None else now
        started = time.perf_counter()
        if not self.store.lead(self.config.leader_ttl_s):
            self.last = TickResult(leader=False)
            return self.last
        self._publish_registry()
        view = self.store.read(now)
        self._forget_exited(view)
        gone = self._failover(view)
        snapshot = dataclasses.replace(self._as_commanded(view, now), forecasts=self._forecast(now))
        plan, self.state = decide(snapshot, self.config, self.state)
        plan.decisions[:0] = gone
        result = TickResult(leader=True, plan=plan)
        self._apply(plan, view, now, result)
        if plan.popularity is not None:
            self.store.add_popularity(*plan.popularity)
        result.tick_ms = (time.perf_counter() - started) * 1000
        # What producers need not poke the scaler for. A version this tick takes to zero is
        # out at once (its workers are told to stop now: a request arriving meanwhile must
        # wake the scaler, not wait for the next tick); one the policy does not manage
        # counts as served while some worker consumes it.
        served = {k for k, n in plan.desired.items() if n > 0} | {
            k for w in view.snapshot.workers.values() for k in w.serving if k not in plan.desired
        }
        self.store.record(
            plan.decisions,
            self._status(view, plan, result, now),
            served,
            members=self._members(view),
            default_strategy=self.config.model_loading.load_balancing_strategy.value,
        )
        if self.config.enable_metrics and self.metrics.enabled:
            try:
                self._record_metrics(view, plan, now, result.tick_ms)
            except Exception as exc:  # metrics never stop scaling
                logger.warning("scaler metrics or alerts failed: %s", exc)
        for d in plan.decisions:
            logger.info(
                "model %s/%s: %d -> %d instances (%s)",
                d.model.name,
                d.model.version,
                d.from_instances,
                d.to_instances,
                d.reason,
            )
        self.last = result
        return result

    def _forecast(self, now: float) -> dict[ModelKey, Forecast]:
        """Each version's predicted request rate over the horizon: the latest made. They
        are made once a minute in a thread of their own (reading a day of history takes a
        few hundred ms), so that no tick waits for them."""
        zero = self.config.zero_scaling
        if not (zero.enable_predictive_scaling and self.config.enable_metrics):
            return {}
        busy = self._forecasting is not None and self._forecasting.is_alive()
        if now - self._forecast_at >= FORECAST_REFRESH_S and not busy:
            self._forecast_at = now
            self._forecasting = threading.Thread(
                target=self._make_forecasts, args=(now,), name="forecasts", daemon=True
            )
            self._forecasting.start()
        return self._forecasts

    def _make_forecasts(self, now: float) -> None:
        zero = self.config.zero_scaling
        kept = self.history.settings.minute_retention_s
        window = int(min(zero.learning_window_hours * 3600 + LEVEL_S, kept))
        horizon = zero.prediction_horizon_minutes * 60
        try:
            start, inputs = self.history.forecast_inputs(window, now=now)
        except Exception as exc:  # forecasts never stop scaling: keep the last ones
            logger.warning("scaler forecasts failed: %s", exc)
            return
        forecasts = {}
        for label, fields in inputs.items():
            history = fields["req"]
            rates = forecast_rates(history, 60, horizon)
            if not rates.any():
                continue
            requests, cold = sum(history), sum(fields["cold_req"])
            forecasts[ModelKey.parse(label)] = Forecast(
                start=start + len(history) * 60,
                step_s=60,
                rates=tuple(float(r) for r in rates),
                # Lead time: the cold start callers saw (publish to answer), on average.
                cold_start_s=sum(fields["cold_req_ms"]) / cold / 1000 if cold else 0.0,
                service_s=sum(fields["lat_sum"]) / requests / 1000 if requests else 0.0,
            )
        self._forecasts = forecasts

    def _publish_registry(self) -> None:
        if self.registry is not None and self.registry.due():
            exists = bool(self.store.client.exists(keys.REGISTRY))
            self.registry.publish_if_changed(self.store.client, exists=exists)

    # -- acting -----------------------------------------------------------------------------
    def _due(self, worker: str, command: str, arg: str, now: float) -> bool:
        key = (worker, command, arg)
        if now - self._sent.get(key, -1e18) < RESEND_S:
            return False
        if len(self._sent) > 10_000:  # forget old sends of workers and models long gone
            self._sent = {k: t for k, t in self._sent.items() if now - t < RESEND_S}
        self._sent[key] = now
        # A command undoes its opposite: an add after a cancel of the same queue (a standby
        # taking back a version it served a moment ago) goes out now, not 3 s later.
        opposite = _OPPOSITE.get(command)
        if opposite is not None:
            self._sent.pop((worker, opposite, arg), None)
        return True

    def _as_commanded(self, view: FleetView, now: float) -> Snapshot:
        """The snapshot with the queue commands of the last few seconds applied: reports lag
        behind them, and a plan made from a stale report would pick other workers to keep
        on the next tick (and cancel every instance of a model while it scales down)."""
        added: dict[str, set[ModelKey]] = {}
        cancelled: dict[str, set[ModelKey]] = {}
        for (worker, command, arg), sent in self._sent.items():
            if command in ("add", "cancel") and now - sent < RESEND_S:
                key = queue_to_key(arg)
                if key is not None:
                    (added if command == "add" else cancelled).setdefault(worker, set()).add(key)
        if not added and not cancelled:
            return view.snapshot
        workers = dict(view.snapshot.workers)
        for name, info in workers.items():
            serving = (info.serving | added.get(name, set())) - cancelled.get(name, set())
            if serving != info.serving:
                workers[name] = dataclasses.replace(info, serving=frozenset(serving))
        return dataclasses.replace(view.snapshot, workers=workers)

    def _control(self, command: str, worker: str, **arguments: Any) -> None:
        self.app.control.broadcast(command, arguments=arguments, destination=[worker], reply=False)

    def _apply(self, plan: Plan, view: FleetView, now: float, result: TickResult) -> None:
        for name, wanted_keys in plan.assignments.items():
            if name.startswith(NEW_WORKER_PREFIX):
                continue
            report = view.reports.get(name)
            if report is None or not report.get("ready", True):
                continue  # still starting: it was launched with its queues, hears no command
            wanted = {keys.queue_name(*k) for k in wanted_keys}
            consumed = {q for q in report.get("queues", []) if q.startswith(keys.QUEUE_PREFIX)}
            for queue in sorted(wanted - consumed):
                if self._due(name, "add", queue, now):
                    self.app.control.add_consumer(
                        queue, routing_key=queue, destination=[name], reply=False
                    )
            # Load what the worker serves but does not hold yet: a first request then finds
            # the model warm, and a version loaded by hand is loaded now, not on first use.
            # A failed load is asked again too: the worker retries it once its failure
            # cooldown is over (a model whose warm-up failed while it was sick came back
            # only with the next request).
            held = {
                (m["name"], m["version"])
                for field in ("models", "loading")
                for m in report.get(field, [])
            }
            kept = plan.preload.get(name, frozenset())
            for key in sorted(wanted_keys | kept):
                if (key.name, key.version) not in held and self._due(
                    name, "preload", str(key), now
                ):
                    self._control("preload_model", name, model=key.name, version=key.version)
            for queue in sorted(consumed - wanted):
                if self._due(name, "cancel", queue, now):
                    self.app.control.cancel_consumer(queue, destination=[name], reply=False)
            if wanted - consumed or report.get("loading"):
                # Taking on a version: an unload's memory release (a full collection) would
                # stall that cold start. What it no longer needs goes once it serves.
                continue
            busy = set(report.get("busy", {}))
            for model in report.get("models", []):
                key = ModelKey(model["name"], model["version"])
                text = keys.model_key_text(*key)
                if key in wanted_keys | kept or keys.queue_name(*key) in consumed or text in busy:
                    continue
                if self._due(name, "unload", text, now):
                    self._control("unload_model", name, model=key.name, version=key.version)
        for name in plan.recycle + plan.reap:
            record = view.fleet.get(name)
            if record is not None:
                if name in plan.reap:
                    logger.warning("worker %s never reported; stopping it", name)
                self.backend.stop(record)
        if self.backend.can_start:
            for name, wanted_keys in plan.assignments.items():
                if name.startswith(NEW_WORKER_PREFIX):
                    record = self.backend.start(sorted(keys.queue_name(*k) for k in wanted_keys))
                    if record is not None:
                        result.started.append(record.hostname)
            for name in plan.stop_workers:
                record = view.fleet.get(name)
                if record is not None and self._due(name, "stop", "", now):
                    record.stopping = True
                    self.store.fleet_add(record)
                    self.backend.stop(record)
                    result.stopped.append(name)

    def _members(self, view: FleetView) -> dict[str, list[str]]:
        """The healthy instances of each version: reporting, consuming it, holding it."""
        members: dict[str, list[str]] = {}
        for name, worker in view.snapshot.workers.items():
            if name not in view.reports:
                continue
            for key in worker.serving & worker.loaded - worker.unhealthy:
                members.setdefault(keys.model_key_text(*key), []).append(name)
        return {k: sorted(v) for k, v in sorted(members.items())}

    def _failover(self, view: FleetView) -> list[Decision]:
        """A worker that stopped reporting: what it held and what waits in its instance
        queues go back to the shared queues now, not after its lease expires. Each, but a
        stop the scaler asked that held nothing, is a decision of the fleet (model ``*``)."""
        starting = {n for n, w in view.snapshot.workers.items() if w.starting}
        gone = []
        for hostname in sorted(view.consumers - set(view.reports) - starting):
            moved = broker.release(functools.partial(broker.run, self.store.client), hostname)
            self._forget_routing(hostname)
            if moved:
                logger.warning(
                    "worker %s is gone: %d of its requests went back to their shared queues",
                    hostname,
                    moved,
                )
            else:
                logger.info("worker %s is gone; it held no requests", hostname)
            record = view.fleet.get(hostname)
            if moved or record is None or not record.stopping:  # not a stop the scaler asked
                reason = f"worker {hostname} gone: {moved} of its requests back to their queues"
                gone.append(Decision(ModelKey("*", "*"), 0, 0, reason))
        return gone

    def _forget_routing(self, hostname: str) -> None:
        pipe = self.store.client.pipeline(transaction=False)
        for key in self.store.registered():
            pipe.hdel(keys.routing_state_key(*key), f"inflight:{hostname}", f"latency:{hostname}")
        pipe.execute()

    def _forget_exited(self, view: FleetView) -> None:
        """Forget fleet records of exited processes; mark those seen reporting; adopt a
        worker this backend started whose record is gone (a Redis that restarted without
        persistence): else nothing would ever stop it."""
        for name, record in list(view.fleet.items()):
            if name in view.reports and not record.seen:
                record.seen = True
                self.store.fleet_add(record)
            if not self.backend.alive(record):
                self.store.fleet_remove(name)
                view.fleet.pop(name)
                view.snapshot.workers.pop(name, None)
                view.snapshot.silent.pop(name, None)
                # Its last report outlives it by a few seconds: gone now, so that its
                # requests are failed over in this tick, not when the heartbeat expires.
                view.reports.pop(name, None)
                broker.run(
                    self.store.client,
                    [("DEL", keys.worker_report_key(name)), ("ZREM", keys.WORKERS, name)],
                )
                logger.info("worker %s has exited", name)
        for name, report in view.reports.items():
            if name in view.fleet:
                continue
            adopted = self.backend.adopt(name, report)
            if adopted is not None:
                logger.warning("worker %s was started here and had no record: adopted", name)
                view.fleet[name] = adopted
                worker = view.snapshot.workers.get(name)
                if worker is not None:
                    view.snapshot.workers[name] = dataclasses.replace(worker, managed=True)

    def _record_metrics(self, view: FleetView, plan: Plan, now: float, tick_ms: float) -> None:
        snapshot = view.snapshot
        fleet = {"active": 0.0, "loading": 0.0, "total": 0.0, "tick_ms": tick_ms}
        per_model: dict[str, dict[str, float]] = {}
        for worker in snapshot.workers.values():
            for key in worker.serving:
                state = "active" if key in worker.loaded else "loading"
                fleet[state] += 1
                fleet["total"] += 1
                per_model.setdefault(str(key), {"instances": 0.0})["instances"] += 1
        for key, depth in snapshot.queued.items():
            per_model.setdefault(str(key), {"instances": 0.0})["queued"] = float(depth)
        for key, held in snapshot.held.items():  # delivered to a worker: running or batched
            per_model.setdefault(str(key), {"instances": 0.0})["held"] = float(held)
        events: Counter[str] = Counter()
        for d in plan.decisions:
            if d.model.name == "*":
                continue
            if d.to_instances > d.from_instances:
                events["scale_up"] += 1
                if d.from_instances == 0:
                    events["cold_starts"] += 1
            elif d.to_instances < d.from_instances:
                events["scale_down"] += 1
        counters = {metric_field(FLEET, "-", name): float(n) for name, n in events.items()}
        for key in plan.cold_starts:
            counters[metric_field(MODEL, str(key), "cold_starts")] = 1.0
        self.metrics.count(counters, now)
        # The model gauges are normalised by the fleet's sample count (f|-|n).
        self.metrics.gauge(FLEET, "-", fleet, now)
        self.metrics.sample(
            {
                metric_field(MODEL, model, name): value
                for model, values in per_model.items()
                for name, value in values.items()
            },
            now,
        )
        self.metrics.flush()
        window = self.config.alert_window_seconds
        metrics = self.history.window(window, now=now)
        queued = {str(k): n for k, n in snapshot.queued.items()}
        self.alerts.evaluate(metrics, queued, now)

    def _status(
        self, view: FleetView, plan: Plan, result: TickResult, now: float
    ) -> dict[str, Any]:
        snapshot = view.snapshot
        return {
            "time": now,
            "leader": self.store.id,
            "tick_ms": round(result.tick_ms, 3),
            "desired": {keys.model_key_text(*k): n for k, n in plan.desired.items()},
            "instances": {
                keys.model_key_text(*k): snapshot.current(k)
                for k in set(plan.desired)
                | {k for w in snapshot.workers.values() for k in w.serving}
            },
            "queued": {keys.model_key_text(*k): n for k, n in snapshot.queued.items()},
            "workers": {
                name: {
                    "serving": sorted(keys.model_key_text(*k) for k in w.serving),
                    "loaded": sorted(keys.model_key_text(*k) for k in w.loaded),
                    "managed": w.managed,
                    "starting": w.starting,
                }
                for name, w in snapshot.workers.items()
            },
            "registered_versions": len(snapshot.models),
            "started": result.started,
            "stopped": result.stopped,
        }

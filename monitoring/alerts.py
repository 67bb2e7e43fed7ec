"""Alert rules over the metrics history, evaluated by the scaler leader every tick.

An alert is one rule for one subject (the fleet, or a model version). It *fires* when the
value over the window has stayed above its threshold for ``for_s`` (Prometheus's ``for:``:
a worker's start-up CPU or one slow cold start is not an incident), the rules computed
from requests judging a version only over ``min_samples`` requests or more; it fires again
(*repeat*) only after ``alert_cooldown_seconds`` while it stays above, and *resolves* when
it goes below 90% of the threshold (or has no value any more). Every event is kept in
Redis (the active alerts and a capped history), published on a channel (the
``Autoscaler.add_alert_callback`` callbacks of every process listen to it) and, when
configured, POSTed as JSON to a webhook with a timeout, from a background thread.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from common import keys

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 1000
# A firing alert resolves only below this fraction of its threshold: a value hovering at
# the threshold does not fire and resolve every tick.
RESOLVE_BELOW = 0.9


@dataclass(frozen=True)
class Rule:
    name: str
    unit: str
    describe: str
    per_model: bool


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("memory_usage_percent", "%", "host memory in use on a worker's machine", False),
        Rule("cpu_usage_percent", "%", "average worker CPU", False),
        Rule("error_rate_percent", "%", "error rate", True),
        Rule("average_response_time_ms", " ms", "average response time", True),
        Rule("queue_depth", " requests", "queue depth", True),
        Rule("cold_start_time_ms", " ms", "average cold start (publish to answer)", True),
    )
}


def check_thresholds(thresholds: dict[str, float]) -> None:
    unknown = sorted(set(thresholds) - set(RULES))
    if unknown:
        raise ValueError(f"unknown alert thresholds {unknown}; known: {sorted(RULES)}")


def readings(
    metrics: dict[str, Any], queued: dict[str, int], min_samples: int = 1
) -> list[tuple[str, str, float]]:
    """``(rule, subject, value)`` for every value a rule can judge now; the rules computed
    from requests judge a version only over ``min_samples`` requests or more."""
    found: list[tuple[str, str, float]] = []
    for name in ("memory_usage_percent", "cpu_usage_percent"):
        if metrics.get(name) is not None:
            found.append((name, "fleet", float(metrics[name])))
    for model, m in metrics.get("models", {}).items():
        if m.get("requests") and m["requests"] >= min_samples:
            found.append(("error_rate_percent", model, float(m["error_rate_percent"])))
            if m.get("average_response_time_ms") is not None:
                found.append(("average_response_time_ms", model, m["average_response_time_ms"]))
        if m.get("average_cold_start_ms") is not None:
            # Each is one caller's whole wait; a single slow one is the news.
            found.append(("cold_start_time_ms", model, float(m["average_cold_start_ms"])))
    for model, depth in queued.items():
        found.append(("queue_depth", model, float(depth)))
    return found


class AlertManager:
    def __init__(
        self,
        client: redis.Redis,
        thresholds: dict[str, float],
        *,
        window_s: int,
        cooldown_s: float,
        webhook_url: str | None = None,
        webhook_timeout_s: float = 5.0,
        post: Callable[[str, bytes, float], None] | None = None,
        for_s: float = 0.0,
        min_samples: int = 1,
    ) -> None:
        check_thresholds(thresholds)
        self.client = client
        self.thresholds = dict(thresholds)
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.for_s = for_s
        self.min_samples = min_samples
        # Breaches not firing yet: since when each has held (the leader's memory; a new
        # leader starts counting again).
        self._pending: dict[str, float] = {}
        self.webhook_url = webhook_url
        self.webhook_timeout_s = webhook_timeout_s
        self._post = post or _post_json
        self._active: dict[str, dict[str, Any]] | None = None

    def active(self) -> dict[str, dict[str, Any]]:
        if self._active is None:
            raw = self.client.hgetall(keys.ALERTS_ACTIVE)
            self._active = {keys.text(k): json.loads(v) for k, v in raw.items()}
        return self._active

    def evaluate(
        self, metrics: dict[str, Any], queued: dict[str, int], now: float
    ) -> list[dict[str, Any]]:
        """Compare the readings with the thresholds; returns the events raised."""
        active = self.active()
        events: list[dict[str, Any]] = []
        breaching: set[str] = set()
        pending: dict[str, float] = {}
        for rule_name, subject, value in readings(metrics, queued, self.min_samples):
            threshold = self.thresholds.get(rule_name)
            if threshold is None:
                continue
            key = rule_name if subject == "fleet" else f"{rule_name}:{subject}"
            if value <= threshold:
                if key in active and value > threshold * RESOLVE_BELOW:
                    breaching.add(key)  # in the hysteresis band: still firing, not repeated
                continue
            state = active.get(key)
            if state is None:
                since = pending[key] = self._pending.get(key, now)
                if now - since < self.for_s:
                    continue  # not held long enough yet
            breaching.add(key)
            if state is not None and now - state["last_sent"] < self.cooldown_s:
                state["value"] = value
                continue
            rule = RULES[rule_name]
            where = "" if subject == "fleet" else f" of {subject}"
            message = (
                f"{rule.describe}{where} is {value:.1f}{rule.unit}, above the threshold "
                f"{threshold:g}{rule.unit} over the last {self.window_s} s"
            )
            event = {
                "alert": key,
                "rule": rule_name,
                "subject": subject,
                "state": "firing" if state is None else "repeat",
                "value": value,
                "threshold": threshold,
                "message": message,
                "time": now,
            }
            active[key] = {
                "since": now if state is None else state["since"],
                "last_sent": now,
                "value": value,
                "message": message,
                "rule": rule_name,
                "subject": subject,
                "threshold": threshold,
            }
            events.append(event)
        for key in sorted(set(active) - breaching):
            state = active.pop(key)
            events.append(
                {
                    "alert": key,
                    "rule": state["rule"],
                    "subject": state["subject"],
                    "state": "resolved",
                    "value": None,
                    "threshold": state["threshold"],
                    "message": f"resolved after {now - state['since']:.0f} s: {state['message']}",
                    "time": now,
                }
            )
        self._pending = {k: t for k, t in pending.items() if k not in breaching}
        if events:
            self._record(events, active)
        return events

    def _record(self, events: list[dict[str, Any]], active: dict[str, dict[str, Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(keys.ALERTS_ACTIVE)
        if active:
            pipe.hset(keys.ALERTS_ACTIVE, mapping={k: json.dumps(v) for k, v in active.items()})
        for event in events:
            text = json.dumps(event)
            pipe.lpush(keys.ALERTS_HISTORY, text)
            pipe.publish(keys.ALERTS_CHANNEL, text)
        pipe.ltrim(keys.ALERTS_HISTORY, 0, HISTORY_LIMIT - 1)
        pipe.execute()
        for event in events:
            log = logger.info if event["state"] == "resolved" else logger.warning
            log("alert %s %s: %s", event["alert"], event["state"], event["message"])
        if self.webhook_url:
            url, body = self.webhook_url, json.dumps({"events": events}).encode()
            threading.Thread(
                target=self._send, args=(url, body), name="alert-webhook", daemon=True
            ).start()

    def _send(self, url: str, body: bytes) -> None:
        try:
            self._post(url, body, self.webhook_timeout_s)
        except Exception as exc:
            logger.warning("alert webhook %s failed: %s", url, exc)


def _post_json(url: str, body: bytes, timeout_s: float) -> None:
    request = urllib.request.Request(  # noqa: S310 - the operator configures the URL
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        response.read()


class AlertListener:
    """Calls ``callback(alert_key, message)`` for every alert event published by the leader.

    Resolutions arrive with a message that starts with ``resolved``. A failing callback is
    logged and does not stop the others; a lost connection is re-established.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.callbacks: list[Callable[[str, str], None]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, callback: Callable[[str, str], None]) -> None:
        self.callbacks.append(callback)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alert-listener", daemon=True)
            self._thread.start()
            self._ready.wait(5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.ALERTS_CHANNEL)
                self._ready.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.25)
                    if message is not None:
                        self.dispatch(json.loads(message["data"]))
            except redis.RedisError as exc:
                logger.warning("alert listener lost Redis (%s); reconnecting", exc)
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    def dispatch(self, event: dict[str, Any]) -> None:
        for callback in list(self.callbacks):
            try:
                callback(event["alert"], event["message"])
            except Exception:
                logger.exception("alert callback %r failed for %s", callback, event["alert"])


def history(client: redis.Redis, limit: int = 100) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(keys.ALERTS_HISTORY, 0, limit - 1)]


def active_alerts(client: redis.Redis) -> dict[str, dict[str, Any]]:
    return {keys.text(k): json.loads(v) for k, v in client.hgetall(keys.ALERTS_ACTIVE).items()}

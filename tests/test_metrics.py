"""Metrics history and alert rules against the test Redis: exact counts, percentiles
within one histogram bucket, roll-up into minutes, retention, and alert fire / cooldown /
resolve with a local webhook receiver."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import redis

from common import keys
from common.contracts import ModelKey
from common.settings import MetricsSettings
from loader.batching import Item, Outcome
from monitoring.alerts import AlertManager, active_alerts, history
from monitoring.metrics import (
    LATENCY_BOUNDS_MS,
    MetricsHistory,
    MetricsRecorder,
    latency_bucket,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0  # a fixed epoch second: buckets do not depend on the wall clock
SETTINGS = MetricsSettings(second_retention_s=3600, minute_retention_s=86400)


def outcome(
    model: ModelKey | None, latency_ms: float, *, error: bool = False, **kw: Any
) -> Outcome:
    item = Item(key=model, inputs=None, single=True, ticket=None, received=0.0, **kw)  # type: ignore[arg-type]
    return Outcome(
        item,
        error=RuntimeError("boom") if error else None,
        batch_size=kw.get("batch", 4),
        started=0.0,
        finished=latency_ms / 1000,
    )


def test_window_counts_are_exact_and_percentiles_within_a_bucket(client: redis.Redis) -> None:
    recorder = MetricsRecorder(client, SETTINGS)
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(mean=1.5, sigma=0.8, size=500)  # ms, ~1-60
    key = ModelKey("tiny_mlp", "v1")
    for i, ms in enumerate(latencies):
        # spread over 10 seconds; every 25th request fails
        recorder.observe([outcome(key, float(ms), error=i % 25 == 0)], now=NOW - 9 + i % 10)
    recorder.observe([outcome(ModelKey("linear", "v2"), 3.0)], now=NOW)
    recorder.observe([outcome(None, 1.0)], now=NOW)  # a request with a bad model name
    assert recorder.flush() == 10

    result = MetricsHistory(client, SETTINGS).window(10, now=NOW)
    m = result["models"]["tiny_mlp/v1"]
    assert m["requests"] == 500
    assert m["errors"] == 20
    assert m["error_rate_percent"] == 4.0
    assert m["requests_per_second"] == 50.0
    assert m["average_response_time_ms"] == pytest.approx(latencies.mean(), abs=1e-3)
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        true = float(np.quantile(latencies, q))
        got = m[f"{name}_response_time_ms"]
        index = latency_bucket(true)
        lower = LATENCY_BOUNDS_MS[index - 1] if index else 0.0
        # the reported value lies in the true percentile's bucket or a neighbour (ties)
        assert LATENCY_BOUNDS_MS[max(index - 2, 0)] <= got <= LATENCY_BOUNDS_MS[index + 1], (
            name,
            true,
            got,
            lower,
        )
    assert result["requests"] == 501
    assert result["rejected_requests"] == 1
    assert set(result["models"]) == {"tiny_mlp/v1", "linear/v2"}
    # one model only
    only = MetricsHistory(client, SETTINGS).window(10, now=NOW, model="linear/v2")
    assert only["requests"] == 1 and set(only["models"]) == {"linear/v2"}
    # a window that ends before the data saw none of it
    assert MetricsHistory(client, SETTINGS).window(5, now=NOW - 10)["requests"] == 0


def test_minute_buckets_roll_up_and_buckets_expire(client: redis.Redis) -> None:
    settings = MetricsSettings(second_retention_s=60, minute_retention_s=7200)
    recorder = MetricsRecorder(client, settings)
    key = ModelKey("linear", "v1")
    start = int(NOW) // 60 * 60
    for minute in range(5):
        for _ in range(minute + 1):
            recorder.observe([outcome(key, 2.0)], now=start - minute * 60 + 5)
    recorder.flush()
    history_ = MetricsHistory(client, settings)
    # Over 60 s the seconds are read; beyond, the minutes.
    assert history_.window(60, now=start + 30)["resolution_seconds"] == 1
    wide = history_.window(600, now=start + 30)
    assert wide["resolution_seconds"] == 60
    assert wide["requests"] == 15
    ttl_s = client.ttl(keys.metrics_second_key(start + 5))
    ttl_m = client.ttl(keys.metrics_minute_key(start // 60))
    assert 0 < ttl_s <= 60 and 3600 < ttl_m <= 7200
    with pytest.raises(ValueError, match="METRICS_MINUTE_RETENTION_S"):
        history_.window(7201, now=start)


def test_series_points_sum_to_the_window_and_fill_idle_steps(client: redis.Redis) -> None:
    recorder = MetricsRecorder(client, SETTINGS)
    tiny, linear = ModelKey("tiny_mlp", "v1"), ModelKey("linear", "v1")
    # 30 s: tiny_mlp gets i requests in second i of the first 20, linear 2 per second in
    # the last 10; the scaler ticks every second with tiny_mlp at 1 instance, 3 queued.
    start = NOW - 29
    for i in range(30):
        t = start + i
        if i < 20:
            recorder.observe([outcome(tiny, 5.0)] * i, now=t)
        else:
            recorder.observe([outcome(linear, 50.0)] * 2, now=t)
        recorder.gauge("f", "-", {"total": 1.0, "tick_ms": 4.0}, t)
        recorder.sample({"m|tiny_mlp/v1|instances": 1.0, "m|tiny_mlp/v1|queued": 3.0}, t)
        if i == 12:
            recorder.count(
                {"m|tiny_mlp/v1|cold_starts": 1, "m|tiny_mlp/v1|cold_req": 2.0,
                 "m|tiny_mlp/v1|cold_req_ms": 1600.0}, t,
            )  # fmt: skip
    recorder.flush()
    history = MetricsHistory(client, SETTINGS)

    series = history.series(30, 10, now=NOW)
    assert series["step_seconds"] == 10 and series["resolution_seconds"] == 1
    assert series["t"] == [start, start + 10, start + 20]
    tiny_points = series["models"]["tiny_mlp/v1"]
    assert tiny_points["requests"] == [sum(range(10)), sum(range(10, 20)), 0]
    assert tiny_points["requests_per_second"] == [4.5, 14.5, 0.0]
    assert tiny_points["average_instances"] == [1.0, 1.0, 1.0]
    assert tiny_points["average_queue_depth"] == [3.0, 3.0, 3.0]
    assert tiny_points["cold_starts"] == [0, 1, 0]
    assert tiny_points["cold_start_requests"] == [0, 2, 0]
    assert tiny_points["average_cold_start_ms"] == [None, 800.0, None]
    p50 = tiny_points["p50_response_time_ms"]
    assert p50[2] is None and abs(p50[0] - 5.0) <= 5.0 * 0.25
    linear_points = series["models"]["linear/v1"]
    # linear had no instance gauge: idle steps read 0 requests and 0 instances
    assert linear_points["requests"] == [0, 0, 20]
    assert linear_points["average_instances"] == [0.0, 0.0, 0.0]
    assert series["fleet"]["average_tick_ms"] == [4.0, 4.0, 4.0]
    # the points add up to the window's totals
    window = history.window(30, now=NOW)
    for label, points in series["models"].items():
        assert sum(points["requests"]) == window["models"][label]["requests"]

    one = history.series(30, 7, now=NOW, model="tiny_mlp", metric="requests")
    assert list(one["models"]) == ["tiny_mlp/v1"]
    assert list(one["models"]["tiny_mlp/v1"]) == ["requests"]
    assert sum(one["models"]["tiny_mlp/v1"]["requests"]) == sum(range(20))
    assert len(one["t"]) == 5 and one["t"][-1] + 7 - 1 == NOW  # the last point ends now
    assert history.series(30, 10, now=NOW, model="linear", version="v2")["models"] == {}
    with pytest.raises(ValueError, match="metric='nope' is not one of"):
        history.series(30, 10, now=NOW, metric="nope")
    with pytest.raises(ValueError, match="step_seconds=0"):
        history.series(30, 0, now=NOW)
    # beyond the second buckets' retention, or for steps of a minute or more, the steps are
    # whole minutes of the minute buckets
    for window, step in ((7200, 30), (600, 90)):
        coarse = history.series(window, step, now=NOW)
        assert coarse["step_seconds"] in (60, 120) and coarse["resolution_seconds"] == 60
        assert sum(coarse["models"]["tiny_mlp/v1"]["requests"]) == sum(range(20))
        assert all(t % 60 == 0 for t in coarse["t"])


def test_worker_gauges_and_no_gpu_state(client: redis.Redis) -> None:
    recorder = MetricsRecorder(client, SETTINGS)
    for t in range(4):
        recorder.gauge("w", "w1@h", {"cpu": 50.0 + t, "rss": 1e9, "mem": 40.0}, NOW - t)
        recorder.gauge(
            "w",
            "w2@h",
            {"cpu": 10.0, "rss": 2e9, "mem": 60.0, "gpu_util": 30, "gpu_mem": 5e9, "gpu_n": 1},
            NOW - t,
        )
    recorder.flush()
    result = MetricsHistory(client, SETTINGS).window(4, now=NOW)
    assert result["workers"]["w1@h"]["cpu_percent"] == 51.5
    assert result["workers"]["w1@h"]["gpu_utilization_percent"] is None
    assert result["cpu_usage_percent"] == pytest.approx((51.5 + 10.0) / 2, abs=0.1)
    assert result["memory_usage_percent"] == 60.0
    assert result["memory_rss_bytes"] == 3_000_000_000
    assert result["gpu_utilization_percent"] == 30.0
    only_cpu = MetricsRecorder(client, SETTINGS)
    client.flushall()
    only_cpu.gauge("w", "w1@h", {"cpu": 5.0, "rss": 1.0, "mem": 1.0}, NOW)
    only_cpu.flush()
    result = MetricsHistory(client, SETTINGS).window(1, now=NOW)
    assert result["gpu_utilization_percent"] is None
    assert result["gpu"] == "no GPU reported by any worker"


def test_failed_flush_keeps_data_for_the_next(client: redis.Redis, redis_server: Any) -> None:
    recorder = MetricsRecorder(redis.Redis.from_url(redis_server.url, socket_timeout=2), SETTINGS)
    recorder.observe([outcome(ModelKey("linear", "v1"), 1.0)], now=NOW)
    redis_server.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            recorder.flush()
        recorder.observe([outcome(ModelKey("linear", "v1"), 1.0)], now=NOW)
    finally:
        redis_server.start()
    wait_for(lambda: _flushed(recorder), timeout_s=20, what="a flush after the restart")
    fresh = redis.Redis.from_url(redis_server.url)
    assert MetricsHistory(fresh, SETTINGS).window(1, now=NOW)["requests"] == 2


def _flushed(recorder: MetricsRecorder) -> bool:
    try:
        recorder.flush()
        return True
    except redis.RedisError:
        return False


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


def test_requests_that_arrived_at_zero_instances_are_the_cold_start(client: redis.Redis) -> None:
    """The producer's mark makes a request a cold-start sample: its whole wait, publish to
    answer, per version; the ``cold_start_time_ms`` alert reads that average."""
    from monitoring.alerts import readings

    recorder = MetricsRecorder(client, SETTINGS)
    tiny = ModelKey("tiny_mlp", "v1")
    recorder.observe(
        [outcome(tiny, 4000.0, cold_start=True), outcome(tiny, 2000.0, cold_start=True)]
        + [outcome(tiny, 5.0)] * 8,
        now=NOW,
    )
    recorder.flush()
    window = MetricsHistory(client, SETTINGS).window(60, now=NOW)
    stats = window["models"]["tiny_mlp/v1"]
    assert stats["requests"] == 10 and stats["cold_start_requests"] == 2
    assert stats["average_cold_start_ms"] == pytest.approx(3000.0)
    assert ("cold_start_time_ms", "tiny_mlp/v1", 3000.0) in readings(window, {}, min_samples=10)
    # The forecasts' inputs: the same counters per whole minute, from their compact hash.
    start, inputs = MetricsHistory(client, SETTINGS).forecast_inputs(600, now=NOW + 60)
    assert start == (NOW // 60 - 9) * 60
    tiny_inputs = inputs["tiny_mlp/v1"]
    assert tiny_inputs["req"][-1] == 10 and sum(tiny_inputs["req"]) == 10
    assert tiny_inputs["cold_req"][-1] == 2 and tiny_inputs["cold_req_ms"][-1] == 6000.0


def test_alert_fires_once_repeats_after_cooldown_and_resolves(client: redis.Redis) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received = []
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.ALERTS_CHANNEL)
    manager = AlertManager(
        client,
        {"error_rate_percent": 5.0, "queue_depth": 100},
        window_s=60,
        cooldown_s=30,
        webhook_url=url,
        webhook_timeout_s=2,
    )
    bad = {"models": {"linear/v1": {"requests": 100, "error_rate_percent": 12.0}}}
    good = {"models": {"linear/v1": {"requests": 100, "error_rate_percent": 1.0}}}
    try:
        events = manager.evaluate(bad, {"linear/v1": 5}, NOW)
        assert [(e["alert"], e["state"]) for e in events] == [
            ("error_rate_percent:linear/v1", "firing")
        ]
        assert "error rate of linear/v1 is 12.0%" in events[0]["message"]
        assert manager.evaluate(bad, {}, NOW + 10) == []  # within the cooldown: quiet
        again = manager.evaluate(bad, {}, NOW + 31)
        assert [e["state"] for e in again] == ["repeat"]
        deep = manager.evaluate(bad, {"linear/v1": 500}, NOW + 32)
        assert [(e["alert"], e["state"]) for e in deep] == [("queue_depth:linear/v1", "firing")]
        assert set(active_alerts(client)) == {
            "error_rate_percent:linear/v1",
            "queue_depth:linear/v1",
        }
        resolved = manager.evaluate(good, {}, NOW + 40)
        assert sorted(e["state"] for e in resolved) == ["resolved", "resolved"]
        assert active_alerts(client) == {}
        states = [e["state"] for e in history(client)]
        assert states == ["resolved", "resolved", "firing", "repeat", "firing"]
        # a restarted scaler takes the active set from Redis: no second "firing"
        manager.evaluate(bad, {}, NOW + 50)
        restarted = AlertManager(client, {"error_rate_percent": 5.0}, window_s=60, cooldown_s=30)
        assert restarted.evaluate(bad, {}, NOW + 51) == []
        published: list[dict[str, Any]] = []

        def six_published() -> bool:
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                published.append(json.loads(message["data"]))
            return len(published) >= 6

        wait_for(six_published, timeout_s=10, what="alert events on the channel")
        assert [e["state"] for e in published][:6] == [
            "firing", "repeat", "firing", "resolved", "resolved", "firing"
        ]  # fmt: skip
        wait_for(lambda: len(_Receiver.received) >= 5, timeout_s=10, what="webhook posts")
        posted = [e["state"] for body in _Receiver.received for e in body["events"]]
        assert sorted(posted) == sorted(
            ["firing", "repeat", "firing", "resolved", "resolved", "firing"]
        )
    finally:
        server.shutdown()
        pubsub.close()


def test_webhook_failure_does_not_stop_evaluation(client: redis.Redis) -> None:
    calls: list[str] = []

    def post(url: str, body: bytes, timeout_s: float) -> None:
        calls.append(url)
        raise OSError("connection refused")

    manager = AlertManager(
        client,
        {"cpu_usage_percent": 80.0},
        window_s=60,
        cooldown_s=0,
        webhook_url="http://127.0.0.1:9/none",
        post=post,
    )
    events = manager.evaluate({"cpu_usage_percent": 95.0, "models": {}}, {}, NOW)
    assert events[0]["alert"] == "cpu_usage_percent"
    wait_for(lambda: calls, timeout_s=5, what="the webhook attempt")
    assert (
        manager.evaluate({"cpu_usage_percent": 95.0, "models": {}}, {}, NOW + 1)[0]["state"]
        == "repeat"
    )


def test_unknown_alert_threshold_is_refused() -> None:
    from common.errors import ConfigError
    from scaler.config import AutoscalerConfig

    with pytest.raises(ConfigError, match="unknown alert thresholds \\['gpu_fan'\\]"):
        AutoscalerConfig(alert_thresholds={"gpu_fan": 3.0})


def test_the_scaler_records_fleet_metrics_and_alerts_reach_callbacks(
    client: redis.Redis, test_repo: Any
) -> None:
    """The leader's tick writes fleet metrics and evaluates the rules; every process's
    ``add_alert_callback`` callbacks hear the events, a failing one stopping none."""
    import time

    from loader.registry import publish_registry
    from loader.repository import ModelRepository
    from scaler.autoscaler import Autoscaler
    from scaler.backends import StaticBackend
    from scaler.config import AutoscalerConfig
    from scaler.loop import ScalerLoop
    from workers import app

    publish_registry(client, ModelRepository(test_repo).registry())
    config = AutoscalerConfig(
        backend="static",
        alert_thresholds={"queue_depth": 5},
        alert_cooldown_seconds=60,
        alert_for_seconds=0,
    )
    loop = ScalerLoop(config, client=client, app=app, backend=StaticBackend())
    autoscaler = Autoscaler(config, run_scaler=False)
    heard: list[tuple[str, str]] = []

    def broken(key: str, message: str) -> None:
        raise RuntimeError("a broken callback")

    autoscaler.add_alert_callback(broken)
    autoscaler.add_alert_callback(lambda key, message: heard.append((key, message)))
    try:
        client.lpush(keys.queue_name("linear", "v1"), *[f"waiting-{i}" for i in range(8)])
        now = time.time()
        loop.tick(now)
        wait_for(lambda: heard, timeout_s=10, what="the alert callback")
        assert heard[0][0] == "queue_depth:linear/v1"
        assert "queue depth of linear/v1 is 8.0 requests" in heard[0][1]
        loop.tick(now + 1)  # still deep, within the cooldown: nothing new
        client.delete(keys.queue_name("linear", "v1"))
        loop.tick(now + 2)
        wait_for(lambda: len(heard) >= 2, timeout_s=10, what="the resolution")
        assert heard[1][0] == "queue_depth:linear/v1"
        assert heard[1][1].startswith("resolved")
        assert len(heard) == 2
        alerts = autoscaler.get_alerts()
        assert alerts["active"] == {}
        assert [e["state"] for e in alerts["history"]] == ["resolved", "firing"]
        # three ticks recorded: the queue seen twice at 8, no instance
        window = MetricsHistory(client, MetricsSettings()).window(5, now=now + 2)
        assert window["models"]["linear/v1"]["average_queue_depth"] == pytest.approx(
            16 / 3, abs=1e-3
        )
        assert window["average_total_instances"] == 0.0
        assert window["cold_starts"] == 1 and window["scale_up_events"] == 1
    finally:
        import asyncio

        asyncio.run(autoscaler.stop())


def test_an_alert_fires_only_once_its_condition_held_for_long_enough(
    client: redis.Redis,
) -> None:
    manager = AlertManager(
        client, {"cpu_usage_percent": 80.0}, window_s=60, cooldown_s=300, for_s=5
    )
    hot = {"cpu_usage_percent": 95.0, "models": {}}
    cool = {"cpu_usage_percent": 20.0, "models": {}}
    # A worker starting up: 3 s of high CPU, then normal; never fires.
    assert manager.evaluate(hot, {}, NOW) == []
    assert manager.evaluate(hot, {}, NOW + 3) == []
    assert manager.evaluate(cool, {}, NOW + 4) == []
    # Held: fires once 5 s have passed since it began.
    assert manager.evaluate(hot, {}, NOW + 10) == []
    assert manager.evaluate(hot, {}, NOW + 14) == []
    events = manager.evaluate(hot, {}, NOW + 15)
    assert [e["state"] for e in events] == ["firing"]
    assert [e["state"] for e in manager.evaluate(cool, {}, NOW + 16)] == ["resolved"]


def test_request_rules_need_enough_requests(client: redis.Redis) -> None:
    manager = AlertManager(
        client, {"average_response_time_ms": 1000.0}, window_s=60, cooldown_s=300,
        min_samples=10,
    )  # fmt: skip

    def slow(requests: int) -> dict[str, Any]:
        model = {"requests": requests, "error_rate_percent": 0.0, "average_response_time_ms": 4e3}
        return {"models": {"tiny_mlp/v1": model}}

    assert manager.evaluate(slow(1), {}, NOW) == []  # one slow cold-start request
    assert manager.evaluate(slow(9), {}, NOW + 1) == []
    events = manager.evaluate(slow(10), {}, NOW + 2)
    assert [(e["state"], e["alert"]) for e in events] == [
        ("firing", "average_response_time_ms:tiny_mlp/v1")
    ]


def test_a_value_hovering_at_the_threshold_does_not_flap(client: redis.Redis) -> None:
    manager = AlertManager(client, {"cpu_usage_percent": 80.0}, window_s=60, cooldown_s=300)
    states = []
    for t, cpu in enumerate((85.0, 79.0, 81.0, 75.0, 71.0)):
        states += [e["state"] for e in manager.evaluate({"cpu_usage_percent": cpu}, {}, NOW + t)]
    assert states == ["firing", "resolved"]  # 79 and 75 are within 10%; 71 is not

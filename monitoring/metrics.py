"""Metrics history in Redis: recording (workers, scaler) and window queries (API, alerts).

Writers accumulate in memory and flush about once a second from their own background
thread, one script call per second of data: the script adds every field to that second's
bucket, to its minute's bucket (the roll-up) and, for counters, to the running totals that
Prometheus reads. Buckets expire after their retention, so memory stays bounded; fields are
named ``<scope>|<subject>|<name>`` with subjects that were checked before recording (model
versions the worker resolved from its repository, worker hostnames), so made-up model
names never become fields. A flush that fails (Redis away for a moment) keeps its data for
the next try, up to a minute of it, and never reaches a prediction.

Latencies are recorded in a histogram of geometric buckets (each 25% wider than the one
before), so percentiles over any window are real to within one bucket.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from common import keys
from common.settings import MetricsSettings

logger = logging.getLogger(__name__)

# Upper bounds of the latency buckets in milliseconds: 0.1 ms to about 127 s; the last
# bucket (index len) holds everything slower.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 1.25**i for i in range(64))
# Upper bounds of the batch-size buckets (rows per forward pass).
BATCH_BOUNDS: tuple[int, ...] = tuple(2**i for i in range(11))
# Seconds of unflushed data kept while Redis is unreachable.
MAX_PENDING_S = 60

MODEL = "m"
WORKER = "w"
FLEET = "f"

# KEYS: second bucket, minute bucket, totals, forecast minute. ARGV: retentions, number of
# counters, number of fields, the fields (counters first), then the forecast's fields.
_WRITE = """
local n_counters = tonumber(ARGV[3])
local last = 4 + 2 * tonumber(ARGV[4])
for i = 5, last, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
  if (i - 5) / 2 < n_counters then
    redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if #ARGV > last then
  for i = last + 1, #ARGV, 2 do
    redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return 1
"""
# The counters the forecasts read, per version and minute: requests, their summed latency,
# and the requests that arrived at zero instances with their summed wait.
FORECAST_FIELDS = ("req", "lat_sum", "cold_req", "cold_req_ms")

# Sums the buckets' fields server-side, ARGV[1] buckets at a time (a point of a series; a
# window is one group): a window of 3,600 buckets is one reply. Fields are kept when they
# start with one of the prefixes ARGV[2..] (all when none is given).
_SUM = """
local size = tonumber(ARGV[1])
local prefixes = {}
for i = 2, #ARGV do prefixes[#prefixes + 1] = ARGV[i] end
local function wanted(f)
  if #prefixes == 0 then return true end
  for _, p in ipairs(prefixes) do
    if string.sub(f, 1, #p) == p then return true end
  end
  return false
end
local groups = {}
for first = 1, #KEYS, size do
  local acc = {}
  local order = {}
  for i = first, math.min(first + size - 1, #KEYS) do
    local flat = redis.call('HGETALL', KEYS[i])
    for j = 1, #flat, 2 do
      local f = flat[j]
      if wanted(f) then
        local v = tonumber(flat[j + 1])
        if acc[f] == nil then
          acc[f] = v
          order[#order + 1] = f
        else
          acc[f] = acc[f] + v
        end
      end
    end
  end
  local out = {}
  for _, f in ipairs(order) do
    out[#out + 1] = f
    out[#out + 1] = string.format('%.17g', acc[f])
  end
  groups[#groups + 1] = out
end
return groups
"""


def latency_bucket(ms: float) -> int:
    return bisect_left(LATENCY_BOUNDS_MS, ms)


def batch_bucket(rows: int) -> int:
    return bisect_left(BATCH_BOUNDS, rows)


def field(scope: str, subject: str, name: str) -> str:
    return f"{scope}|{subject}|{name}"


class MetricsRecorder:
    """Accumulates counters and gauges per second; ``flush()`` writes them to Redis."""

    def __init__(
        self,
        client: redis.Redis,
        settings: MetricsSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.enabled = settings.enabled
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[int, defaultdict[str, float]] = {}
        self._gauges: dict[int, defaultdict[str, float]] = {}
        self._write = client.register_script(_WRITE)
        self.dropped_seconds = 0

    def count(self, fields: dict[str, float], now: float | None = None) -> None:
        if not self.enabled or not fields:
            return
        second = int(self._clock() if now is None else now)
        with self._lock:
            bucket = self._counters.setdefault(second, defaultdict(float))
            for name, value in fields.items():
                bucket[name] += value

    def gauge(self, scope: str, subject: str, values: dict[str, float], now: float) -> None:
        """Add one sample of several gauges; ``<scope>|<subject>|n`` counts the samples."""
        fields = {field(scope, subject, name): value for name, value in values.items()}
        fields[field(scope, subject, "n")] = 1.0
        self.sample(fields, now)

    def sample(self, fields: dict[str, float], now: float) -> None:
        """Add gauge samples: kept in the buckets (averaged by a sample count), not totalled."""
        if not self.enabled or not fields:
            return
        with self._lock:
            bucket = self._gauges.setdefault(int(now), defaultdict(float))
            for name, value in fields.items():
                bucket[name] += value

    def observe(self, outcomes: Iterable[Any], now: float | None = None) -> None:
        """Record finished requests (``loader.batching.Outcome``s)."""
        if not self.enabled:
            return
        fields: defaultdict[str, float] = defaultdict(float)
        batches: set[tuple[str, float]] = set()
        for outcome in outcomes:
            item = outcome.item
            if item.key is None:
                fields[field(FLEET, "-", "rejected")] += 1
                continue
            model = str(item.key)
            fields[field(MODEL, model, "req")] += 1
            if outcome.error is not None:
                fields[field(MODEL, model, "err")] += 1
            fields[field(MODEL, model, "miss" if item.cold else "hit")] += 1
            queued_s = getattr(item, "queued_s", 0.0)
            finished = outcome.finished or outcome.started
            latency_ms = (queued_s + max(finished - item.received, 0.0)) * 1000
            wait_ms = (queued_s + max(outcome.started - item.received, 0.0)) * 1000
            fields[field(MODEL, model, "lat_sum")] += latency_ms
            fields[field(MODEL, model, f"lat:{latency_bucket(latency_ms)}")] += 1
            fields[field(MODEL, model, "wait_sum")] += wait_ms
            if getattr(item, "cold_start", False):
                fields[field(MODEL, model, "cold_req")] += 1
                fields[field(MODEL, model, "cold_req_ms")] += latency_ms
            fields[field(MODEL, model, f"wait:{latency_bucket(wait_ms)}")] += 1
            if outcome.batch_size and (model, outcome.started) not in batches:
                batches.add((model, outcome.started))
                fields[field(MODEL, model, "batches")] += 1
                fields[field(MODEL, model, "batch_rows")] += outcome.batch_size
                fields[field(MODEL, model, f"bs:{batch_bucket(outcome.batch_size)}")] += 1
        self.count(fields, now)

    def loaded(self, model: str, load_s: float | None, now: float | None = None) -> None:
        """A model load finished (``load_s``) or failed (None)."""
        if load_s is None:
            self.count({field(MODEL, model, "load_failed"): 1}, now)
        else:
            self.count(
                {field(MODEL, model, "loads"): 1, field(MODEL, model, "load_ms"): load_s * 1000},
                now,
            )

    def flush(self) -> int:
        """Write what was recorded; returns the number of seconds written."""
        with self._lock:
            counters, self._counters = self._counters, {}
            gauges, self._gauges = self._gauges, {}
        seconds = sorted(set(counters) | set(gauges))
        if not seconds:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for second in seconds:
            c: dict[str, float] = counters.get(second, {})
            g: dict[str, float] = gauges.get(second, {})
            args: list[Any] = [
                self.settings.second_retention_s,
                self.settings.minute_retention_s,
                len(c),
                len(c) + len(g),
            ]
            for name, value in (*c.items(), *g.items()):
                args += (name, repr(float(value)))
            for name, value in c.items():
                scope, _, rest = name.partition("|")
                subject, _, metric = rest.rpartition("|")
                if scope == MODEL and metric in FORECAST_FIELDS:
                    args += (f"{subject}|{metric}", repr(float(value)))
            self._write(
                keys=[
                    keys.metrics_second_key(second),
                    keys.metrics_minute_key(second // 60),
                    keys.METRICS_TOTAL,
                    keys.metrics_forecast_key(second // 60),
                ],
                args=args,
                client=pipe,
            )
        try:
            pipe.execute()
        except Exception:
            self._restore(counters, gauges)
            raise
        return len(seconds)

    def _restore(
        self,
        counters: dict[int, defaultdict[str, float]],
        gauges: dict[int, defaultdict[str, float]],
    ) -> None:
        """Put unwritten data back, keeping at most ``MAX_PENDING_S`` seconds of it."""
        with self._lock:
            for source, target in ((counters, self._counters), (gauges, self._gauges)):
                for second, values in source.items():
                    bucket = target.setdefault(second, defaultdict(float))
                    for name, value in values.items():
                        bucket[name] += value
            newest = max([*self._counters, *self._gauges], default=0)
            for target in (self._counters, self._gauges):
                for second in [s for s in target if s <= newest - MAX_PENDING_S]:
                    del target[second]
                    self.dropped_seconds += 1


class MetricsFlusher:
    """Flushes a recorder every ``interval_s`` from a daemon thread."""

    def __init__(self, recorder: MetricsRecorder, interval_s: float = 1.0) -> None:
        self.recorder = recorder
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-flush", daemon=True)

    def start(self) -> None:
        if self.recorder.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            self.recorder.flush()
        except Exception as exc:
            logger.warning("final metrics flush failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.recorder.flush()
            except Exception as exc:
                logger.warning("metrics flush failed (kept for the next one): %s", exc)


# -- reading --------------------------------------------------------------------------------


def percentile(histogram: dict[int, float], q: float, bounds: tuple[float, ...]) -> float | None:
    """The q-quantile of a bucketed histogram, interpolated inside its bucket."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index in sorted(histogram):
        count = histogram[index]
        if seen + count >= rank and count > 0:
            lower = bounds[index - 1] if 0 < index <= len(bounds) else 0.0
            upper = bounds[index] if index < len(bounds) else bounds[-1] * 1.25
            fraction = (rank - seen) / count
            return lower + (upper - lower) * fraction
        seen += count
    return bounds[-1]


class ModelStats:
    """Parsed fields of one model version over a window."""

    def __init__(self) -> None:
        self.values: defaultdict[str, float] = defaultdict(float)
        self.latency: dict[int, float] = {}
        self.wait: dict[int, float] = {}
        self.batch: dict[int, float] = {}

    def add(self, name: str, value: float) -> None:
        kind, _, index = name.partition(":")
        if index and kind in ("lat", "wait", "bs"):
            target = {"lat": self.latency, "wait": self.wait, "bs": self.batch}[kind]
            target[int(index)] = target.get(int(index), 0.0) + value
        else:
            self.values[name] += value

    def summary(self, window_s: float, ticks: float) -> dict[str, Any]:
        v = self.values
        requests, errors = v["req"], v["err"]
        lookups = v["hit"] + v["miss"]
        return {
            "requests": int(requests),
            "errors": int(errors),
            "requests_per_second": _round(requests / window_s),
            "error_rate_percent": _round(100 * errors / requests) if requests else 0.0,
            "average_response_time_ms": _round(v["lat_sum"] / requests) if requests else None,
            "p50_response_time_ms": _round(percentile(self.latency, 0.50, LATENCY_BOUNDS_MS)),
            "p95_response_time_ms": _round(percentile(self.latency, 0.95, LATENCY_BOUNDS_MS)),
            "p99_response_time_ms": _round(percentile(self.latency, 0.99, LATENCY_BOUNDS_MS)),
            "average_queue_wait_ms": _round(v["wait_sum"] / requests) if requests else None,
            "p95_queue_wait_ms": _round(percentile(self.wait, 0.95, LATENCY_BOUNDS_MS)),
            "batches": int(v["batches"]),
            "average_batch_size": _round(v["batch_rows"] / v["batches"]) if v["batches"] else None,
            "model_loads": int(v["loads"]),
            "failed_loads": int(v["load_failed"]),
            "average_load_time_ms": _round(v["load_ms"] / v["loads"]) if v["loads"] else None,
            "cache_hit_rate": _round(v["hit"] / lookups) if lookups else None,
            "average_instances": _round(v["instances"] / ticks) if ticks else None,
            "average_queue_depth": _round(v["queued"] / ticks) if ticks else None,
            "average_running": _round(v["held"] / ticks) if ticks else None,
            # Versions brought up from zero (the scaler's count), and the requests that
            # arrived at zero instances with their wait, publish to answer, on average.
            "cold_starts": int(v["cold_starts"]),
            "cold_start_requests": int(v["cold_req"]),
            "average_cold_start_ms": _round(v["cold_req_ms"] / v["cold_req"])
            if v["cold_req"]
            else None,
        }


# What a series point holds per model version (a subset of ``ModelStats.summary``) and for
# the fleet (of ``summarise``).
SERIES_METRICS: tuple[str, ...] = (
    "requests",
    "requests_per_second",
    "errors",
    "error_rate_percent",
    "p50_response_time_ms",
    "p95_response_time_ms",
    "p99_response_time_ms",
    "average_batch_size",
    "average_instances",
    "average_queue_depth",
    "average_running",
    "cold_starts",
    "cold_start_requests",
    "average_cold_start_ms",
    "model_loads",
    "average_load_time_ms",
)
FLEET_SERIES: tuple[str, ...] = (
    "requests_per_second",
    "average_total_instances",
    "average_loading_instances",
    "scale_up_events",
    "scale_down_events",
    "average_tick_ms",
)


def _round(value: float | None, digits: int = 3) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


class MetricsHistory:
    """Window queries over the buckets (SEED.md's key metrics)."""

    def __init__(self, client: redis.Redis, settings: MetricsSettings) -> None:
        self.client = client
        self.settings = settings
        self._sum = client.register_script(_SUM)

    def resolution(self, window_s: int) -> int:
        return 1 if window_s <= self.settings.second_retention_s else 60

    def raw(self, window_s: int, now: float | None = None) -> tuple[dict[str, float], int]:
        """Every field summed over the last ``window_s`` seconds, and the resolution used."""
        end = int(time.time() if now is None else now)
        resolution = self.resolution(window_s)
        n = window_s if resolution == 1 else end // 60 - (end - window_s) // 60
        (group,) = self._groups(self._bucket_keys(end, resolution, n), n)
        return group, resolution

    def _bucket_keys(self, end: int, resolution: int, n: int) -> list[str]:
        """The ``n`` buckets of ``resolution`` seconds that end with the one holding ``end``."""
        if resolution == 1:
            return [keys.metrics_second_key(t) for t in range(end - n + 1, end + 1)]
        return [keys.metrics_minute_key(t) for t in range(end // 60 - n + 1, end // 60 + 1)]

    def _groups(
        self, bucket_keys: list[str], size: int, prefixes: Iterable[str] = ()
    ) -> list[dict[str, float]]:
        groups = self._sum(keys=bucket_keys, args=[size, *prefixes])
        return [
            {keys.text(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}
            for flat in groups
        ]

    def _check_window(self, window_s: int) -> None:
        if window_s < 1:
            raise ValueError(f"window_seconds={window_s} must be at least 1")
        limit = self.settings.minute_retention_s
        if window_s > limit:
            raise ValueError(
                f"window_seconds={window_s} exceeds the kept history of {limit} s "
                "(METRICS_MINUTE_RETENTION_S)"
            )

    def window(
        self, window_s: int, *, now: float | None = None, model: str | None = None
    ) -> dict[str, Any]:
        """SEED.md's key metrics over the last ``window_s`` seconds."""
        self._check_window(window_s)
        now = time.time() if now is None else now
        fields, resolution = self.raw(window_s, now)
        return summarise(fields, window_s, resolution, model=model)

    def forecast_inputs(
        self, window_s: int, *, now: float | None = None, current: bool = False
    ) -> tuple[int, dict[str, dict[str, list[float]]]]:
        """Per model version, each of ``FORECAST_FIELDS`` per whole minute of the last
        ``window_s`` seconds (the minute in progress left out unless ``current``), oldest
        first, and the first minute's start: one small hash per minute, one pipeline."""
        self._check_window(window_s)
        end = int(time.time() if now is None else now) // 60 - (0 if current else 1)
        n = max(1, window_s // 60)
        pipe = self.client.pipeline(transaction=False)
        for minute in range(end - n + 1, end + 1):
            pipe.hgetall(keys.metrics_forecast_key(minute))
        out: dict[str, dict[str, list[float]]] = {}
        for i, flat in enumerate(pipe.execute()):
            for raw, value in flat.items():
                label, _, name = keys.text(raw).rpartition("|")
                fields = out.setdefault(label, {f: [0.0] * n for f in FORECAST_FIELDS})
                if name in fields:
                    fields[name][i] = float(value)
        return (end - n + 1) * 60, out

    def series(
        self,
        window_s: int,
        step_s: int,
        *,
        now: float | None = None,
        model: str | None = None,
        version: str | None = None,
        metric: str | None = None,
    ) -> dict[str, Any]:
        """Per-step points over the last ``window_s`` seconds, oldest first.

        ``t`` holds each point's first second; ``models`` holds, per model version, each
        metric of ``ModelStats.summary`` (or only ``metric``) per point, and ``fleet`` the
        scaler's figures per point. A step is a whole number of buckets (1 s within the
        second-bucket retention, else 60 s; 60 s also for steps of a minute or more).
        """
        self._check_window(window_s)
        if metric is not None and metric not in SERIES_METRICS:
            raise ValueError(f"metric={metric!r} is not one of {', '.join(SERIES_METRICS)}")
        if version is not None and model is None:
            raise ValueError("version needs model")
        # Steps of a minute or more read the minute buckets: 60 times fewer keys to sum.
        resolution = 60 if step_s >= 60 else self.resolution(window_s)
        if step_s < 1 or step_s > window_s:
            raise ValueError(f"step_seconds={step_s} must be between 1 and window_seconds")
        per = max(1, -(-step_s // resolution))
        step = per * resolution
        points = -(-window_s // step)
        end = int(time.time() if now is None else now)
        if model is None:
            prefixes = [f"{MODEL}|", f"{FLEET}|"]
        else:
            subject = f"{model}/{version}|" if version is not None else f"{model}/"
            prefixes = [f"{MODEL}|{subject}", f"{FLEET}|"]
        groups = self._groups(self._bucket_keys(end, resolution, points * per), per, prefixes)
        first = (end // resolution - points * per + 1) * resolution
        summaries = [summarise(fields, step, resolution) for fields in groups]
        labels = sorted({label for point in summaries for label in point["models"]})
        names = [metric] if metric else list(SERIES_METRICS)
        models: dict[str, dict[str, list[Any]]] = {
            label: {name: [] for name in names} for label in labels
        }
        for fields, point in zip(groups, summaries, strict=True):
            # A version absent from a point had no requests and, where the scaler ticked,
            # no instance and nothing queued.
            idle = ModelStats().summary(step, fields.get(field(FLEET, "-", "n"), 0.0))
            for label in labels:
                stats = point["models"].get(label, idle)
                for name in names:
                    models[label][name].append(stats[name])
        return {
            "window_seconds": window_s,
            "step_seconds": step,
            "resolution_seconds": resolution,
            "t": [first + i * step for i in range(points)],
            "models": models,
            "fleet": {name: [point[name] for point in summaries] for name in FLEET_SERIES},
        }


def summarise(
    fields: dict[str, float], window_s: int, resolution: int, *, model: str | None = None
) -> dict[str, Any]:
    models: defaultdict[str, ModelStats] = defaultdict(ModelStats)
    workers: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
    fleet: defaultdict[str, float] = defaultdict(float)
    for name, value in fields.items():
        scope, _, rest = name.partition("|")
        subject, _, metric = rest.rpartition("|")
        if scope == MODEL:
            models[subject].add(metric, value)
        elif scope == WORKER:
            workers[subject][metric] += value
        elif scope == FLEET:
            fleet[metric] += value
    ticks = fleet["n"]
    selected = {k: m for k, m in models.items() if model is None or k == model}
    total = ModelStats()
    for stats in selected.values():
        for name, value in stats.values.items():
            total.values[name] += value
        for source, target in (
            (stats.latency, total.latency),
            (stats.wait, total.wait),
            (stats.batch, total.batch),
        ):
            for index, count in source.items():
                target[index] = target.get(index, 0.0) + count
    result: dict[str, Any] = {"window_seconds": window_s, "resolution_seconds": resolution}
    result |= total.summary(window_s, ticks)
    result |= {
        "average_active_instances": _round(fleet["active"] / ticks) if ticks else None,
        "average_loading_instances": _round(fleet["loading"] / ticks) if ticks else None,
        "average_total_instances": _round(fleet["total"] / ticks) if ticks else None,
        "scale_up_events": int(fleet["scale_up"]),
        "scale_down_events": int(fleet["scale_down"]),
        "cold_starts": int(fleet["cold_starts"]),
        "rejected_requests": int(fleet["rejected"]),
        "average_tick_ms": _round(fleet["tick_ms"] / ticks) if ticks else None,
    }
    result |= _resources(workers)
    result["models"] = {k: m.summary(window_s, ticks) for k, m in sorted(selected.items())}
    return result


def _resources(workers: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    per_worker: dict[str, dict[str, Any]] = {}
    for name, w in sorted(workers.items()):
        n = w.get("n", 0.0)
        if not n:
            continue
        gpu_n = w.get("gpu_n", 0.0)
        per_worker[name] = {
            "cpu_percent": _round(w.get("cpu", 0.0) / n, 1),
            "rss_bytes": int(w.get("rss", 0.0) / n),
            "system_memory_percent": _round(w.get("mem", 0.0) / n, 1),
            "gpu_utilization_percent": _round(w.get("gpu_util", 0.0) / gpu_n, 1) if gpu_n else None,
            "gpu_memory_used_bytes": int(w.get("gpu_mem", 0.0) / gpu_n) if gpu_n else None,
        }
    gpus = [w for w in per_worker.values() if w["gpu_utilization_percent"] is not None]
    return {
        "cpu_usage_percent": _round(
            sum(w["cpu_percent"] for w in per_worker.values()) / len(per_worker), 1
        )
        if per_worker
        else None,
        "memory_usage_percent": max(
            (w["system_memory_percent"] for w in per_worker.values()), default=None
        ),
        "memory_rss_bytes": sum(w["rss_bytes"] for w in per_worker.values()),
        "gpu_utilization_percent": _round(
            sum(w["gpu_utilization_percent"] for w in gpus) / len(gpus), 1
        )
        if gpus
        else None,
        "gpu_memory_used_bytes": sum(w["gpu_memory_used_bytes"] for w in gpus) if gpus else None,
        "gpu": "reported" if gpus else "no GPU reported by any worker",
        "workers": per_worker,
    }

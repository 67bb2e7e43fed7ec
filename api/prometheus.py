"""Prometheus text exposition of the metrics in Redis (``GET /metrics``).

Counters and histograms come from the running totals the workers and the scaler write
(``keys.METRICS_TOTAL``); gauges from the scaler's last tick and the workers' reports. Any
API replica exposes the same fleet-wide numbers, labelled by model, version and worker.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from common import keys
from monitoring.metrics import BATCH_BOUNDS, FLEET, LATENCY_BOUNDS_MS, MODEL
from scaler.store import ScalerStore, instance_states

# Every third latency bound (about x1.95 apart): exact cumulative counts, fewer series.
_EXPORTED_LATENCY = tuple(range(0, len(LATENCY_BOUNDS_MS), 3))

_COUNTERS = {
    "req": ("inference_requests", "Requests answered, by model version"),
    "err": ("inference_request_errors", "Requests answered with an error"),
    "hit": ("inference_cache_hits", "Requests that found their model loaded"),
    "miss": ("inference_cache_misses", "Requests that waited for their model to load"),
    "loads": ("inference_model_loads", "Model loads completed"),
    "load_failed": ("inference_model_load_failures", "Model loads that failed"),
}


class FleetCollector:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.METRICS_TOTAL)
        pipe.get(keys.SCALER_STATUS)
        pipe.hgetall(keys.POPULARITY)
        pipe.hgetall(keys.ALERTS_ACTIVE)
        totals_raw, status_raw, popularity, alerts = pipe.execute()
        totals = {keys.text(k): float(v) for k, v in totals_raw.items()}
        yield from self._counters(totals)
        status = json.loads(status_raw) if status_raw else {}
        reports = list(ScalerStore(self.client).live_reports().values())
        yield from self._gauges(status, reports, popularity, alerts)

    def _counters(self, totals: dict[str, float]) -> Iterator[Metric]:
        models: defaultdict[str, dict[str, float]] = defaultdict(dict)
        fleet: dict[str, float] = {}
        for name, value in totals.items():
            scope, _, rest = name.partition("|")
            subject, _, metric = rest.rpartition("|")
            if scope == MODEL:
                models[subject][metric] = value
            elif scope == FLEET:
                fleet[metric] = value
        labels = ["model", "version"]
        for field_name, (metric_name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(metric_name, doc, labels=labels)
            for subject, values in sorted(models.items()):
                if field_name in values:
                    family.add_metric(subject.split("/", 1), values[field_name])
            yield family
        load_seconds = CounterMetricFamily(
            "inference_model_load_seconds", "Seconds spent loading models", labels=labels
        )
        for subject, values in sorted(models.items()):
            if "load_ms" in values:
                load_seconds.add_metric(subject.split("/", 1), values["load_ms"] / 1000)
        yield load_seconds
        cold = SummaryMetricFamily(
            "inference_cold_start_seconds",
            "Requests that arrived at zero instances: publish to answer, process start and "
            "model load included",
            labels=labels,
        )
        for subject, values in sorted(models.items()):
            if values.get("cold_req"):
                cold.add_metric(
                    subject.split("/", 1),
                    count_value=int(values["cold_req"]),
                    sum_value=values.get("cold_req_ms", 0.0) / 1000,
                )
        yield cold
        for prefix, sum_field, metric_name, doc in (
            ("lat", "lat_sum", "inference_request_duration_seconds", "Publish to answer"),
            ("wait", "wait_sum", "inference_queue_wait_seconds", "Publish to batch start"),
        ):
            histogram = HistogramMetricFamily(metric_name, doc, labels=labels)
            for subject, values in sorted(models.items()):
                counts = [
                    values.get(f"{prefix}:{i}", 0.0) for i in range(len(LATENCY_BOUNDS_MS) + 1)
                ]
                if not any(counts):
                    continue
                buckets, running = [], 0.0
                for i, count in enumerate(counts[:-1]):
                    running += count
                    if i in _EXPORTED_LATENCY:
                        buckets.append((_le(LATENCY_BOUNDS_MS[i] / 1000), running))
                buckets.append(("+Inf", running + counts[-1]))
                histogram.add_metric(
                    subject.split("/", 1), buckets, sum_value=values.get(sum_field, 0.0) / 1000
                )
            yield histogram
        batch = HistogramMetricFamily(
            "inference_batch_size", "Rows per forward pass", labels=labels
        )
        for subject, values in sorted(models.items()):
            if not values.get("batches"):
                continue
            buckets, running = [], 0.0
            for i, bound in enumerate(BATCH_BOUNDS):
                running += values.get(f"bs:{i}", 0.0)
                buckets.append((str(bound), running))
            buckets.append(("+Inf", values["batches"]))
            batch.add_metric(subject.split("/", 1), buckets, sum_value=values.get("batch_rows", 0))
        yield batch
        events = CounterMetricFamily(
            "inference_scaling_events", "Scaling decisions", labels=["direction"]
        )
        events.add_metric(["up"], fleet.get("scale_up", 0.0))
        events.add_metric(["down"], fleet.get("scale_down", 0.0))
        yield events
        yield CounterMetricFamily(
            "inference_cold_starts", "Versions started from zero instances",
            value=fleet.get("cold_starts", 0.0),
        )  # fmt: skip
        yield CounterMetricFamily(
            "inference_rejected_requests", "Requests refused before reaching a model",
            value=fleet.get("rejected", 0.0),
        )  # fmt: skip

    def _gauges(
        self,
        status: dict[str, Any],
        reports: list[dict[str, Any]],
        popularity: dict[bytes, bytes],
        alerts: dict[bytes, bytes],
    ) -> Iterator[Metric]:
        instances = GaugeMetricFamily(
            "inference_model_instances",
            "Instances per model version (active: model loaded; loading)",
            labels=["model", "version", "state"],
        )
        for text, counts in sorted(instance_states(status).items()):
            for state, n in counts.items():
                if n:
                    instances.add_metric([*text.split("/", 1), state], n)
        yield instances
        depth = GaugeMetricFamily(
            "inference_queue_depth",
            "Requests waiting per model version",
            labels=["model", "version"],
        )
        for text, n in ScalerStore(self.client).queue_depths().items():
            depth.add_metric(text.split("/", 1), n)
        yield depth
        worker_labels = ["worker"]
        cpu = GaugeMetricFamily("inference_worker_cpu_percent", "Worker CPU", labels=worker_labels)
        rss = GaugeMetricFamily("inference_worker_rss_bytes", "Worker RSS", labels=worker_labels)
        gpu_util = GaugeMetricFamily(
            "inference_worker_gpu_utilization_percent", "GPU utilisation (NVML)",
            labels=worker_labels,
        )  # fmt: skip
        gpu_mem = GaugeMetricFamily(
            "inference_worker_gpu_memory_used_bytes", "GPU memory in use (NVML)",
            labels=worker_labels,
        )  # fmt: skip
        in_flight = GaugeMetricFamily(
            "inference_worker_in_flight", "Requests a worker holds", labels=worker_labels
        )
        for report in reports:
            name = [report["hostname"]]
            resources = report.get("resources", {})
            cpu.add_metric(name, resources.get("cpu_percent", 0.0))
            rss.add_metric(name, resources.get("rss_bytes", 0))
            in_flight.add_metric(name, report.get("in_flight", 0))
            device = report.get("device_memory", {})
            if device.get("gpu") is not None:
                gpu_util.add_metric(name, device.get("utilization_percent", 0))
                gpu_mem.add_metric(name, device.get("memory_used_bytes", 0))
        yield from (cpu, rss, gpu_util, gpu_mem, in_flight)
        popular = GaugeMetricFamily(
            "inference_model_popularity", "Decaying request count", labels=["model", "version"]
        )
        for text, value in sorted((keys.text(k), float(v)) for k, v in popularity.items()):
            popular.add_metric(text.split("/", 1), value)
        yield popular
        firing = GaugeMetricFamily("inference_alert_active", "Alerts firing", labels=["alert"])
        for key in sorted(keys.text(k) for k in alerts):
            firing.add_metric([key], 1)
        yield firing


def _le(seconds: float) -> str:
    return f"{seconds:.6g}"


def render_metrics(client: redis.Redis) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client))
    return generate_latest(registry), CONTENT_TYPE_LATEST

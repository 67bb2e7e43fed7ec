"""Contracts every component shares: the model key and the worker report.

A worker writes its report to Redis about every ``report_interval_s``; the scaler, the API,
Prometheus and the failover all judge liveness by ``is_alive`` and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, TypedDict


class ModelKey(NamedTuple):
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelKey:
        name, _, version = text.partition("/")
        return cls(name, version)


class WorkerReport(TypedDict, total=False):
    """The JSON a worker writes under ``inference:worker:<hostname>`` (the main fields)."""

    hostname: str
    host: str
    pid: int
    time: float  # when it was written (epoch seconds)
    report_interval_s: float
    device: str
    queues: list[str]  # the shared queues it consumes
    models: list[dict[str, Any]]  # loaded: name, version, bytes, load_s
    loading: list[dict[str, Any]]
    failed_models: list[dict[str, Any]]
    held: int  # messages it holds (taken, not acknowledged)
    busy: dict[str, int]  # "name/version" -> requests waiting for a batch or running
    instances_health: dict[str, dict[str, Any]]


def silence_limit_s(report_interval_s: float) -> float:
    """How long a worker may stay silent and count as alive: four report intervals, at least
    three seconds (a busy 2-core host delays reports by a second)."""
    return max(4.0 * report_interval_s, 3.0)


def report_ttl_s(report_interval_s: float) -> int:
    """The report key's TTL: it outlives the silence limit, so liveness is judged by time."""
    return math.ceil(silence_limit_s(report_interval_s)) + 1


def is_alive(report: Mapping[str, Any], now: float) -> bool:
    """Whether the worker that wrote ``report`` counts as alive at ``now``."""
    interval = float(report.get("report_interval_s", 1.0))
    return now - float(report.get("time", 0.0)) <= silence_limit_s(interval)

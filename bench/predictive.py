"""Predictive scaling on a replayed week: the scaler's own policy and forecasts on a fake
clock, with prediction and without, over the same generated trace.

The week is compressed to the time the policy takes to decide it: every tick of
``tick_interval_s`` runs ``scaler.policy.decide`` (the function the live scaler runs) on a
snapshot of a simulated fleet, and forecasts come from ``scaler.forecast`` over the
simulated minute history, refreshed once a minute as the live scaler does. The fleet obeys
each plan: a new worker process takes ``PROCESS_START_S`` to start, a model ``LOAD_S`` to
load (the bench's measured figures for small_cnn, rounded up), and an instance answers
``target_load_per_instance`` requests at a time in ``SERVICE_S`` each.

The trace (seeded), per model version, requests/s per minute with Poisson arrivals and
20% lognormal noise on each minute's rate:
- ``office``: weekdays 07:00 to 20:00 with a morning ramp and a lunch dip, a 5% daily
  trend, sparse on weekends;
- ``sparse``: one request every 5 to 15 minutes from 08:00 to 18:00, every day;
- ``nightly``: a batch job at 02:00 for 20 minutes, 2,500 requests/s;
- ``steady``: day and night, 0.5 to 3 requests/s;
- ``retired``: like ``office`` for three days, then never again.

Counted per run: cold starts seen by callers (a request arriving with no loaded instance of
its version and none loading for an earlier request), the requests that waited on one,
model instance-seconds (loaded or loading), worker process-seconds, and the p50/p99
latency of every request.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.common import QUICK, Row
from common.contracts import ModelKey
from scaler.config import AutoscalerConfig, ZeroScalingConfig
from scaler.forecast import LEVEL_S, forecast_rates
from scaler.policy import NEW_WORKER_PREFIX, Forecast, PolicyState, Snapshot, WorkerInfo, decide
from scaler.processes import PROJECT_ROOT

DAY = 86_400
PROCESS_START_S = 3.0
LOAD_S = 0.5
SERVICE_S = 0.02
RESULTS = PROJECT_ROOT / "bench" / "results" / "predictive.json"
VERSIONS = ("office", "sparse", "nightly", "steady", "retired")
# Latency histogram: 1 ms to about 10 minutes, 5% wide buckets.
BOUNDS = 0.001 * 1.05 ** np.arange(280)


def _office(t: np.ndarray) -> np.ndarray:
    day, hour = t // DAY, (t % DAY) / 3600
    weekday = day % 7 < 5
    ramp_up = np.clip((hour - 7) / 2, 0, 1)
    ramp_down = np.clip((20 - hour) / 3, 0, 1)
    lunch = 1 - 0.4 * np.exp(-(((hour - 12.5) / 0.7) ** 2))
    rate = 8.0 * ramp_up * ramp_down * lunch * 1.05**day
    return np.where(weekday, rate, np.where((hour > 10) & (hour < 16), 0.005, 0.0))


def _sparse(t: np.ndarray) -> np.ndarray:
    hour = (t % DAY) / 3600
    return np.where((hour >= 8) & (hour < 18), 1 / 600, 0.0)


def _nightly(t: np.ndarray) -> np.ndarray:
    second = t % DAY
    return np.where((second >= 2 * 3600) & (second < 2 * 3600 + 1200), 2500.0, 0.0)


def _steady(t: np.ndarray) -> np.ndarray:
    return 1.75 + 1.25 * np.sin(2 * np.pi * (t % DAY) / DAY)


def _retired(t: np.ndarray) -> np.ndarray:
    return np.where(t < 3 * DAY, _office(t), 0.0)


def trace(days: int, seed: int = 7) -> dict[str, np.ndarray]:
    """Requests per second of each version, per minute of ``days`` (noise included)."""
    rng = np.random.default_rng(seed)
    minutes = np.arange(days * 1440) * 60.0
    shapes = {
        "office": _office,
        "sparse": _sparse,
        "nightly": _nightly,
        "steady": _steady,
        "retired": _retired,
    }
    return {
        name: shape(minutes) * rng.lognormal(0, 0.2, minutes.size) for name, shape in shapes.items()
    }


@dataclass
class Worker:
    name: str
    up_at: float  # the process reports from then on
    serving: set[ModelKey] = field(default_factory=set)
    ready_at: dict[ModelKey, float] = field(default_factory=dict)  # loaded from then on
    rows: dict[ModelKey, int] = field(default_factory=dict)  # requests answered


@dataclass
class VersionSim:
    key: ModelKey
    backlog: float = 0.0
    # Requests waiting with no loaded instance: (arrival time, count).
    cold: deque[tuple[float, float]] = field(default_factory=deque)
    cold_starts: int = 0
    cold_requests: float = 0.0
    minute: list[float] = field(default_factory=list)  # requests per whole minute


def simulate(
    rates: dict[str, np.ndarray], predictive: bool, config: AutoscalerConfig
) -> dict[str, Any]:
    config = config.model_copy(
        update={
            "zero_scaling": config.zero_scaling.model_copy(
                update={"enable_predictive_scaling": predictive}
            )
        }
    )
    rng = np.random.default_rng(11)
    dt = config.tick_interval_s
    minutes = len(next(iter(rates.values())))
    end = minutes * 60.0
    keys = {name: ModelKey(name, "v1") for name in rates}
    versions = {name: VersionSim(keys[name]) for name in rates}
    models = {k: 50 * 1024**2 for k in keys.values()}
    workers: dict[str, Worker] = {}
    state = PolicyState()
    hist = np.zeros(len(BOUNDS) + 1)
    started = 0
    process_s = 0.0
    per_version = dict.fromkeys(rates, 0.0)
    forecasts: dict[ModelKey, Forecast] = {}
    capacity = config.target_load_per_instance / SERVICE_S  # requests/s per instance
    now = 0.0
    while now < end:
        minute = int(now // 60)
        if predictive and now % 60 < dt:
            forecasts = _forecasts(versions, minute, config)
        # Arrivals over this tick, then service by the instances loaded.
        for name, sim in versions.items():
            if now % 60 < dt:
                sim.minute.append(0.0)
            arrivals = float(rng.poisson(rates[name][minute] * dt))
            sim.minute[-1] += arrivals
            ready = [w for w in workers.values() if w.ready_at.get(sim.key, math.inf) <= now]
            if not ready:
                if arrivals:
                    if not sim.cold and not _loading_for_earlier(sim, workers):
                        sim.cold_starts += 1
                    sim.cold.append((now + dt * rng.random(), arrivals))
                    sim.cold_requests += arrivals
                sim.backlog += arrivals
                continue
            first_ready = min(w.ready_at[sim.key] for w in ready)
            while sim.cold:  # waited for the load: answered once it was ready
                at, n = sim.cold.popleft()
                hist[np.searchsorted(BOUNDS, max(first_ready - at, 0) + SERVICE_S)] += n
            sim.backlog += arrivals
            served = min(sim.backlog, capacity * len(ready) * dt)
            wait = max(0.0, sim.backlog - served) / (capacity * len(ready))
            if arrivals:
                hist[np.searchsorted(BOUNDS, SERVICE_S + wait)] += arrivals
            sim.backlog -= served
            ready[0].rows[sim.key] = ready[0].rows.get(sim.key, 0) + math.ceil(served)
        snapshot = Snapshot(
            now=now,
            models=models,
            queued={s.key: math.ceil(s.backlog) for s in versions.values() if s.backlog >= 1},
            workers={
                w.name: WorkerInfo(
                    w.name,
                    serving=frozenset(w.serving),
                    loaded=frozenset(k for k, t in w.ready_at.items() if t <= now),
                    managed=True,
                    starting=w.up_at > now,
                    rows=tuple(w.rows.items()),
                )
                for w in workers.values()
            },
            forecasts=forecasts,
        )
        plan, state = decide(snapshot, config, state)
        for name, assigned in plan.assignments.items():
            if name in plan.stop_workers:
                continue
            if name.startswith(NEW_WORKER_PREFIX):
                worker = Worker(f"w{started}", up_at=now + PROCESS_START_S)
                started += 1
                workers[worker.name] = worker
            else:
                worker = workers[name]
            for key in assigned - worker.serving:
                worker.ready_at[key] = max(now, worker.up_at) + LOAD_S
            for key in worker.serving - assigned:
                worker.ready_at.pop(key, None)
            worker.serving = set(assigned)
        for name in plan.stop_workers:
            workers.pop(name, None)
        for w in workers.values():
            for key in w.serving:
                per_version[key.name] += dt
        process_s += len(workers) * dt
        now += dt
    total = hist.sum()
    return {
        "predictive": predictive,
        "requests": int(total),
        "cold_starts": sum(s.cold_starts for s in versions.values()),
        "cold_start_requests": int(sum(s.cold_requests for s in versions.values())),
        "cold_starts_per_version": {n: s.cold_starts for n, s in versions.items()},
        "instance_seconds": round(sum(per_version.values())),
        "instance_seconds_per_version": {n: round(v) for n, v in per_version.items()},
        "process_seconds": round(process_s),
        "p50_ms": round(_quantile(hist, 0.50) * 1000, 1),
        "p99_ms": round(_quantile(hist, 0.99) * 1000, 1),
        "p999_ms": round(_quantile(hist, 0.999) * 1000, 1),
    }


def _loading_for_earlier(sim: VersionSim, workers: dict[str, Worker]) -> bool:
    """An instance of the version is on its way (asked for by an earlier request or by a
    forecast): this request waits on a cold start already counted, or on none."""
    return any(sim.key in w.serving for w in workers.values())


def _forecasts(
    versions: dict[str, VersionSim], minute: int, config: AutoscalerConfig
) -> dict[ModelKey, Forecast]:
    zero = config.zero_scaling
    window = int(zero.learning_window_hours * 60) + LEVEL_S // 60  # as the live scaler reads
    out = {}
    for sim in versions.values():
        history = sim.minute[max(0, minute - window) : minute]  # whole minutes only
        rates = forecast_rates(history, 60, zero.prediction_horizon_minutes * 60)
        if rates.any():
            out[sim.key] = Forecast(
                start=minute * 60.0,
                step_s=60,
                rates=tuple(float(r) for r in rates),
                cold_start_s=PROCESS_START_S + LOAD_S,
                service_s=SERVICE_S,
            )
    return out


def _quantile(hist: np.ndarray, q: float) -> float:
    index = int(np.searchsorted(np.cumsum(hist), q * hist.sum()))
    return float(BOUNDS[min(index, len(BOUNDS) - 1)])


def run(days: int = 7) -> list[Row]:
    config = AutoscalerConfig(
        max_workers=16,
        zero_scaling=ZeroScalingConfig(preload_popular_models=False),
    )
    rates = trace(days)
    started = time.perf_counter()
    without = simulate(rates, False, config)
    with_ = simulate(rates, True, config)
    avoided = 1 - with_["cold_starts"] / max(without["cold_starts"], 1)
    extra = with_["instance_seconds"] / max(without["instance_seconds"], 1) - 1
    result = {
        "days": days,
        "tick_interval_s": config.tick_interval_s,
        "process_start_s": PROCESS_START_S,
        "load_s": LOAD_S,
        "service_s": SERVICE_S,
        "without_prediction": without,
        "with_prediction": with_,
        "cold_starts_avoided": round(avoided, 3),
        "extra_instance_seconds": round(extra, 3),
        "aim_met": avoided >= 0.5 and extra <= 0.2,
        "simulated_in_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return [
        Row.of(
            f"predictive: cold starts over {days} days",
            with_["cold_starts"],
            "cold starts",
            without["cold_starts"],
            "without prediction",
            higher_is_better=False,
        ),
        Row.of(
            "predictive: model instance-seconds",
            with_["instance_seconds"],
            "s",
            without["instance_seconds"],
            "without prediction",
            higher_is_better=False,
        ),
        Row.of(
            "predictive: p99 latency",
            with_["p99_ms"],
            "ms",
            without["p99_ms"],
            "without prediction",
            higher_is_better=False,
        ),
    ]


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else (2 if QUICK else 7))
    print(RESULTS.read_text())

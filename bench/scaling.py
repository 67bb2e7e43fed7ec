"""Scaler benchmark: cold starts (with the warm standby and without) beside the model's own
load time, reaction to a burst, and the tick time with 10,000 registered versions."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import QUICK, Row, wait_for
from common import keys


def _reports(client: redis.Redis) -> list[dict[str, Any]]:
    names = [n.decode() for n in client.zrange(keys.WORKERS, 0, -1)]
    raws = client.mget([keys.worker_report_key(n) for n in names]) if names else []
    return [json.loads(r) for r in raws if r]


def _load_time(client: redis.Redis, name: str) -> float:
    """The model's load time as the worker that loaded it reports it (waits for the report)."""

    def reported() -> list[float]:
        return [
            m["load_time_s"] for r in _reports(client) for m in r["models"] if m["name"] == name
        ]

    return max(wait_for(reported, timeout_s=10))


def _serving(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    """Reports of the workers that consume ``name``'s queue."""
    queue = keys.queue_name(name, "v1")
    return [r for r in _reports(client) if queue in r["queues"]]


async def _cold_starts(client: redis.Redis) -> list[Row]:
    from scaler import Autoscaler, AutoscalerConfig, ColdStartStrategy, ZeroScalingConfig
    from tasks import predict

    rows: list[Row] = []
    x = np.zeros((3, 64, 64), np.float32)
    for strategy in (ColdStartStrategy.LAZY, ColdStartStrategy.HYBRID):
        config = AutoscalerConfig(
            tick_interval_s=1.0, max_workers=3, scale_down_stabilization_s=1.0,
            zero_scaling=ZeroScalingConfig(scale_to_zero_delay=300.0, cold_start_strategy=strategy,
                                           preload_popular_models=False),
        )  # fmt: skip
        autoscaler = Autoscaler(config)
        await autoscaler.start()
        overheads: list[float] = []
        try:
            for _ in range(1 if strategy is ColdStartStrategy.LAZY else 5):
                if strategy is ColdStartStrategy.HYBRID:
                    # Something served, so the standby exists; small_cnn at zero, nowhere
                    # loaded; the standby listening for commands, with no queue, its own
                    # preloads done (the steady state a request finds).
                    await autoscaler.predict("linear", [1.0] * 8)
                    await asyncio.to_thread(
                        wait_for,
                        lambda: (
                            not _serving(client, "small_cnn")
                            and not any(
                                m["name"] == "small_cnn"
                                for r in _reports(client)
                                for m in r["models"]
                            )
                            and any(
                                not r["queues"] and r.get("ready") and not r.get("loading")
                                for r in _reports(client)
                            )
                        ),
                    )
                started = time.monotonic()
                await asyncio.to_thread(lambda: predict.delay("small_cnn", x).get(timeout=120))
                cold = time.monotonic() - started
                load = await asyncio.to_thread(_load_time, client, "small_cnn")
                overheads.append(cold - load)
                # Back to zero at once (a later request brings it back: the next cold start).
                await autoscaler.unload_model("small_cnn")
        finally:
            await autoscaler.stop(stop_workers=True)
        client.flushall()
        if strategy is ColdStartStrategy.LAZY:
            rows.append(
                Row.of(
                    "cold start small_cnn, no worker running: first request to result",
                    (overheads[0] + load) * 1000,
                    "ms",
                    load * 1000,
                    "the model's own load time in the worker",
                    higher_is_better=False,
                )
            )
        else:
            for label, value in (
                ("median", statistics.median(overheads)),
                ("max", max(overheads)),
            ):
                rows.append(
                    Row.of(
                        f"cold start small_cnn, warm standby: beyond the load time ({label} of 5)",
                        value * 1000,
                        "ms",
                        100.0,
                        "the 100 ms aim",
                        higher_is_better=False,
                    )
                )
    return rows


async def _burst(client: redis.Redis) -> list[Row]:
    from scaler import Autoscaler, AutoscalerConfig, ColdStartStrategy
    from tasks import predict

    config = AutoscalerConfig()  # the defaults: a 1 s tick, HYBRID, 32 requests an instance
    assert config.zero_scaling.cold_start_strategy is ColdStartStrategy.HYBRID
    autoscaler = Autoscaler(config)
    await autoscaler.start()
    try:
        # small_cnn serves ~300 inputs/s here: a burst of 1000 builds a backlog for sure.
        await autoscaler.predict("small_cnn", np.zeros((3, 64, 64), np.float32))
        # Steady state: the standby is up and holds small_cnn, not consuming its queue.
        await asyncio.to_thread(
            wait_for,
            lambda: any(
                not r["queues"] and any(m["name"] == "small_cnn" for m in r["models"])
                for r in _reports(client)
            ),
        )

        def second_instance() -> bool:
            holders = [
                r
                for r in _reports(client)
                if any(m["name"] == "small_cnn" for m in r["models"])
                and keys.queue_name("small_cnn", "v1") in r["queues"]
            ]
            return len(holders) >= 2

        x = np.zeros((3, 64, 64), np.float32)
        started = time.time()
        results = [predict.delay("small_cnn", x) for _ in range(1000)]
        await asyncio.to_thread(wait_for, second_instance)
        await asyncio.to_thread(lambda: [r.get(timeout=120) for r in results])
        # When each worker first answered (the results' own metadata, not the reports,
        # which lag up to a report interval): the second to answer is the new instance.
        first: dict[str, float] = {}
        for r in results:
            meta = r._get_task_meta()
            done = datetime.fromisoformat(meta["date_done"]).timestamp()
            first[meta["worker"]] = min(first.get(meta["worker"], done), done)
        reaction = sorted(first.values())[1] - started
    finally:
        await autoscaler.stop(stop_workers=True)
    client.flushall()
    return [
        Row.of(
            "burst of 1000, default config: time until a second small_cnn instance serves",
            reaction * 1000,
            "ms",
            1000.0,
            "the 1 s aim",
            higher_is_better=False,
        )
    ]


def _tick_time(client: redis.Redis) -> list[Row]:
    from scaler.backends import StaticBackend
    from scaler.config import AutoscalerConfig
    from scaler.loop import ScalerLoop
    from workers import app

    client.flushall()
    entry = {
        "format": "state_dict",
        "bytes": 1000,
        "input": {"dtype": "float32", "shape": [8]},
        "scaling": {},
    }
    registry = {f"m{i}": {"name": f"m{i}", "default_version": "v1", "traffic": {},
                          "versions": {"v1": entry}} for i in range(10_000)}  # fmt: skip
    from loader.registry import publish_registry

    publish_registry(client, registry)
    pipe = client.pipeline(transaction=False)
    for i in range(200):
        pipe.lpush(keys.queue_name(f"m{i}", "v1"), "x")
    for w in range(8):  # eight workers, 25 active versions each
        name = f"fake{w}@bench"
        queues = [keys.queue_name(f"m{i}", "v1") for i in range(w * 25, (w + 1) * 25)]
        pipe.set(keys.worker_report_key(name), json.dumps({
            "hostname": name, "queues": queues, "models": [], "busy": {}, "max_models": 30,
            "time": time.time() + 3600,
        }), ex=60)  # fmt: skip
        pipe.zadd(keys.WORKERS, {name: time.time() + 3600})
    pipe.execute()
    loop = ScalerLoop(
        AutoscalerConfig(backend="static", max_workers=8),
        client=client,
        app=app,
        backend=StaticBackend(),
    )
    loop.tick()
    times = []
    for _ in range(10 if QUICK else 30):
        started = time.perf_counter()
        loop.tick()
        times.append((time.perf_counter() - started) * 1000)
    client.flushall()
    return [
        Row.of(
            "scaler tick, 10,000 registered versions, 200 active (median)",
            statistics.median(times),
            "ms",
            50.0,
            "the 50 ms aim",
            higher_is_better=False,
        )
    ]


def run(env: dict[str, str], repo: Path) -> list[Row]:
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.flushall()
    rows = asyncio.run(_cold_starts(client))
    rows += asyncio.run(_burst(client))
    rows += _tick_time(client)
    return rows

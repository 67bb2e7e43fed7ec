"""Routing benchmark: each load-balancing strategy against the shared queue at the same load
(two tiny_mlp instances, 64 requests outstanding from one producer process), and the CPU
(and, for the two "least" strategies, the Redis round trip) of one routing decision."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import QUICK, Row, run_load, start_worker, wait_for
from common import keys
from common.contracts import ModelKey
from scaler.config import LoadBalancingStrategy

TINY = keys.queue_name("tiny_mlp", "v1")


def decision_us(env: dict[str, str], rounds: int) -> float:
    """Microseconds per ``Balancer.route`` call for the strategy now set."""
    from tasks import broker
    from tasks.balancing import Balancer
    from tasks.routing import run_sync

    client = redis.Redis.from_url(env["REDIS_URL"])

    def execute(commands: Any) -> list[Any]:
        return broker.run(client, commands)

    balancer = Balancer(ttl_s=1.0)
    x = np.zeros(64, dtype=np.float32)
    run_sync(balancer.route("tiny_mlp", "v1", x), execute)
    started = time.perf_counter()
    for _ in range(rounds):
        run_sync(balancer.route("tiny_mlp", "v1", x), execute)
    return (time.perf_counter() - started) / rounds * 1e6


def run(env: dict[str, str], logs: Path) -> list[Row]:
    from scaler.autoscaler import Autoscaler
    from scaler.config import AutoscalerConfig

    client = redis.Redis.from_url(env["REDIS_URL"])
    config = AutoscalerConfig(backend="static", tick_interval_s=0.5)
    autoscaler = Autoscaler(config)
    autoscaler.store.set_override(ModelKey("tiny_mlp", "v1"), {"instances": 2})
    worker_env = {**env, "WORKER_MODELS": "tiny_mlp:v1"}
    workers = [start_worker(worker_env, [TINY], logs, name=f"lb{i}") for i in range(2)]
    seconds = 3.0 if QUICK else 8.0
    rounds = 2000 if QUICK else 10000
    throughput: dict[LoadBalancingStrategy, float] = {}
    decision: dict[LoadBalancingStrategy, float] = {}
    try:
        asyncio.run(autoscaler.start())

        def two_members() -> bool:
            raw = client.hget(keys.INSTANCES, "tiny_mlp/v1")
            return raw is not None and len(json.loads(raw)) == 2

        wait_for(two_members, timeout_s=60)
        for strategy in LoadBalancingStrategy:
            asyncio.run(autoscaler.set_load_balancing("tiny_mlp", strategy))
            decision[strategy] = decision_us(env, rounds)
            result = run_load(
                env, "--model", "tiny_mlp", "--outstanding", "64", "--seconds", str(seconds)
            )
            throughput[strategy] = result["throughput"]
    finally:
        asyncio.run(autoscaler.set_load_balancing("tiny_mlp", None))
        asyncio.run(autoscaler.stop())
        for worker in workers:
            worker.stop()
        autoscaler.store.set_override(ModelKey("tiny_mlp", "v1"), None)
    shared = LoadBalancingStrategy.SHARED_QUEUE
    rows = []
    for strategy in LoadBalancingStrategy:
        if strategy is shared:
            continue
        rows.append(
            Row.of(
                f"{strategy.value}: inputs/s, 2 instances, 64 outstanding",
                throughput[strategy],
                "inputs/s",
                throughput[shared],
                "shared queue, same load",
            )
        )
        rows.append(
            Row.of(
                f"{strategy.value}: one routing decision",
                decision[strategy],
                "us",
                decision[shared],
                "shared queue decision",
                higher_is_better=False,
            )
        )
    return rows

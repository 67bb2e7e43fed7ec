"""Monitoring benchmark: what metrics recording costs a worker, and what the HTTP API costs a
request, each against its baseline in the same run.

- Recording: a worker drains a pre-filled queue of tiny_mlp requests with
  ``METRICS_ENABLED`` on and off (alternating, best of each), so the figure is the worker's
  own capacity and not the client's; plus the recorder's CPU per request in-process.
- API: ``POST /predict`` through ``python -m api`` (one uvicorn process) against
  ``predict.delay`` from one process, both with 64 requests outstanding on the same worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import QUICK, Row, fill_queue, run_load, start_worker, wait_for
from common import keys
from common.redis import free_port
from scaler.processes import PROJECT_ROOT

TINY = keys.queue_name("tiny_mlp", "v1")


def drain_rate(env: dict[str, str], logs: Path, *, metrics: bool, count: int) -> float:
    from loader.registry import publish_registry
    from loader.repository import ModelRepository

    client = redis.Redis.from_url(env["REDIS_URL"])
    publish_registry(client, ModelRepository(Path(env["MODEL_REPOSITORY"])).registry())
    fill_queue(env["REDIS_URL"], "tiny_mlp", np.zeros(64, np.float32), count)
    worker_env = {
        **env,
        "METRICS_ENABLED": "true" if metrics else "false",
        "WORKER_MODELS": "tiny_mlp:v1",
        "WORKER_REPORT_INTERVAL_S": "0.05",
    }
    name = f"drain-{'on' if metrics else 'off'}-{time.monotonic_ns() % 10**6}"
    worker = start_worker(worker_env, [TINY], logs, name=name)
    key = keys.worker_report_key(worker.hostname)

    def served() -> int:
        raw = client.get(key)
        return int(json.loads(raw)["served"]) if raw else 0

    try:
        first = wait_for(lambda: served() or None)
        t_first = time.perf_counter()
        wait_for(lambda: served() >= count)
        elapsed = time.perf_counter() - t_first
    finally:
        worker.stop()
    return (count - first) / elapsed


def recorder_cost_us(env: dict[str, str]) -> float:
    """CPU microseconds per request of ``MetricsRecorder.observe`` (batches of 32)."""
    from common.contracts import ModelKey
    from common.settings import MetricsSettings
    from loader.batching import Item, Outcome
    from monitoring.metrics import MetricsRecorder

    recorder = MetricsRecorder(redis.Redis.from_url(env["REDIS_URL"]), MetricsSettings())
    key = ModelKey("tiny_mlp", "v1")
    batch = [
        Outcome(
            Item(key=key, inputs=None, single=True, ticket=None, received=0.0),
            value=None,
            batch_size=32,
            started=0.001,
            finished=0.002 + i * 1e-5,
        )
        for i in range(32)
    ]
    rounds = 2000 if QUICK else 10000
    started = time.process_time()
    for _ in range(rounds):
        recorder.observe(batch)
    cost = (time.process_time() - started) / (rounds * 32) * 1e6
    recorder.flush()
    return cost


def api_throughput(env: dict[str, str], logs: Path, seconds: float) -> dict[str, Any]:
    port = free_port()
    log = open(logs / "api.log", "ab")  # noqa: SIM115 - closed below
    api = subprocess.Popen(
        [sys.executable, "-m", "api"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env, "API_PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(url + "/openapi.json", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s=60)
        done = subprocess.run(
            [sys.executable, "-m", "bench.http_load", "--url", url, "--model", "tiny_mlp",
             "--outstanding", "64", "--seconds", str(seconds)],
            cwd=PROJECT_ROOT, env={**os.environ, **env}, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"HTTP load generator failed: {done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    finally:
        api.terminate()
        api.wait(15)
        log.close()


def run(env: dict[str, str], logs: Path) -> list[Row]:
    count = 4000 if QUICK else 15000
    rates: dict[bool, list[float]] = {True: [], False: []}
    for metrics in (True, False, True, False):
        rates[metrics].append(drain_rate(env, logs, metrics=metrics, count=count))
    on, off = max(rates[True]), max(rates[False])
    cost = recorder_cost_us(env)
    seconds = 4.0 if QUICK else 10.0
    worker = start_worker(env, [TINY], logs, name="api-bench")
    try:
        via_api = api_throughput(env, logs, seconds)
        via_delay = run_load(
            env, "--model", "tiny_mlp", "--outstanding", "64", "--seconds", str(seconds)
        )
    finally:
        worker.stop()
    return [
        Row.of(
            f"tiny_mlp: worker drain rate, metrics on (best of 2, {count} queued)",
            on,
            "inputs/s",
            off,
            "the same with METRICS_ENABLED=false (best of 2)",
        ),
        Row.of(
            "metrics recorder CPU per request (observe, batches of 32)",
            cost,
            "us",
            1e6 / off,
            "worker time per request at the drain rate, metrics off",
            higher_is_better=False,
        ),
        Row.of(
            "tiny_mlp: POST /predict inputs/s, 64 outstanding",
            via_api["throughput"],
            "inputs/s",
            via_delay["throughput"],
            "predict.delay from one process, 64 outstanding",
        ),
        Row.of(
            "tiny_mlp: POST /predict p50 at 64 outstanding",
            via_api["p50_ms"],
            "ms",
            via_delay["p50_ms"],
            "predict.delay, 64 outstanding",
            higher_is_better=False,
        ),
    ]

"""Serving benchmark: the tiny MLP and the small CNN on one worker process (one torch
thread); load generators in processes of their own. Baselines in the same run: the
worker's own drain rate (a pre-filled queue: the limit of this machine), the model called
in-process (one thread), and the plain Celery task a user writes first."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import numpy as np
import redis
import torch

from bench.common import QUICK, Row, fill_queue, report, run_load, run_loads, start_worker, wait_for
from common import keys
from loader.examples import write_examples
from loader.formats import load_module
from loader.repository import ModelRepository
from scaler.processes import WorkerProcess

SHAPES = {"tiny_mlp": (64,), "small_cnn": (3, 64, 64)}


def in_process_throughput(repo: Path, model: str, batch: int, seconds: float) -> float:
    """Inputs per second of the module called directly, one torch thread."""
    torch.set_num_threads(1)
    repository = ModelRepository(repo)
    spec = repository.spec(model, "v1")
    module = load_module(spec, repository.model_file(model, "v1", spec), torch.device("cpu"))
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((batch, *SHAPES[model])).astype(np.float32)
    )
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            module(x)
            n += batch
    return n / (time.perf_counter() - started)


def drain_rate(env: dict[str, str], worker: WorkerProcess, model: str, count: int) -> float:
    """Requests per second of the worker alone on a queue filled while it was frozen."""
    from tasks import broker

    client = redis.Redis.from_url(env["REDIS_URL"])
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        fill_queue(env["REDIS_URL"], model, np.zeros(SHAPES[model], np.float32), count)
    finally:
        started = time.perf_counter()
        os.kill(worker.pid, signal.SIGCONT)

    def drained() -> bool:
        load = broker.parse_load(broker.run(client, [broker.load_command()])[0])
        return not load.queued and not load.held

    wait_for(drained, timeout_s=300)
    return count / (time.perf_counter() - started)


def together(env: dict[str, str], processes: int, *args: str) -> float:
    """Inputs/s of ``processes`` load generators measuring the same seconds."""
    start_at = time.time() + 10  # they start (import, connect, warm up) before
    figures = run_loads(env, processes, *args, "--start-at", str(start_at))
    return sum(f["throughput"] for f in figures)


def run(env: dict[str, str], repo: Path, logs: Path) -> list[Row]:
    write_examples(repo)
    seconds = 4.0 if QUICK else 10.0
    count = 300 if QUICK else 1000
    rounds = 1 if QUICK else 2
    served: dict[str, dict[str, float]] = {}

    worker = start_worker(env, [keys.queue_name(m, "v1") for m in SHAPES], logs)
    try:
        for model in SHAPES:
            tput = run_load(env, "--model", model, "--outstanding", "64", "--seconds", str(seconds))
            stats = report(env, worker.hostname).get("batching", {}).get(f"{model}/v1", {})
            lat = run_load(
                env, "--model", model, "--count", str(count if model == "tiny_mlp" else count // 3)
            )
            served[model] = {
                "throughput": tput["throughput"],
                "p50": lat["p50_ms"],
                "p99": lat["p99_ms"],
                "batch": stats["rows"] / max(1, stats["batches"]) if stats else 1.0,
            }
        # The worker alone, then one and four producer processes (sync and asyncio) against
        # it, interleaved over the rounds; each figure is its best round (the same treatment
        # for the drain rate and the loads it is compared with, on a noisy machine).
        best: dict[str, float] = collections.defaultdict(float)
        tiny_load = ("--model", "tiny_mlp", "--seconds", str(seconds))
        for _ in range(rounds):
            rates = {
                "drain": drain_rate(env, worker, "tiny_mlp", 10_000 if QUICK else 20_000),
                "one": run_load(env, *tiny_load, "--outstanding", "64")["throughput"],
                "four": together(env, 4, *tiny_load, "--outstanding", "64"),
                "aio": run_load(env, "--aio", *tiny_load, "--outstanding", "256")["throughput"],
                "four_aio": together(env, 4, "--aio", *tiny_load, "--outstanding", "64"),
            }
            for name, rate in rates.items():
                best[name] = max(best[name], rate)
    finally:
        worker.stop()

    plain = WorkerProcess(
        "plain@bench",
        env=env,
        log_path=logs / "plain.log",
        extra_args=["-P", "solo", "-c", "1"],
        app="bench.plain_app",
    )
    try:
        baseline: dict[str, dict[str, float]] = {}
        for model in SHAPES:
            tput = run_load(
                env, "--plain", "--model", model, "--outstanding", "64", "--seconds", str(seconds)
            )
            lat = run_load(
                env,
                "--plain",
                "--model",
                model,
                "--count",
                str(count if model == "tiny_mlp" else count // 3),
            )
            baseline[model] = {
                "throughput": tput["throughput"],
                "p50": lat["p50_ms"],
                "p99": lat["p99_ms"],
            }
    finally:
        plain.stop()

    tiny, cnn = served["tiny_mlp"], served["small_cnn"]
    rows = [
        Row.of("tiny_mlp: worker drain rate, pre-filled queue", best["drain"], "inputs/s"),
        Row.of(
            "tiny_mlp: 1 producer process, 64 outstanding",
            tiny["throughput"],
            "inputs/s",
            baseline["tiny_mlp"]["throughput"],
            "plain Celery task, same load",
        ),
        Row.of(
            "tiny_mlp: 1 producer process, 64 outstanding, of the drain rate",
            best["one"],
            "inputs/s",
            best["drain"],
            "the worker's drain rate",
        ),
        Row.of(
            "tiny_mlp: 4 producer processes, 64 outstanding each",
            best["four"],
            "inputs/s",
            best["drain"],
            "the worker's drain rate",
        ),
        Row.of(
            "tiny_mlp: 4 producer processes, asyncio client, 64 in flight each",
            best["four_aio"],
            "inputs/s",
            best["drain"],
            "the worker's drain rate",
        ),
        Row.of(
            "tiny_mlp: asyncio client, 1 process, 256 in flight",
            best["aio"],
            "inputs/s",
            best["one"],
            "1 producer process, sync, 64 outstanding",
        ),
        Row.of(
            "tiny_mlp: p50 latency, concurrency 1",
            tiny["p50"],
            "ms",
            baseline["tiny_mlp"]["p50"],
            "plain Celery task",
            higher_is_better=False,
        ),
        Row.of(
            "tiny_mlp: p99 latency, concurrency 1",
            tiny["p99"],
            "ms",
            baseline["tiny_mlp"]["p99"],
            "plain Celery task",
            higher_is_better=False,
        ),
        Row.of(
            "small_cnn: 64 outstanding",
            cnn["throughput"],
            "inputs/s",
            baseline["small_cnn"]["throughput"],
            "plain Celery task, JSON lists",
        ),
        Row.of(
            "small_cnn: 64 outstanding, of the model in-process at batch 32",
            cnn["throughput"],
            "inputs/s",
            in_process_throughput(repo, "small_cnn", 32, seconds / 2),
            "in-process, batch 32, 1 thread",
        ),
        Row.of(
            "small_cnn: p50 latency, concurrency 1",
            cnn["p50"],
            "ms",
            baseline["small_cnn"]["p50"],
            "plain Celery task",
            higher_is_better=False,
        ),
        Row.of(
            "tiny_mlp: served batch size at 64 outstanding",
            tiny["batch"],
            "rows",
        ),
    ]
    return rows

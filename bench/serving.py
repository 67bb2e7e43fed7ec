"""Serving benchmark: the tiny MLP and the small CNN on one worker process (one torch
thread), the load generator in another process. Baselines in the same run: the model
called in-process (one thread) at batch 1 and at the served batch size, and the plain
Celery task a user writes first."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.common import QUICK, Row, report, run_load, start_worker
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


def run(env: dict[str, str], repo: Path, logs: Path) -> list[Row]:
    write_examples(repo)
    seconds = 4.0 if QUICK else 10.0
    count = 300 if QUICK else 1000
    rows: list[Row] = []
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

    for model in SHAPES:
        s, b = served[model], baseline[model]
        batch = max(1, round(s["batch"]))
        one = in_process_throughput(repo, model, 1, seconds / 2)
        batched = in_process_throughput(repo, model, batch, seconds / 2)
        rows += [
            Row.of(
                f"{model}: served inputs/s, 64 outstanding",
                s["throughput"],
                "inputs/s",
                b["throughput"],
                "plain Celery task, JSON lists",
            ),
            Row.of(
                f"{model}: served inputs/s vs in-process at the served batch ({batch})",
                s["throughput"],
                "inputs/s",
                batched,
                f"in-process, batch {batch}, 1 thread",
            ),
            Row.of(
                f"{model}: served inputs/s vs in-process at batch 1",
                s["throughput"],
                "inputs/s",
                one,
                "in-process, batch 1, 1 thread",
            ),
            Row.of(
                f"{model}: p50 latency, concurrency 1",
                s["p50"],
                "ms",
                b["p50"],
                "plain Celery task",
                higher_is_better=False,
            ),
            Row.of(
                f"{model}: p99 latency, concurrency 1",
                s["p99"],
                "ms",
                b["p99"],
                "plain Celery task",
                higher_is_better=False,
            ),
        ]
    return rows

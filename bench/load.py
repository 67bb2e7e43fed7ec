"""Load generator, run in its own process: ``python -m bench.load --model tiny_mlp ...``.

Keeps ``--outstanding`` requests in flight for ``--seconds`` (one thread: a sliding window
of ``predict.delay(...)`` and ``.get()``; with ``--aio``, one event loop of
``await predict.aio(...)`` calls), or sends ``--count`` requests one after another, and
prints one JSON line of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from typing import Any

import numpy as np

from bench.figures import print_figures

SHAPES = {"tiny_mlp": (64,), "small_cnn": (3, 64, 64)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--plain", action="store_true", help="the plain Celery baseline task")
    parser.add_argument("--aio", action="store_true", help="the asyncio client")
    parser.add_argument("--outstanding", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=0, help="sequential requests (latency)")
    parser.add_argument(
        "--start-at", type=float, default=0.0, help="epoch time to start measuring (in step)"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(SHAPES[args.model]).astype(np.float32) for _ in range(16)]
    if args.aio:
        asyncio.run(run_aio(args.model, inputs, args.outstanding, args.seconds, args.start_at))
        return
    if args.plain:
        from bench.plain_app import plain_predict

        payloads: list[Any] = [x.tolist() for x in inputs]

        def send(i: int) -> Any:
            return plain_predict.delay(args.model, payloads[i % 16])
    else:
        from tasks import predict

        def send(i: int) -> Any:
            return predict.delay(args.model, inputs[i % 16])

    for i in range(20):  # warm the path: connections, subscriptions, model load
        send(i).get(timeout=120)
    wait_until(args.start_at)

    latencies: list[float] = []
    started = time.perf_counter()
    if args.count:
        for i in range(args.count):
            t0 = time.perf_counter()
            send(i).get(timeout=60)
            latencies.append(time.perf_counter() - t0)
    else:
        window: collections.deque[tuple[float, Any]] = collections.deque()
        deadline = started + args.seconds
        i = 0
        while len(window) < args.outstanding:
            window.append((time.perf_counter(), send(i)))
            i += 1
        while window:
            sent_at, result = window.popleft()
            result.get(timeout=60)
            latencies.append(time.perf_counter() - sent_at)
            if time.perf_counter() < deadline:
                window.append((time.perf_counter(), send(i)))
                i += 1
    elapsed = time.perf_counter() - started
    print_figures(latencies, elapsed)


def wait_until(at: float) -> None:
    """Several generators measure the same seconds."""
    if at:
        time.sleep(max(0.0, at - time.time()))


async def run_aio(
    model: str, inputs: list[Any], outstanding: int, seconds: float, start_at: float
) -> None:
    from tasks import predict

    for i in range(20):
        await predict.aio(model, inputs[i % 16], timeout=120)
    wait_until(start_at)
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await predict.aio(model, inputs[i % 16], timeout=60)
            latencies.append(time.perf_counter() - t0)
            i += outstanding

    await asyncio.gather(*(caller(k) for k in range(outstanding)))
    print_figures(latencies, time.perf_counter() - started)


if __name__ == "__main__":
    main()

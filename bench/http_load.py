"""HTTP load generator, run in its own process: ``python -m bench.http_load --url ...``.

Keeps ``--outstanding`` ``POST /predict`` requests in flight for ``--seconds`` (aiohttp, one
event loop, one connection per outstanding request) and prints one JSON line of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import numpy as np

from bench.figures import print_figures

SHAPES = {"tiny_mlp": (64,), "small_cnn": (3, 64, 64)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--outstanding", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    bodies = [
        {"model": args.model, "inputs": rng.standard_normal(SHAPES[args.model]).tolist()}
        for _ in range(16)
    ]
    connector = aiohttp.TCPConnector(limit=args.outstanding + 4)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(args.url, connector=connector, timeout=timeout) as client:

        async def post(i: int) -> None:
            async with client.post("/predict", json=bodies[i % 16]) as response:
                response.raise_for_status()
                await response.read()

        for i in range(20):  # warm: connections, the model
            await post(i)
        latencies: list[float] = []
        deadline = time.perf_counter() + args.seconds

        async def user(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await post(i)
                latencies.append(time.perf_counter() - t0)
                i += args.outstanding

        started = time.perf_counter()
        await asyncio.gather(*(user(k) for k in range(args.outstanding)))
        elapsed = time.perf_counter() - started
    print_figures(latencies, elapsed)


if __name__ == "__main__":
    asyncio.run(main())

"""The one JSON line a load generator prints (it runs in its own process)."""

from __future__ import annotations

import json

import numpy as np


def print_figures(latencies: list[float], elapsed: float) -> None:
    lat = np.asarray(latencies) * 1000
    print(
        json.dumps(
            {
                "completed": len(latencies),
                "elapsed_s": elapsed,
                "throughput": len(latencies) / elapsed,
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
            }
        )
    )

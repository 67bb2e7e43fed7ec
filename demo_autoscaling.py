"""``make demo``: the whole stack on the embedded default, with a scripted workload.

Starts a private Redis-compatible server (unless REDIS_URL is set), writes the example
models, runs the scaler (the same loop ``celery -A workers beat`` runs) and sends traffic:
a first request from zero, a burst, round robin across two instances, a second model on
demand, two versions side by side, then silence until everything is back to zero and no
worker process runs. It prints a timeline of instances and queue depth, the scaling
decisions, the alerts raised, and the metrics history of the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORK = Path(tempfile.mkdtemp(prefix="inference-demo-"))


def prepare_environment() -> Any:
    """Start the embedded server and point every setting at it, before the app is imported."""
    from common.redis import EmbeddedRedis

    server = None
    if not os.environ.get("REDIS_URL"):
        server = EmbeddedRedis().start()
        os.environ["REDIS_URL"] = server.url
    os.environ.setdefault("MODEL_REPOSITORY", str(WORK / "models"))
    os.environ.setdefault("WORKER_TORCH_THREADS", "1")
    os.environ.setdefault("WORKER_REPORT_INTERVAL_S", "0.5")
    return server


class Timeline:
    """Samples instances and queue depth in the background and shows a progress line."""

    def __init__(self, autoscaler: Any) -> None:
        self.autoscaler = autoscaler
        self.rows: list[tuple[float, str, dict[str, int], dict[str, int], int]] = []
        self.phase = "starting"
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        print()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            stats = self.autoscaler.get_stats()
            instances = {k: v for k, v in stats["active_instances"].items() if v}
            queued = stats["queued"]
            workers = len(stats["workers"])
            t = time.monotonic() - self.started
            self.rows.append((t, self.phase, instances, queued, workers))
            shown = " ".join(f"{k}={v}" for k, v in sorted(instances.items())) or "none"
            depth = sum(queued.values())
            line = f"[{t:5.1f}s] {self.phase:34.34} workers={workers} queued={depth:<5} "
            line += f"instances: {shown}"
            if sys.stdout.isatty():
                sys.stdout.write("\r" + line[:140].ljust(140))
                sys.stdout.flush()
            elif phase_changed := (not self.rows[:-1] or self.rows[-2][1] != self.phase):
                print(line, flush=phase_changed)

    def print_table(self) -> None:
        print("\nTimeline (every second)")
        print(f"{'t (s)':>6}  {'phase':34} {'workers':>7} {'queued':>7}  instances")
        last = -1.0
        for t, phase, instances, queued, workers in self.rows:
            if t - last < 0.99:
                continue
            last = t
            shown = ", ".join(f"{k}={v}" for k, v in sorted(instances.items())) or "-"
            print(f"{t:6.1f}  {phase:34} {workers:>7} {sum(queued.values()):>7}  {shown}")


async def wait_until(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return False


async def run(server: Any) -> int:
    import numpy as np

    from loader.examples import write_examples
    from scaler import (
        Autoscaler,
        AutoscalerConfig,
        ColdStartStrategy,
        LoadBalancingStrategy,
        ZeroScalingConfig,
    )
    from tasks import predict

    write_examples(os.environ["MODEL_REPOSITORY"])
    config = AutoscalerConfig(
        tick_interval_s=0.5,
        scale_down_stabilization_s=3.0,
        target_load_per_instance=64,
        max_workers=3,
        zero_scaling=ZeroScalingConfig(
            scale_to_zero_delay=6.0,
            cold_start_strategy=ColdStartStrategy.HYBRID,
            preload_popular_models=False,
        ),
    )
    autoscaler = Autoscaler(config)
    alerts: list[str] = []
    autoscaler.add_alert_callback(lambda key, message: alerts.append(f"{key}: {message}"))
    await autoscaler.start()
    timeline = Timeline(autoscaler)
    timeline.start()
    summary: list[str] = []
    rng = np.random.default_rng(0)
    try:
        timeline.phase = "1. first request (from zero)"
        t0 = time.monotonic()
        await autoscaler.predict("tiny_mlp", rng.standard_normal(64).astype(np.float32))
        summary.append(
            f"tiny_mlp first request from zero answered in {time.monotonic() - t0:.2f} s "
            "(a worker process started, loaded the model)"
        )

        timeline.phase = "2. burst of 3000 on tiny_mlp"
        t0 = time.monotonic()
        inputs = rng.standard_normal((16, 64)).astype(np.float32)
        results = [predict.delay("tiny_mlp", inputs[i % 16]) for i in range(3000)]
        await asyncio.to_thread(lambda: [r.get(timeout=120) for r in results])
        peak = max((row[2].get("tiny_mlp/v1", 0) for row in timeline.rows), default=0)
        summary.append(
            f"burst of 3000 answered in {time.monotonic() - t0:.2f} s, "
            f"tiny_mlp peaked at {peak} instances"
        )

        timeline.phase = "3. round robin over 2 instances"
        await autoscaler.scale_model("tiny_mlp", 2)
        await wait_until(lambda: len(autoscaler.routable_instances("tiny_mlp")) == 2, 60)
        await autoscaler.set_load_balancing("tiny_mlp", LoadBalancingStrategy.ROUND_ROBIN)
        # Reports lag by up to a second: count from reports written after the burst.
        since = time.time()
        await wait_until(lambda: reported_since(autoscaler, since), 10)
        before = served_by_worker(autoscaler)
        results = [predict.delay("tiny_mlp", inputs[i % 16]) for i in range(600)]
        await asyncio.to_thread(lambda: [r.get(timeout=120) for r in results])
        await wait_until(  # the workers' next reports
            lambda: sum(served_by_worker(autoscaler).values()) - sum(before.values()) >= 600,
            timeout_s=10,
        )
        after = served_by_worker(autoscaler)
        shares = sorted(after[w] - before.get(w, 0) for w in after if after[w] > before.get(w, 0))
        summary.append(f"round robin: 600 tiny_mlp requests split {shares} over the instances")
        await autoscaler.set_load_balancing("tiny_mlp", None)
        await autoscaler.scale_model("tiny_mlp", None)

        timeline.phase = "4. second model on demand"
        t0 = time.monotonic()
        out = await autoscaler.predict(
            "small_cnn", rng.standard_normal((3, 64, 64)).astype(np.float32)
        )
        summary.append(
            f"small_cnn loaded on demand, first answer in {time.monotonic() - t0:.2f} s "
            f"(output {out.shape})"
        )

        timeline.phase = "5. linear v1 and v2 side by side"
        x = [1.0] * 8
        v1 = await autoscaler.predict("linear", x, version="v1")
        v2 = await autoscaler.predict("linear", x, version="v2")
        summary.append(f"linear v1 -> {[round(v, 3) for v in v1]}")
        summary.append(f"linear v2 -> {[round(v, 3) for v in v2]} (different weights)")

        timeline.phase = "6. idle: back to zero"
        t0 = time.monotonic()
        empty = await wait_until(lambda: not autoscaler.get_stats()["workers"], timeout_s=60)
        summary.append(
            f"every model back to zero and no worker process left after "
            f"{time.monotonic() - t0:.1f} s idle"
            if empty
            else "the fleet did not reach zero within 60 s"
        )
    finally:
        timeline.stop()
        await autoscaler.stop(stop_workers=True)
    timeline.print_table()
    print("\nScaling decisions")
    for d in reversed(autoscaler.store.decisions(100)):
        t = d["time"] - (time.time() - (time.monotonic() - timeline.started))
        print(
            f"  {t:6.1f}s  {d['model']}/{d['version']}: {d['from']} -> {d['to']}  ({d['reason']})"
        )
    print_metrics(autoscaler.get_metrics(int(time.monotonic() - timeline.started) + 5))
    print("\nAlerts raised")
    for line in alerts or ["none"]:
        print(f"  - {line}")
    print("\nSummary")
    for line in summary:
        print(f"  - {line}")
    return 0 if "did not reach zero" not in summary[-1] else 1


def reported_since(autoscaler: Any, since: float) -> bool:
    reports = autoscaler.store.live_reports()
    return bool(reports) and all(float(r.get("time", 0)) >= since for r in reports.values())


def served_by_worker(autoscaler: Any) -> dict[str, int]:
    reports = autoscaler.store.live_reports()
    return {name: int(r.get("served", 0)) for name, r in reports.items()}


def print_metrics(m: dict[str, Any]) -> None:
    print(f"\nMetrics of the run (last {m['window_seconds']} s, from the history in Redis)")
    print(
        f"  requests {m['requests']}, errors {m['errors']}, "
        f"{m['requests_per_second']} requests/s on average; "
        f"scale-ups {m['scale_up_events']} (cold starts {m['cold_starts']}), "
        f"scale-downs {m['scale_down_events']}"
    )
    print(f"  {'model':16} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'loads':>5} {'load ms':>8} {'hit rate':>8}")  # fmt: skip
    for model, s in m["models"].items():
        print(
            f"  {model:16} {s['requests']:>8} {s['p50_response_time_ms'] or 0:>8.2f} "
            f"{s['p95_response_time_ms'] or 0:>8.2f} {s['p99_response_time_ms'] or 0:>8.2f} "
            f"{s['average_batch_size'] or 0:>6.1f} {s['model_loads']:>5} "
            f"{s['average_load_time_ms'] or 0:>8.0f} {s['cache_hit_rate'] or 0:>8.3f}"
        )
    print(
        f"  workers: CPU {m['cpu_usage_percent']}% on average, RSS {m['memory_rss_bytes']} "
        f"bytes, GPU: {m['gpu']}"
    )


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    server = prepare_environment()
    print(
        f"Redis: {os.environ['REDIS_URL']} ({'embedded' if server else 'REDIS_URL'}); "
        f"models and logs in {WORK}"
    )
    try:
        return asyncio.run(run(server))
    finally:
        if server is not None:
            server.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())

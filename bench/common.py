"""Shared pieces of the benchmarks: the stack under test, timing, result rows."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from common import keys
from common.redis import EmbeddedRedis
from scaler.processes import PROJECT_ROOT, WorkerProcess

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
RESULTS = PROJECT_ROOT / "bench" / "results" / "latest.json"


def fill_queue(url: str, model: str, inputs: Any, count: int) -> None:
    """``count`` requests for ``model``/v1 queued directly, 500 per round trip (the queue
    a drain-rate measurement starts from; their results go to a channel nobody reads)."""
    from tasks import broker

    client = redis.Redis.from_url(url)
    queue = keys.queue_name(model, "v1")
    commands: list[tuple[Any, ...]] = []
    for _ in range(count):
        message = broker.encode_task_message(
            "tasks.predict", broker.new_task_id(), (model, inputs), {"version": "v1"},
            queue=queue, serializer="tensor", reply_channel="bench:drain",
        )  # fmt: skip
        commands += broker.publish_commands(queue, 0, message)
        if len(commands) >= 1000:
            broker.run(client, commands)
            commands = []
    if commands:
        broker.run(client, commands)
    client.close()


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None

    @classmethod
    def of(
        cls,
        name: str,
        value: float,
        unit: str,
        baseline: float | None = None,
        baseline_name: str = "",
        higher_is_better: bool = True,
    ) -> Row:
        ratio = None
        if baseline:
            ratio = value / baseline if higher_is_better else baseline / value
        return cls(
            name,
            round(value, 3),
            unit,
            None if baseline is None else round(baseline, 3),
            baseline_name,
            None if ratio is None else round(ratio, 3),
        )


@contextlib.contextmanager
def stack_env(repo: Path) -> Iterator[dict[str, str]]:
    """A Redis (embedded unless REDIS_URL is set) and the environment that points at it."""
    url = os.environ.get("REDIS_URL")
    server = None if url else EmbeddedRedis().start()
    env = {
        "REDIS_URL": url or server.url,  # type: ignore[union-attr]
        "MODEL_REPOSITORY": str(repo),
        "WORKER_TORCH_THREADS": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    try:
        yield env
    finally:
        if server is not None:
            server.__exit__(None, None, None)


def wait_for(
    condition: Callable[[], Any], timeout_s: float = 120.0, what: str = "the set-up"
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)


def start_worker(
    env: dict[str, str], queues: list[str], log_dir: Path, name: str = "bench"
) -> WorkerProcess:
    worker = WorkerProcess(
        f"{name}@bench", queues=queues, env=env, log_path=log_dir / f"{name}.log"
    )
    client = redis.Redis.from_url(env["REDIS_URL"])
    wait_for(lambda: client.exists(keys.worker_report_key(worker.hostname)) or not worker.alive)
    if not worker.alive:
        raise RuntimeError(f"worker failed to start:\n{worker.log_tail()}")
    return worker


def report(env: dict[str, str], hostname: str) -> dict[str, Any]:
    raw = redis.Redis.from_url(env["REDIS_URL"]).get(keys.worker_report_key(hostname))
    return json.loads(raw) if raw else {}


def run_load(env: dict[str, str], *args: str) -> dict[str, Any]:
    return run_loads(env, 1, *args)[0]


def run_loads(env: dict[str, str], processes: int, *args: str) -> list[dict[str, Any]]:
    """``processes`` load generators at once, each with ``args``; their figures."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.load", *args],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    figures = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {err[-3000:]}")
        figures.append(json.loads(out.strip().splitlines()[-1]))
    return figures


def write_results(rows: list[Row], extra: dict[str, Any] | None = None) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing: list[dict[str, Any]] = []
    if extra and extra.get("merge") and RESULTS.exists():
        existing = [
            r for r in json.loads(RESULTS.read_text()) if r["name"] not in {x.name for x in rows}
        ]
    RESULTS.write_text(json.dumps(existing + [asdict(r) for r in rows], indent=2) + "\n")


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"{'measure':58} {'value':>10} {'unit':8} {'baseline':>10} {'ratio':>7}")
    for r in rows:
        base = "" if r.baseline is None else f"{r.baseline:10.3f}"
        ratio = "" if r.ratio is None else f"{r.ratio:6.2f}x"
        print(f"{r.name:58} {r.value:10.3f} {r.unit:8} {base:>10} {ratio:>7}")
        if r.baseline_name:
            print(f"{'':58}   baseline: {r.baseline_name}")


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-"))

"""The GPU path, checked on a machine with NVIDIA GPUs (``bench/gpu_check.sh``, a few
minutes): NVML readings in the node's and the workers' reports, one worker per GPU pinned
to it through a node agent, models placed on CUDA with their measured bytes, memory given
back after an unload and after a recycle, and the serving benchmark of tiny_mlp and
small_cnn on the GPU against the model called in-process on the same GPU.

Writes ``bench/results/gpu_check.json``: every check with what it read. ``--cpu`` runs the
same steps on a CPU worker (the checks that need CUDA are marked not run): it shows the
script works where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from bench.common import PROJECT_ROOT, run_load, stack_env, temp_dir, wait_for
from common import keys
from loader.examples import write_examples
from loader.formats import load_module
from loader.repository import ModelRepository
from monitoring.resources import gpu_count

RESULTS = PROJECT_ROOT / "bench" / "results" / "gpu_check.json"
SHAPES = {"tiny_mlp": (64,), "small_cnn": (3, 64, 64)}
MB = 1024**2


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def check(self, name: str, passed: bool | None, **read: Any) -> None:
        """``passed`` None: not run here (a CUDA check on the CPU)."""
        self.rows.append({"check": name, "passed": passed, **read})
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[passed]
        print(f"{mark} {name}: {json.dumps(read)}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if r["passed"] is False]


def in_process(repo: Path, model: str, device: torch.device, batch: int, seconds: float) -> float:
    """Inputs per second of the module called directly on ``device``."""
    repository = ModelRepository(repo)
    spec = repository.spec(model, "v1")
    module = load_module(spec, repository.model_file(model, "v1", spec), device)
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((batch, *SHAPES[model])).astype(np.float32)
    )
    with torch.inference_mode():
        for _ in range(5):
            module(x.to(device)).cpu()  # the worker copies in and out too
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            module(x.to(device)).cpu()
            n += batch
    return n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the same steps on a CPU worker")
    parser.add_argument("--seconds", type=float, default=10.0, help="each throughput run")
    args = parser.parse_args()
    gpus = gpu_count()
    if not gpus and not args.cpu:
        print("no NVIDIA GPU visible through NVML: nothing checked (--cpu runs the steps)")
        return 2
    cuda = not args.cpu
    root = temp_dir()
    repo = write_examples(root / "repo")
    checks = Checks()
    started = time.time()
    with stack_env(repo) as env:
        os.environ.update(env)
        from scaler.node import NodeBackend, live_nodes
        from scaler.store import ScalerStore
        from workers import app

        client = redis.Redis.from_url(env["REDIS_URL"])
        node_env = {**env, "NODE_NAME": "gpu-check", "NODE_REPORT_INTERVAL_S": "0.5"}
        if not cuda:
            node_env["NODE_MAX_WORKERS"] = "1"
        agent = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "node", "--name", "gpu-check"],
            cwd=PROJECT_ROOT,
            env={**os.environ, **node_env},
            stdout=open(root / "node.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        backend = NodeBackend(ScalerStore(client), env={"WORKER_TORCH_THREADS": "1"})
        try:
            node = wait_for(lambda: live_nodes(client).get("gpu-check"), 60, "the node agent")
            checks.check(
                "the node reports each GPU's memory (NVML)",
                (
                    len(node["gpus"]) == gpus
                    and all(g["memory_free_bytes"] > 0 for g in node["gpus"])
                )
                if cuda
                else None,
                gpus=node["gpus"],
                max_workers=node["max_workers"],
            )
            queues = [keys.queue_name(m, "v1") for m in SHAPES]
            records = [backend.start(queues) for _ in range(node["max_workers"])]
            backend._read_at = -1.0
            extra = backend.start(queues)
            checks.check(
                "one worker per GPU: another start is refused",
                extra is None and all(r is not None for r in records),
                started=[r.hostname for r in records if r is not None],
            )

            def reports() -> dict[str, dict[str, Any]] | None:
                found = {}
                for r in records:
                    assert r is not None
                    raw = client.get(keys.worker_report_key(r.hostname))
                    if raw is None:
                        return None
                    found[r.hostname] = json.loads(raw)
                return found

            first = wait_for(reports, 180, "every worker's first report")
            indexes = sorted(r["device_memory"].get("gpu") for r in first.values())
            checks.check(
                "each worker pinned to its own GPU (cuda:0 of its CUDA_VISIBLE_DEVICES)",
                (
                    indexes == list(range(gpus))
                    and all(r["device"] == "cuda:0" for r in first.values())
                )
                if cuda
                else None,
                devices={h: (r["device"], r["device_memory"].get("gpu")) for h, r in first.items()},
            )
            hostname = records[0].hostname  # type: ignore[union-attr]
            idle_used = first[hostname]["device_memory"].get("memory_used_bytes")

            def loaded() -> dict[str, Any] | None:
                report = json.loads(client.get(keys.worker_report_key(hostname)) or b"{}")
                names = {m["name"] for m in report.get("models", [])}
                return report if names >= set(SHAPES) else None

            def every_model(command: str) -> None:
                for model in SHAPES:
                    app.control.broadcast(
                        command,
                        arguments={"model": model, "version": "v1"},
                        destination=[hostname],
                        reply=False,
                    )

            every_model("preload_model")
            report = wait_for(loaded, 180, "both models loaded")
            measured = {m["name"]: m["measured_bytes"] for m in report["models"]}
            checks.check(
                "models placed on CUDA, their bytes measured by the CUDA allocator",
                (report["device"] == "cuda:0" and all(b > 0 for b in measured.values()))
                if cuda
                else all(b >= 0 for b in measured.values()),
                measured_bytes=measured,
            )
            loaded_used = report["device_memory"].get("memory_used_bytes")

            # The serving benchmark, on this worker's GPU, against the model in-process there.
            rows = []
            device = torch.device("cuda:0" if cuda else "cpu")
            torch.set_num_threads(1)
            for model in SHAPES:
                served = run_load(
                    env, "--model", model, "--outstanding", "64", "--seconds", str(args.seconds)
                )
                stats = json.loads(client.get(keys.worker_report_key(hostname)) or b"{}")
                batching = stats.get("batching", {}).get(f"{model}/v1", {})
                batch = max(1, round(batching.get("rows", 1) / max(1, batching.get("batches", 1))))
                baseline = in_process(repo, model, device, batch, args.seconds)
                rows.append(
                    {
                        "model": model,
                        "device": str(device),
                        "served_per_s": round(served["throughput"], 1),
                        "p50_ms": served.get("p50_ms"),
                        "in_process_per_s": round(baseline, 1),
                        "in_process_batch": batch,
                        "ratio": round(served["throughput"] / baseline, 3),
                    }
                )
                print(f"     {rows[-1]}", flush=True)
            checks.check("serving benchmark ran", True, rows=rows)

            every_model("unload_model")

            def unloaded() -> dict[str, Any] | None:
                report = json.loads(client.get(keys.worker_report_key(hostname)) or b"{}")
                return report if report and not report.get("models") else None

            report = wait_for(unloaded, 120, "both models unloaded")
            # The next reports read NVML after the allocator's cache was emptied.
            time.sleep(2)
            report = json.loads(client.get(keys.worker_report_key(hostname)) or b"{}")
            after_unload = report["device_memory"].get("memory_used_bytes")
            checks.check(
                "memory given back after an unload (NVML, within 64 MB of the idle worker)",
                (after_unload - idle_used <= 64 * MB) if cuda else None,
                idle_mb=idle_used and idle_used / MB,
                loaded_mb=loaded_used and loaded_used / MB,
                after_unload_mb=after_unload and after_unload / MB,
            )

            # A recycle: the worker stopped and a new one started on the same GPU.
            gpu_before = live_nodes(client)["gpu-check"]["gpus"]
            for record in records:
                backend.stop(record)  # type: ignore[arg-type]
            wait_for(
                lambda: not live_nodes(client).get("gpu-check", {}).get("workers"),
                120,
                "every worker stopped",
            )
            time.sleep(2)
            gpu_after = live_nodes(client)["gpu-check"]["gpus"]
            checks.check(
                "memory given back after a recycle (NVML free back to before the workers)",
                all(
                    after["memory_free_bytes"] >= node_gpu["memory_free_bytes"] - 64 * MB
                    for after, node_gpu in zip(gpu_after, node["gpus"], strict=True)
                )
                if cuda
                else None,
                free_before_workers_mb=[g["memory_free_bytes"] / MB for g in node["gpus"]],
                free_with_workers_mb=[g["memory_free_bytes"] / MB for g in gpu_before],
                free_after_mb=[g["memory_free_bytes"] / MB for g in gpu_after],
            )
        finally:
            agent.terminate()
            agent.wait(60)
    result = {
        "ran_on": "cuda" if cuda else "cpu (--cpu: the CUDA checks not run)",
        "gpus": gpus,
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
        "checks": checks.rows,
        "failed": checks.failed,
    }
    out = RESULTS if cuda else root / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(checks.rows)} checks, {len(checks.failed)} failed; written to {out}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Redis high availability with Sentinel: every component given ``REDIS_URL=sentinel://...``
(producers, a worker started by a node agent, the beat scaler, the API), the primary
SIGKILLed under load, the sentinels promote the replica and everything goes on there.

Counted: requests answered, refused, lost; processes that exited (none may).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bench.chaos_models import write_model
from common import keys
from common.contracts import ModelKey
from common.redis import die_with_parent
from scaler.store import ScalerStore
from tests.helpers import ROOT, ApiProcess, BeatProcess, ServiceProcess, wait_for
from tests.sentinels import MASTER, SentinelGroup

pytestmark = pytest.mark.timeout(240)


def test_the_primary_killed_under_load_the_replica_takes_over(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "echo", "echo_mlp", log_path=str(tmp_path / "executions.log"))
    (tmp_path / "scaler.json").write_text(
        json.dumps(
            {
                "tick_interval_s": 0.25,
                "backend": "nodes",
                "max_workers": 1,
                "zero_scaling": {"cold_start_strategy": "lazy", "scale_to_zero_delay": 600},
            }
        )
    )
    with SentinelGroup() as group:
        env = {
            "REDIS_URL": group.url,
            "REDIS_SENTINEL_MASTER": MASTER,
            "MODEL_REPOSITORY": str(repo),
            "MODEL_FACTORY_MODULES": "bench.chaos_models",
            "NODE_NAME": "sentinel-node",
            "NODE_MAX_WORKERS": "1",
            "NODE_REPORT_INTERVAL_S": "0.25",
            "SCALER_CONFIG_FILE": str(tmp_path / "scaler.json"),
        }
        primary = redis.Redis(port=group.primary.port)
        node = ServiceProcess(
            "node", ["-m", "celery", "-A", "workers", "node"], env=env, log_dir=tmp_path
        )
        beat = BeatProcess("beat", env=env, log_dir=tmp_path)
        api = ApiProcess("api", env=env, log_dir=tmp_path)
        services = {"node": node, "beat": beat, "api": api}
        try:
            api.wait_ready()
            ScalerStore(primary).set_override(ModelKey("echo", "v1"), {"instances": 1})

            def worker() -> dict[str, Any] | None:
                names = [keys.text(n) for n in primary.zrange(keys.WORKERS, 0, -1)]
                for name in names:
                    raw = primary.get(keys.worker_report_key(name))
                    report = json.loads(raw) if raw else {}
                    if any(m["name"] == "echo" for m in report.get("models", [])):
                        return report
                return None

            report = wait_for(worker, timeout_s=120, what=f"echo served\n{beat.log()}")

            out = tmp_path / "producer.json"
            spec = {"model": "echo", "first": 0, "count": 2000, "rate": 200, "threads": 8,
                    "out": str(out), "timeout": 30}  # fmt: skip
            producer = subprocess.Popen(
                [sys.executable, "-m", "bench.chaos", "--produce", json.dumps(spec)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stderr=open(tmp_path / "producer.log", "wb"),  # noqa: SIM115
                preexec_fn=die_with_parent,
            )
            wait_for(lambda: Path(f"{out}.started").exists(), timeout_s=60, what="load")
            # A few hundred requests into the load: the primary dies.
            log = tmp_path / "executions.log"
            wait_for(
                lambda: log.exists() and log.read_text().count("\n") >= 300,
                timeout_s=60,
                what=lambda: (
                    f"requests executed\n{(tmp_path / 'producer.log').read_text()}\n{node.log()}"
                ),
            )
            killed = time.monotonic()
            os.kill(group.primary.pid or 0, signal.SIGKILL)
            wait_for(
                lambda: group.primary_port() == group.replica.port,
                timeout_s=60,
                what="the sentinels to promote the replica",
            )
            promoted_after = time.monotonic() - killed
            assert producer.wait(timeout=150) == 0, (tmp_path / "producer.log").read_text()
            records = json.loads(out.read_text())["records"]
            outcomes = collections.Counter(outcome for _, _, outcome, _ in records)
            longest = max(wait for _, _, outcome, wait in records if outcome == "answered")
            print(
                f"\nsentinel failover: replica promoted {promoted_after:.1f} s after the kill; "
                f"{len(records)} requests: {dict(outcomes)}; longest answered wait {longest:.2f} s"
            )
            assert len(records) == 2000
            # Every request answered with its own answer. The only other outcome allowed: a
            # write the primary took but had not replicated when it died (asynchronous
            # replication), told to its caller as RequestLostError. None refused, none
            # left hanging without a word.
            assert outcomes["wrong"] == 0
            assert set(outcomes) <= {"answered", "RequestLostError"}, outcomes

            # The promoted replica serves: the same worker, the API, a new request.
            new = redis.Redis(port=group.replica.port)
            assert new.get(keys.worker_report_key(report["hostname"])) is not None
            answer = httpx.post(
                f"{api.url}/predict", json={"model": "echo", "inputs": [0.0] * 64}, timeout=30
            )
            assert answer.status_code == 200, answer.text
            for name, service in services.items():
                assert service.proc.poll() is None, f"{name} exited:\n{service.log()}"
            assert os.path.exists(f"/proc/{report['pid']}"), "the worker exited"
        finally:
            for service in services.values():
                service.stop()

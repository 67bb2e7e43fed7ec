"""Health checks and failover with real workers and a real beat scaler: a model whose probe
starts failing leaves routing after ``max_consecutive_failures`` and comes back after the
cooldown; a worker SIGKILLed with requests waiting on its own queue loses none of them, and
they are answered long before the visibility timeout would have brought them back."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from common import keys
from common.contracts import ModelKey
from scaler.autoscaler import Autoscaler
from scaler.config import AutoscalerConfig, LoadBalancingStrategy
from scaler.store import ScalerStore
from tests.helpers import BeatProcess, WorkerProcess, wait_for, write_state_dict_model

pytestmark = pytest.mark.timeout(180)

SCALER = {"SCALER_BACKEND": "static", "SCALER_TICK_INTERVAL_S": "0.25"}


@pytest.fixture
def repo(tmp_path: Path, example_repo: Path, client: redis.Redis) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(example_repo, root)
    return root


def members(client: redis.Redis, text: str) -> list[str]:
    raw = client.hget(keys.INSTANCES, text)
    return json.loads(raw) if raw else []


def test_a_failing_probe_takes_the_instance_out_and_the_cooldown_brings_it_back(
    client: redis.Redis, repo: Path, tmp_path: Path
) -> None:
    from loader.registry import publish_registry
    from loader.repository import ModelRepository

    fail = tmp_path / "fail-now"
    write_state_dict_model(
        repo, "flaky", "v1", factory="flaky", factory_kwargs={"fail_path": str(fail)}
    )
    publish_registry(client, ModelRepository(repo).registry())
    ScalerStore(client).set_override(ModelKey("flaky", "v1"), {"instances": 1})
    env = {
        "MODEL_REPOSITORY": str(repo),
        "WORKER_HEALTH_CHECK_INTERVAL_S": "0.2",
        "WORKER_HEALTH_MAX_FAILURES": "3",
        "WORKER_HEALTH_COOLDOWN_S": "3",
    }
    worker = WorkerProcess(
        "health-w1",
        queues=[keys.queue_name("flaky", "v1")],
        env={**env, "WORKER_MODELS": "flaky:v1"},
        log_dir=tmp_path,
    )
    beat = BeatProcess("health-beat", env={**env, **SCALER}, log_dir=tmp_path)
    autoscaler = Autoscaler(AutoscalerConfig(backend="static"), run_scaler=False)
    try:
        worker.wait_ready(client)
        wait_for(lambda: members(client, "flaky/v1"), timeout_s=60, what="flaky/v1 routable")
        health = autoscaler.get_health_status()["instances"]["flaky/v1"][worker.hostname]
        assert health["state"] == "healthy" and health["routable"]

        fail.touch()
        started = time.monotonic()
        wait_for(lambda: not members(client, "flaky/v1"), timeout_s=30, what="out of routing")
        out_after = time.monotonic() - started
        health = autoscaler.get_health_status()["instances"]["flaky/v1"][worker.hostname]
        assert health["state"] == "unhealthy" and not health["routable"]
        assert "failing on purpose" in health["reason"]
        assert health["failures"] >= 3
        # 3 probes 0.2 s apart: not before the third failure (a tick may add 0.25 s)
        assert out_after >= 0.4, out_after

        fail.unlink()
        wait_for(
            lambda: members(client, "flaky/v1") == [worker.hostname],
            timeout_s=60,
            what="back in routing after the cooldown",
        )
        back_after = time.monotonic() - started
        assert back_after >= 3.0, back_after  # not before the cooldown
        state = autoscaler.get_health_status()["instances"]["flaky/v1"][worker.hostname]
        assert state["state"] == "healthy"
        from tasks import predict

        assert predict.delay("flaky", [1.0, 2.0, 3.0, 4.0]).get(timeout=30) == [2, 4, 6, 8]
    finally:
        beat.stop()
        worker.stop(timeout_s=15)
        asyncio.run(autoscaler.stop())


def test_a_killed_worker_s_own_queue_is_failed_over_at_once(
    client: redis.Redis, repo: Path, tmp_path: Path
) -> None:
    from loader.registry import publish_registry
    from loader.repository import ModelRepository
    from tasks import predict
    from tasks.producer import shared_producer

    log = tmp_path / "executions.log"
    log.touch()
    write_state_dict_model(
        repo, "slow", "v1", factory="recorder",
        factory_kwargs={"delay_s": 0.3, "log_path": str(log)}, batching={"max_batch_size": 4},
    )  # fmt: skip
    publish_registry(client, ModelRepository(repo).registry())
    ScalerStore(client).set_override(ModelKey("slow", "v1"), {"instances": 2})
    # A visibility timeout far beyond the test: only the failover can bring the requests back.
    env = {"MODEL_REPOSITORY": str(repo), "VISIBILITY_TIMEOUT_S": "300"}
    worker_env = {**env, "WORKER_MODELS": "slow:v1", "WORKER_PREFETCH_COUNT": "4"}
    queue = keys.queue_name("slow", "v1")
    victim = WorkerProcess("victim", queues=[queue], env=worker_env, log_dir=tmp_path)
    other = WorkerProcess("other", queues=[queue], env=worker_env, log_dir=tmp_path)
    beat = BeatProcess("failover-beat", env={**env, **SCALER}, log_dir=tmp_path)
    autoscaler = Autoscaler(AutoscalerConfig(backend="static"), run_scaler=False)
    try:
        victim.wait_ready(client)
        other.wait_ready(client)
        wait_for(lambda: len(members(client, "slow/v1")) == 2, timeout_s=60, what="two instances")
        asyncio.run(autoscaler.set_load_balancing("slow", LoadBalancingStrategy.ROUND_ROBIN))
        shared_producer().balancer.forget()
        results = [predict.delay("slow", np.full(4, i, dtype=np.float32)) for i in range(40)]
        own_queue = keys.instance_queue("slow", "v1", victim.hostname)
        wait_for(
            lambda: client.llen(own_queue) >= 8, timeout_s=10, what="requests waiting on the victim"
        )
        waiting = client.llen(own_queue)
        victim.kill()
        killed = time.monotonic()
        answers = [r.get(timeout=60) for r in results]
        last_answer_s = time.monotonic() - killed
        print(
            f"\n{waiting} waiting on the killed worker's queue; last answer {last_answer_s:.2f} s"
        )
        assert [a[0] for a in answers] == [2.0 * i for i in range(40)]
        assert client.llen(own_queue) == 0
        assert last_answer_s < 30  # the visibility timeout is 300 s
        executed = {int(line.split()[0]) for line in log.read_text().splitlines()}
        assert executed == set(range(40))
        decisions = json.loads(client.get(keys.SCALER_STATUS) or "{}")
        assert victim.hostname not in decisions.get("workers", {})
        # The failover is in the scaler's decisions log (the dashboard shows it).
        gone = [
            d["reason"]
            for d in ScalerStore(client).decisions()
            if d["reason"].startswith(f"worker {victim.hostname} gone: ")
        ]
        assert len(gone) == 1 and int(gone[0].split(": ")[1].split()[0]) > 0, gone
    finally:
        beat.stop()
        for worker in (victim, other):
            worker.stop(timeout_s=15)
        asyncio.run(autoscaler.stop())


def test_requests_sent_to_an_unhealthy_instance_are_forwarded(
    client: redis.Redis, repo: Path, tmp_path: Path
) -> None:
    """A producer whose view of the instances is stale still loses nothing: the sick
    instance sends what reaches its own queue to the shared queue, a healthy one answers."""
    from loader.registry import publish_registry
    from loader.repository import ModelRepository
    from tasks import predict
    from tasks.producer import shared_producer

    fail = tmp_path / "sick"
    write_state_dict_model(repo, "flaky", "v1", factory="flaky")
    publish_registry(client, ModelRepository(repo).registry())
    ScalerStore(client).set_override(ModelKey("flaky", "v1"), {"instances": 2})
    env = {
        "MODEL_REPOSITORY": str(repo),
        "WORKER_MODELS": "flaky:v1",
        "WORKER_HEALTH_CHECK_INTERVAL_S": "0.2",
        "WORKER_HEALTH_COOLDOWN_S": "300",
    }
    queue = keys.queue_name("flaky", "v1")
    sick = WorkerProcess(
        "sick", queues=[queue], env={**env, "FLAKY_FAIL_PATH": str(fail)}, log_dir=tmp_path
    )
    well = WorkerProcess("well", queues=[queue], env=env, log_dir=tmp_path)
    beat = BeatProcess("forward-beat", env={**env, **SCALER}, log_dir=tmp_path)
    autoscaler = Autoscaler(AutoscalerConfig(backend="static"), run_scaler=False)
    producer = shared_producer()
    balancer = producer.balancer
    try:
        sick.wait_ready(client)
        well.wait_ready(client)
        wait_for(lambda: len(members(client, "flaky/v1")) == 2, timeout_s=60, what="2 instances")
        asyncio.run(autoscaler.set_load_balancing("flaky", LoadBalancingStrategy.ROUND_ROBIN))
        balancer.forget()
        producer.run(balancer.routing("flaky", "v1"))
        balancer.ttl_s = 3600  # this producer keeps routing to both
        fail.touch()
        wait_for(
            lambda: members(client, "flaky/v1") == [well.hostname],
            timeout_s=30,
            what="the sick instance out of routing",
        )
        results = [predict.delay("flaky", [float(i)] * 4) for i in range(40)]
        assert [r.get(timeout=60)[0] for r in results] == [2.0 * i for i in range(40)]
        state = client.hgetall(keys.routing_state_key("flaky", "v1"))
        assert int(state.get(f"inflight:{sick.hostname}".encode(), 0)) == 0
        assert (
            "failing on purpose"
            in (autoscaler.get_health_status()["instances"]["flaky/v1"][sick.hostname]["reason"])
        )
    finally:
        balancer.ttl_s = 1.0
        balancer.forget()
        beat.stop()
        for worker in (sick, well):
            worker.stop(timeout_s=15)
        asyncio.run(autoscaler.stop())

"""The scaler's Redis store: queue depths over every priority list, the leader lock,
manual overrides."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from common.contracts import ModelKey
from loader.registry import publish_registry
from loader.repository import ModelRepository
from scaler.backends import StaticBackend
from scaler.store import FleetRecord, ScalerStore
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


def test_depth_counts_every_priority_sub_queue(client: redis.Redis, test_repo: Path) -> None:
    from tasks import predict

    publish_registry(client, ModelRepository(test_repo).registry())
    store = ScalerStore(client)
    predict.apply_async(("linear", [1.0] * 8), kwargs={"version": "v1"})
    predict.apply_async(("linear", [1.0] * 8), kwargs={"version": "v1"}, priority=6)
    predict.apply_async(("linear", [1.0] * 8), kwargs={"version": "v2"}, priority=9)
    queued = store.read(time.time()).snapshot.queued
    assert queued == {ModelKey("linear", "v1"): 2, ModelKey("linear", "v2"): 1}


def test_one_leader_until_its_lock_expires(client: redis.Redis) -> None:
    first, second = ScalerStore(client), ScalerStore(client)
    assert first.lead(0.5) and not second.lead(0.5)
    assert first.lead(0.5)  # renewal
    wait_for(lambda: second.lead(0.5), timeout_s=5, what="the lock to pass on")
    assert not first.lead(0.5)
    second.resign()
    assert first.lead(0.5)


def test_overrides_reach_the_snapshot(client: redis.Redis, test_repo: Path) -> None:
    publish_registry(client, ModelRepository(test_repo).registry())
    store = ScalerStore(client)
    store.set_override(ModelKey("linear", "v1"), {"instances": 2})
    store.set_override(ModelKey("linear", "v2"), {"load": True})
    store.set_override(ModelKey("tiny_mlp", "v1"), {"unload_at": 5.0})
    snapshot = store.read(time.time()).snapshot
    assert snapshot.pins == {ModelKey("linear", "v1"): 2}
    assert snapshot.loads == {ModelKey("linear", "v2")}
    assert snapshot.unloads == {ModelKey("tiny_mlp", "v1"): 5.0}
    assert snapshot.models[ModelKey("small_cnn", "v1")] > 1_000_000  # file size as estimate
    store.set_override(ModelKey("linear", "v1"), None)
    assert store.read(time.time()).snapshot.pins == {}


def test_the_local_backend_pins_one_worker_per_gpu(client: redis.Redis) -> None:
    import socket
    import subprocess
    import sys

    from scaler.backends import LocalBackend

    store = ScalerStore(client)
    backend = LocalBackend(store, gpus=2)
    assert backend.free_gpu() == 0
    hostname = f"scaled-fake@{socket.gethostname()}"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", hostname])
    try:
        store.fleet_add(
            FleetRecord(
                hostname=hostname,
                pid=holder.pid,
                host=socket.gethostname(),
                started_at=time.time(),
                gpu=0,
            )
        )
        assert backend.free_gpu() == 1
        store.fleet_add(
            FleetRecord(
                hostname=hostname + "2",
                pid=holder.pid,
                host=socket.gethostname(),
                started_at=time.time(),
                gpu=1,
            )
        )
        assert backend.free_gpu() == 1  # that record's process is not running: GPU 1 is free
        assert backend.gpu_env(1) == {
            "CUDA_VISIBLE_DEVICES": "1",
            "WORKER_DEVICE": "cuda:0",
            "WORKER_NVML_INDEX": "1",
        }
    finally:
        holder.kill()
        holder.wait()
    assert backend.free_gpu() == 0  # its worker is gone: the GPU is free again
    assert LocalBackend(store, gpus=0).free_gpu() is None


def test_a_cold_start_past_its_timeout_is_recorded_once(
    client: redis.Redis, test_repo: Path
) -> None:
    from common import keys
    from scaler.backends import StaticBackend
    from scaler.config import AutoscalerConfig, ZeroScalingConfig
    from scaler.loop import ScalerLoop
    from workers import app

    publish_registry(client, ModelRepository(test_repo).registry())
    client.lpush(keys.queue_name("linear", "v1"), "waiting")
    config = AutoscalerConfig(
        backend="static", zero_scaling=ZeroScalingConfig(cold_start_timeout=5.0)
    )
    loop = ScalerLoop(config, client=client, app=app, backend=StaticBackend())
    now = time.time()
    for t in (now, now + 3, now + 6, now + 9):
        loop.tick(t)
    reasons = [json_reason["reason"] for json_reason in loop.store.decisions()]
    assert reasons.count("cold start exceeded cold_start_timeout (5 s)") == 1
    assert any(r.startswith("cold start: 1 requests waiting") for r in reasons)


class _RecordingBackend(StaticBackend):
    """A static fleet that records what it was asked to stop."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def stop(self, record: FleetRecord) -> None:
        self.stopped.append(record.hostname)


def test_a_worker_that_keeps_its_memory_after_an_unload_is_recycled(client: redis.Redis) -> None:
    import json

    from common import keys
    from scaler.config import AutoscalerConfig
    from scaler.loop import ScalerLoop
    from scaler.policy import RECYCLE_MIN_BYTES
    from workers import app

    backend = _RecordingBackend()
    loop = ScalerLoop(AutoscalerConfig(backend="static"), client=client, app=app, backend=backend)
    size = 2 * RECYCLE_MIN_BYTES

    def report(name: str, rss: int, models: list[dict[str, object]]) -> None:
        client.set(keys.worker_report_key(name), json.dumps({
            "hostname": name, "queues": [], "models": models, "busy": {},
            "resources": {"rss_bytes": rss}, "time": time.time(), "report_interval_s": 10,
        }))  # fmt: skip
        client.zadd(keys.WORKERS, {name: time.time() + 60})

    big = [{"name": "linear", "version": "v1", "bytes": size, "load_time_s": 1.0}]
    for name in ("kept", "freed"):
        loop.store.fleet_add(FleetRecord(hostname=name, pid=1, host="h", started_at=0.0, seen=True))
        report(name, 10 * size, big)
    now = time.time()
    loop.tick(now)  # nobody wants linear/v1: both are told to unload it
    report("kept", 10 * size, [])  # RSS did not move
    report("freed", 9 * size, [])  # RSS fell by the model's size
    loop.tick(now + 5)  # the unload is seen in the reports
    assert backend.stopped == []
    loop.tick(now + 10)  # three ticks later: judged
    assert backend.stopped == ["kept"]
    assert any("recycled: memory not returned" in d["reason"] for d in loop.store.decisions())


def test_popularity_decays_and_grows(client: redis.Redis) -> None:
    store = ScalerStore(client)
    a, b = ModelKey("a", "v1"), ModelKey("b", "v1")
    store.add_popularity({a: 10.0}, decay=1.0)
    store.add_popularity({b: 4.0}, decay=0.5)
    snapshot_scores = {
        k.decode(): float(v) for k, v in client.hgetall("inference:popularity").items()
    }
    assert snapshot_scores == {"a/v1": 5.0, "b/v1": 4.0}
    for _ in range(12):
        store.add_popularity({}, decay=0.5)
    assert client.hgetall("inference:popularity") == {}  # decayed below 0.01: forgotten


def test_the_load_is_exact_while_a_worker_holds_requests(
    start_worker: Any, test_repo: Path, tmp_path: Path, client: redis.Redis
) -> None:
    """Queued (shared and instance queues) plus held by workers, read in one step: exactly
    the requests not yet answered, with the worker frozen at any point of its work."""
    import os
    import signal

    import numpy as np

    from common import keys
    from tasks import broker, predict
    from tests.helpers import write_slow_recorder

    queue = write_slow_recorder(test_repo, tmp_path / "slow.log", delay_s=0.2)
    worker = start_worker(
        "holder", queues=[queue], repo=test_repo,
        env={"WORKER_PREFETCH_COUNT": "8", "WORKER_MODELS": "slow:v1"},
    )  # fmt: skip
    results = [predict.delay("slow", np.full(4, i, np.float32)) for i in range(1, 41)]
    key = ModelKey("slow", "v1")
    for _ in range(3):
        wait_for(lambda: client.hget(keys.HELD_COUNTS, "slow/v1"), what="requests held")
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            # A request a producer routed to this instance while it was frozen counts too.
            instance = keys.instance_queue("slow", "v1", worker.hostname)
            broker.run(client, broker.publish_commands(instance, 0, b"x"))
            snapshot = ScalerStore(client).read(time.time()).snapshot
            answered = sum(1 for r in results if client.exists(broker.result_key(r.id)))
            assert snapshot.load(key) == 40 - answered + 1
            assert 0 < snapshot.held[key] <= 8
            client.delete(instance)
        finally:
            os.kill(worker.pid, signal.SIGCONT)

        def progressed(before: int = answered) -> bool:
            return sum(1 for r in results if client.exists(broker.result_key(r.id))) > before

        wait_for(progressed, what="another batch answered before the next freeze")
    assert [float(r.get(timeout=60)[0]) for r in results] == [2.0 * i for i in range(1, 41)]


def test_a_scale_down_keeps_its_choice_while_reports_lag(
    client: redis.Redis, test_repo: Path
) -> None:
    """Workers report the cancel a moment later; in between their load changes. The next
    tick must not pick another survivor (and cancel the one it kept)."""
    import json

    from common import keys
    from common.contracts import ModelKey
    from scaler.config import AutoscalerConfig
    from scaler.loop import ScalerLoop
    from workers import app

    publish_registry(client, ModelRepository(test_repo).registry())
    loop = ScalerLoop(
        AutoscalerConfig(backend="static"), client=client, app=app, backend=_RecordingBackend()
    )
    linear = ModelKey("linear", "v1")
    loop.store.set_override(linear, {"instances": 1})
    model = [{"name": "linear", "version": "v1", "bytes": 1024, "load_time_s": 0.1}]

    def report(busy: dict[str, int]) -> None:
        for name, n in busy.items():
            client.set(keys.worker_report_key(name), json.dumps({
                "hostname": name, "queues": [keys.queue_name(*linear)], "models": model,
                "busy": {"linear/v1": n}, "time": time.time(), "report_interval_s": 10,
            }))  # fmt: skip
            client.zadd(keys.WORKERS, {name: time.time() + 60})

    def keepers(now: float) -> set[str]:
        plan = loop.tick(now).plan
        assert plan is not None
        return {n for n, held in plan.assignments.items() if linear in held}

    now = time.time()
    report({"a": 9, "b": 1, "c": 0})
    assert keepers(now) == {"a"}  # the busiest keeps its instance
    report({"a": 0, "b": 1, "c": 9})  # the same queues: the cancels are not applied yet
    assert keepers(now + 0.25) == {"a"}
    assert keepers(now + 0.5) == {"a"}


def test_a_version_taken_to_zero_leaves_the_served_set_in_the_same_tick(
    client: redis.Redis, test_repo: Path
) -> None:
    """Producers poke the scaler only for versions not in the served set: a version the
    scaler scales to zero must leave it when its workers are told to stop, or a request
    arriving in between waits a whole tick for its cold start."""
    import json

    from common import keys
    from common.contracts import ModelKey
    from scaler.config import AutoscalerConfig
    from scaler.loop import ScalerLoop
    from workers import app

    publish_registry(client, ModelRepository(test_repo).registry())
    loop = ScalerLoop(
        AutoscalerConfig(backend="static"), client=client, app=app, backend=_RecordingBackend()
    )
    linear = ModelKey("linear", "v1")
    client.set(keys.worker_report_key("a"), json.dumps({
        "hostname": "a", "queues": [keys.queue_name(*linear)],
        "models": [{"name": "linear", "version": "v1", "bytes": 1024, "load_time_s": 0.1}],
        "busy": {}, "time": time.time(), "report_interval_s": 10,
    }))  # fmt: skip
    client.zadd(keys.WORKERS, {"a": time.time() + 60})
    loop.store.set_override(linear, {"instances": 1})
    loop.tick(time.time())
    assert client.smembers(keys.SERVED) == {b"linear/v1"}
    loop.store.set_override(linear, {"instances": 0})
    plan = loop.tick(time.time()).plan
    assert plan is not None and linear not in plan.assignments.get("a", set())
    assert client.smembers(keys.SERVED) == set()


def test_measured_model_bytes_are_learned_and_kept_in_redis(client: redis.Redis) -> None:
    from common import keys
    from scaler.store import ScalerStore

    def report(measured: int) -> dict[str, Any]:
        return {"models": [{"name": "a", "version": "v1", "measured_bytes": measured}]}

    store = ScalerStore(client)
    store._learn_bytes({"w1": report(500), "w2": report(700)})
    assert int(client.hget(keys.MODEL_BYTES, "a/v1")) == 700  # the most it took
    store._learn_bytes({"w1": report(300)})
    assert int(client.hget(keys.MODEL_BYTES, "a/v1")) == 700
    # A new scaler starts from what Redis keeps.
    fresh = ScalerStore(client)
    fresh._learn_bytes({})
    assert fresh._measured == {ModelKey("a", "v1"): 700}

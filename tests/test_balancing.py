"""Load-balancing strategies and traffic split with real workers and a real beat scaler:
the distribution each strategy produces over 1,000 requests, counted by the worker process
that ran each one (the recorder model logs its pid per row)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from common import keys
from common.contracts import ModelKey
from scaler.autoscaler import Autoscaler
from scaler.config import AutoscalerConfig, LoadBalancingStrategy
from scaler.store import ScalerStore
from tasks.balancing import build_ring, ring_lookup
from tests.helpers import BeatProcess, WorkerProcess, wait_for, write_state_dict_model

pytestmark = pytest.mark.timeout(180)

N = 1000


class Fleet:
    def __init__(self, client: redis.Redis, log: Path, workers: dict[str, WorkerProcess]) -> None:
        self.client = client
        self.log = log
        self.workers = workers
        self.pids = {
            json.loads(client.get(keys.worker_report_key(w.hostname)))["pid"]: name
            for name, w in workers.items()
        }
        self.autoscaler = Autoscaler(AutoscalerConfig(backend="static"), run_scaler=False)

    def executions(self) -> list[tuple[int, str]]:
        rows = []
        for line in self.log.read_text().splitlines():
            value, _batch, pid = line.split()
            rows.append((int(value), self.pids[int(pid)]))
        return rows

    def send(self, count: int, *, key: str | None = None, start: int = 0) -> Counter[str]:
        """``count`` requests, 64 outstanding; which worker ran each."""
        from tasks import predict
        from tasks.producer import shared_producer

        shared_producer().balancer.forget()  # see the new strategy now
        before = len(self.executions())
        pending = []
        for i in range(start, start + count):
            kwargs: dict[str, Any] = {"version": "v1"}
            if key is not None:
                kwargs["key"] = key
            pending.append(predict.apply_async(("rec", np.full(4, i, dtype=np.float32)), kwargs))
            if len(pending) >= 64:
                pending.pop(0).get(timeout=60)
        for result in pending:
            result.get(timeout=60)
        rows = wait_for(
            lambda: (r := self.executions()) and len(r) >= before + count and r,
            timeout_s=30,
            what="every execution logged",
        )
        # Health probes run zeros through the model: requests are numbered from 1.
        return Counter(name for value, name in rows[before:] if value)

    def strategy(self, strategy: LoadBalancingStrategy, **kw: Any) -> None:
        asyncio.run(self.autoscaler.set_load_balancing("rec", strategy, **kw))


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, example_repo: Path, redis_server: Any
) -> Iterator[Fleet]:
    redis_server.start()
    root = tmp_path_factory.mktemp("balancing")
    repo = root / "repo"
    shutil.copytree(example_repo, repo)
    log = root / "executions.log"
    log.touch()
    write_state_dict_model(
        repo, "rec", "v1", factory="slowed", factory_kwargs={"log_path": str(log)},
        batching={"max_batch_size": 8},
    )  # fmt: skip
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    from loader.registry import publish_registry
    from loader.repository import ModelRepository

    publish_registry(client, ModelRepository(repo).registry())
    store = ScalerStore(client)
    for key, n in ((ModelKey("rec", "v1"), 2), (ModelKey("linear", "v1"), 1),
                   (ModelKey("linear", "v2"), 1)):  # fmt: skip
        store.set_override(key, {"instances": n})
    env = {"MODEL_REPOSITORY": str(repo)}
    queues = [keys.queue_name("rec", "v1"), keys.queue_name("linear", "v1"),
              keys.queue_name("linear", "v2")]  # fmt: skip
    fast = WorkerProcess(
        "fast", queues=queues, env={**env, "WORKER_MODELS": "rec:v1,linear"}, log_dir=root
    )
    slow = WorkerProcess(
        "slow",
        queues=[keys.queue_name("rec", "v1")],
        env={**env, "WORKER_MODELS": "rec:v1", "RECORDER_EXTRA_DELAY_S": "0.01"},
        log_dir=root,
    )
    workers = {"fast": fast, "slow": slow}
    beat = None
    try:
        # Both report before the scaler's first plan: a plan made while only "slow" had
        # reported puts the pinned linear versions there, and keeps them there.
        for worker in workers.values():
            worker.wait_ready(client)
        beat = BeatProcess(
            "beat",
            env={**env, "SCALER_BACKEND": "static", "SCALER_TICK_INTERVAL_S": "0.25"},
            log_dir=root,
        )

        def both_members() -> bool:
            raw = client.hget(keys.INSTANCES, "rec/v1")
            return raw is not None and len(json.loads(raw)) == 2

        wait_for(both_members, timeout_s=60, what="two healthy rec/v1 instances")
        yield Fleet(client, log, workers)
    finally:
        if beat is not None:
            beat.stop()
        for worker in workers.values():
            worker.stop(timeout_s=15)


def test_routable_instances_are_both_workers(fleet: Fleet) -> None:
    hostnames = sorted(w.hostname for w in fleet.workers.values())
    assert fleet.autoscaler.routable_instances("rec") == hostnames
    fast = [fleet.workers["fast"].hostname]
    # linear/v2 loads beside rec/v1 on "fast": routable once loaded and the scaler has ticked
    wait_for(
        lambda: fleet.autoscaler.routable_instances("linear", "v2") == fast,
        timeout_s=30,
        what="linear/v2 routable on the fast worker",
    )


def test_round_robin_is_even_within_one(fleet: Fleet) -> None:
    fleet.strategy(LoadBalancingStrategy.ROUND_ROBIN)
    counts = fleet.send(N)
    assert abs(counts["fast"] - counts["slow"]) <= 1, counts


def test_weighted_round_robin_keeps_the_weights(fleet: Fleet) -> None:
    fast = fleet.workers["fast"].hostname
    slow = fleet.workers["slow"].hostname
    fleet.strategy(LoadBalancingStrategy.WEIGHTED_ROUND_ROBIN, weights={fast: 3, slow: 1})
    counts = fleet.send(N)
    assert abs(counts["fast"] / N - 0.75) <= 0.03, counts


def test_least_response_time_prefers_the_faster_instance(fleet: Fleet) -> None:
    fleet.strategy(LoadBalancingStrategy.LEAST_RESPONSE_TIME)
    fleet.send(100)  # both report a latency
    wait_for(
        lambda: len(fleet.client.hgetall(keys.routing_state_key("rec", "v1"))) >= 4,
        timeout_s=10,
        what="latencies of both instances",
    )
    counts = fleet.send(N)
    assert counts["fast"] > 2 * counts["slow"], counts


def test_least_connections_and_in_flight_returns_to_zero(fleet: Fleet) -> None:
    fleet.strategy(LoadBalancingStrategy.LEAST_CONNECTIONS)
    counts = fleet.send(N)
    assert counts["fast"] > counts["slow"] > 0, counts
    state = fleet.client.hgetall(keys.routing_state_key("rec", "v1"))
    in_flight = {k: int(v) for k, v in state.items() if k.startswith(b"inflight:")}
    assert set(in_flight.values()) == {0}, in_flight


def test_consistent_hash_keeps_a_key_on_its_instance(fleet: Fleet) -> None:
    fleet.strategy(LoadBalancingStrategy.CONSISTENT_HASH)
    for key in ("user-1", "user-2", "user-3"):
        counts = fleet.send(40, key=key)
        assert len(counts) == 1, (key, counts)
    # keyed by the input bytes: the same input, the same instance; inputs spread
    counts = fleet.send(200)
    assert set(counts) == {"fast", "slow"}, counts
    fleet.strategy(LoadBalancingStrategy.SHARED_QUEUE)


def test_adding_an_instance_moves_about_one_in_n_keys() -> None:
    keys_ = [f"key-{i}".encode() for i in range(N)]
    three = build_ring(["a", "b", "c"])
    four = build_ring(["a", "b", "c", "d"])
    before = {k: ring_lookup(three, k) for k in keys_}
    after = {k: ring_lookup(four, k) for k in keys_}
    moved = [k for k in keys_ if before[k] != after[k]]
    assert all(after[k] == "d" for k in moved)  # only to the new instance
    assert 0.15 <= len(moved) / N <= 0.35, len(moved) / N
    spread = Counter(after.values())
    assert min(spread.values()) > N / 4 * 0.6, spread


def test_a_version_split_of_90_10(fleet: Fleet) -> None:
    from tasks import predict

    x = np.arange(8, dtype=np.float32)
    outputs = {}
    for version in ("v1", "v2"):
        outputs[version] = np.asarray(predict.delay("linear", x, version=version).get(timeout=60))
    split = asyncio.run(fleet.autoscaler.set_traffic_split("linear", {"v1": 90, "v2": 10}))
    assert split["weights"] == {"v1": 90, "v2": 10}
    results = [predict.delay("linear", x) for _ in range(N)]
    seen: Counter[str] = Counter()
    for result in results:
        out = np.asarray(result.get(timeout=60))
        seen["v1" if np.allclose(out, outputs["v1"]) else "v2"] += 1
    assert abs(seen["v2"] / N - 0.10) <= 0.03, seen
    asyncio.run(fleet.autoscaler.set_traffic_split("linear", None, default_version="v2"))
    assert np.allclose(np.asarray(predict.delay("linear", x).get(timeout=60)), outputs["v2"])
    asyncio.run(fleet.autoscaler.set_traffic_split("linear", None))
    assert np.allclose(np.asarray(predict.delay("linear", x).get(timeout=60)), outputs["v1"])
    with pytest.raises(Exception, match="has no version 'v9'"):
        asyncio.run(fleet.autoscaler.set_traffic_split("linear", {"v9": 1}))

"""Faults counted: Redis restarted again and again under load, workers killed while
producers publish, payloads over the limit. Nothing accepted by a live Redis is lost,
no worker exits, and what a Redis without persistence lost fails its callers with a
typed error at their timeout."""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError

from common import keys
from common.errors import PayloadTooLargeError, RequestLostError
from common.redis import EmbeddedRedis
from common.settings import ServingSettings
from tasks.producer import Call, Producer
from tests.helpers import WorkerProcess, wait_for, write_slow_recorder

pytestmark = pytest.mark.timeout(240)

RESTARTS = 10


def executions(log: Path) -> collections.Counter[int]:
    """Rows run per request id (id 0 is the warm-up and health probe row)."""
    if not log.exists():
        return collections.Counter()
    ids = (int(line.split()[0]) for line in log.read_text().splitlines())
    return collections.Counter(i for i in ids if i != 0)


class Stack:
    """A Redis of the test's own (so it can be restarted), one worker, a producer."""

    def __init__(self, tmp_path: Path, repo: Path, *, persistent: bool, prefetch: int) -> None:
        extra = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
        self.server = EmbeddedRedis(extra_args=["--save", "", *extra]).start()
        self.log = tmp_path / "slow.log"
        self.queue = write_slow_recorder(repo, self.log, delay_s=0.05)
        env = {
            "REDIS_URL": self.server.url,
            "MODEL_REPOSITORY": str(repo),
            "VISIBILITY_TIMEOUT_S": "30",
            "WORKER_MODELS": "slow:v1",
            "WORKER_PREFETCH_COUNT": str(prefetch),
        }
        self.worker = WorkerProcess("steady", queues=[self.queue], env=env, log_dir=tmp_path)
        self.client = redis.Redis.from_url(self.server.url)
        self.worker.wait_ready(self.client)
        settings = ServingSettings(redis_url=self.server.url, registry_cache_s=0)
        self.producer = Producer(settings)
        self.next_id = 1

    def send(self, n: int) -> list[tuple[int, Any]]:
        from workers import app

        sent = []
        for _ in range(n):
            i, self.next_id = self.next_id, self.next_id + 1
            call = Call("slow", np.full(4, i, np.float32), version="v1")
            sent.append((i, self.producer.send(call, app)))
        return sent

    def restart(self, sig: signal.Signals) -> None:
        self.server.restart(sig)

    def close(self) -> None:
        self.worker.stop(timeout_s=15)
        self.client.close()
        self.server.__exit__(None, None, None)


@pytest.fixture
def stack(tmp_path: Path, test_repo: Path, request: pytest.FixtureRequest) -> Any:
    persistent, prefetch = request.param
    s = Stack(tmp_path, test_repo, persistent=persistent, prefetch=prefetch)
    yield s
    s.close()


@pytest.mark.parametrize("stack", [(True, 64)], indirect=True, ids=["persistent"])
def test_ten_redis_restarts_under_load_lose_nothing(stack: Stack) -> None:
    """Restarts with SIGTERM and SIGKILL, the worker busy and idle: no worker exit, no
    request lost, none run twice (AOF with appendfsync always keeps what was accepted)."""
    answered: dict[int, float] = {}
    exits = 0
    for cycle in range(RESTARTS):
        busy = cycle % 2 == 0
        sig = signal.SIGKILL if cycle % 4 < 2 else signal.SIGTERM
        in_flight = stack.send(12) if busy else []
        if busy:  # the restart catches requests queued, held and running
            wait_for(lambda: executions(stack.log), timeout_s=30, what="the batches to start")
        stack.restart(sig)
        after = stack.send(4)
        for i, result in in_flight + after:
            answered[i] = float(result.get(timeout=60)[0])
        exits += int(not stack.worker.alive)
        assert stack.worker.alive, stack.worker.log()
    counts = executions(stack.log)
    sent = stack.next_id - 1
    lost = [i for i in range(1, sent + 1) if i not in answered]
    twice = sum(c - 1 for c in counts.values() if c > 1)
    print(
        f"\n{RESTARTS} Redis restarts (SIGKILL and SIGTERM, busy and idle), {sent} requests: "
        f"answered {len(answered)}, lost {len(lost)}, run twice {twice}, worker exits {exits}"
    )
    assert answered == {i: 2.0 * i for i in range(1, sent + 1)}
    assert lost == [] and exits == 0 and twice == 0
    assert "Unrecoverable" not in stack.worker.log()


@pytest.mark.parametrize("stack", [(False, 8)], indirect=True, ids=["no-persistence"])
def test_what_a_restarted_redis_lost_fails_at_the_timeout_with_a_typed_error(
    stack: Stack,
) -> None:
    """Without persistence a restart drops the queue: those callers hear RequestLostError
    at their timeout; what the worker held (8 of 24) is answered; the worker serves on."""
    outcomes: collections.Counter[str] = collections.Counter()
    for sig in (signal.SIGKILL, signal.SIGTERM):
        in_flight = stack.send(24)
        wait_for(lambda: executions(stack.log), timeout_s=30, what="the batches to start")
        stack.restart(sig)
        deadline = time.monotonic() + 8
        for _, result in in_flight:
            try:
                result.get(timeout=max(deadline - time.monotonic(), 0.01))
                outcomes["answered"] += 1
            except RequestLostError:
                outcomes["lost with Redis, told so"] += 1
            except CeleryTimeoutError:
                outcomes["timed out silently"] += 1
        assert stack.worker.alive, stack.worker.log()
        stack.log.unlink(missing_ok=True)
    (i, fresh), *_ = stack.send(1)
    assert float(fresh.get(timeout=60)[0]) == 2.0 * i
    print(f"\ntwo restarts without persistence, 48 requests: {dict(outcomes)}")
    assert outcomes["timed out silently"] == 0
    assert outcomes["answered"] >= 8  # what the worker held survived in its memory
    assert outcomes["lost with Redis, told so"] > 0  # the queue did not


@pytest.mark.parametrize("stack", [(True, 64)], indirect=True, ids=["persistent"])
def test_a_worker_killed_as_requests_arrive_loses_none(
    stack: Stack, tmp_path: Path, test_repo: Path
) -> None:
    """SIGKILL a worker the moment requests are published to it (idle, or busy): what it
    took is in its held hash, and comes back to the queue when its lease ends."""
    env = {
        "REDIS_URL": stack.server.url,
        "MODEL_REPOSITORY": str(test_repo),
        "VISIBILITY_TIMEOUT_S": "3",
        "UNACKED_RESTORE_INTERVAL_S": "0.5",
        "WORKER_MODELS": "slow:v1",
    }
    stack.worker.stop(timeout_s=15)
    answered: dict[int, float] = {}
    for k in range(4):
        victim = WorkerProcess(f"victim{k}", queues=[stack.queue], env=env, log_dir=tmp_path)
        victim.wait_ready(stack.client)
        if k % 2:  # busy: let it take and start running some first
            warm = stack.send(8)
            wait_for(lambda: executions(stack.log), timeout_s=30, what="a batch running")
        else:
            warm = []
        sent = stack.send(4)
        victim.kill()
        rescuer = WorkerProcess(f"rescuer{k}", queues=[stack.queue], env=env, log_dir=tmp_path)
        try:
            for i, result in warm + sent:
                answered[i] = float(result.get(timeout=60)[0])
        finally:
            rescuer.stop(timeout_s=15)
    total = stack.next_id - 1
    print(f"\n4 workers killed as requests arrived: {len(answered)} of {total} answered")
    assert answered == {i: 2.0 * i for i in range(1, total + 1)}
    assert stack.client.hgetall(keys.HELD_COUNTS) == {}


def test_a_list_over_the_payload_limit_is_refused_at_the_producer(
    client: redis.Redis, test_repo: Path
) -> None:
    from loader.registry import publish_registry
    from loader.repository import ModelRepository
    from tasks import predict

    publish_registry(client, ModelRepository(test_repo).registry())
    queue = keys.queue_name("linear", "v1")
    with pytest.raises(PayloadTooLargeError, match="MAX_PAYLOAD_BYTES"):
        predict.delay("linear", [0.0] * 10_000_000)  # 10 M numbers: refused before encoding
    with pytest.raises(PayloadTooLargeError, match="MAX_PAYLOAD_BYTES"):
        predict.delay("linear", [[0.123456789] * 1000] * 2000)  # refused once encoded
    assert client.llen(queue) == 0
    predict.delay("linear", [1.0] * 8)
    assert client.llen(queue) == 1

"""The producer's publish path: a request is written without waiting for Redis's
acknowledgement (it is read with the results that follow). A refusal fails its call; a
connection lost before the acknowledgement is made again and the request sent again only
if Redis does not have it; held writes go out without the thread coming back; a process
that exits right after ``delay()`` does not cut its requests off; the envelope template
packs what the full packing packs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError

from common import keys
from common.errors import BrokerUnavailableError
from loader.registry import publish_registry
from loader.repository import ModelRepository
from tasks import broker, codec
from tasks.producer import Call
from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.timeout(120)

QUEUE = keys.queue_name("linear", "v1")  # no worker serves it here: requests stay queued


@pytest.fixture
def registry(client: redis.Redis, test_repo: Path) -> Iterator[redis.Redis]:
    publish_registry(client, ModelRepository(test_repo).registry())
    yield client
    client.config_set("maxmemory", 0)


def in_own_thread(scenario: Callable[[], Any]) -> Any:
    """A thread of its own: a fresh reply channel (one per thread), as a new caller has."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = scenario()
        except BaseException as exc:  # handed to the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def channel_client(client: redis.Redis, channel: str) -> str:
    """The id of the connection a producer thread publishes on (named after its channel)."""
    for entry in client.client_list():
        if entry.get("name") == channel:
            return str(entry["id"])
    raise AssertionError(f"no connection named {channel}")


def warm_channel(registry: redis.Redis) -> Any:
    """This thread's channel, connected, with its model's queue empty."""
    from tasks.replies import replies_for

    send()
    registry.delete(QUEUE)
    return replies_for().channel()


def send(n: int = 1) -> list[Any]:
    from tasks import predict

    return [predict.delay("linear", [float(i)] * 8) for i in range(n)]


def test_a_refused_request_fails_its_call_with_the_reason(registry: redis.Redis) -> None:
    def scenario() -> None:
        send()  # connects, subscribes
        registry.config_set("maxmemory-policy", "noeviction")
        registry.config_set("maxmemory", 1)  # every write is refused (OOM)
        (result,) = send()
        with pytest.raises(BrokerUnavailableError, match="was not queued: Redis refused it: OOM"):
            result.get(timeout=10)

    in_own_thread(scenario)


def test_a_refused_request_fails_its_await_with_the_reason(registry: redis.Redis) -> None:
    from tasks.producer import AsyncInferenceClient

    async def scenario() -> None:
        client = AsyncInferenceClient()
        try:
            await client.start()  # connects, subscribes
            registry.config_set("maxmemory-policy", "noeviction")
            registry.config_set("maxmemory", 1)
            with pytest.raises(BrokerUnavailableError, match="not queued: Redis refused it: OOM"):
                await client.predict("linear", [1.0] * 8, timeout=10)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_request_redis_ran_before_the_connection_was_lost_is_not_sent_twice(
    registry: redis.Redis,
) -> None:
    from common.resp3 import Unacked
    from tasks.producer import shared_producer
    from tasks.routing import run_sync

    def scenario() -> None:
        channel = warm_channel(registry)
        producer = shared_producer()
        prepared = run_sync(
            producer.prepare(Call("linear", [1.0] * 8), channel.name), channel.execute
        )
        channel.publish(prepared)
        wait_for(lambda: registry.llen(QUEUE) == 1, what="the request queued")
        channel.execute([("PING",)])  # its acknowledgement is read
        # As if Redis ran it and the connection went before the reply came back.
        channel.conn.orphans.append(Unacked(prepared, prepared.commands))
        registry.client_kill_filter(_id=channel_client(registry, channel.name))
        channel.execute([("PING",)])  # reconnects: it is found in its queue
        assert registry.llen(QUEUE) == 1 and not channel.conn.orphans

    in_own_thread(scenario)


def test_a_request_redis_never_ran_is_sent_again_on_the_new_connection(
    registry: redis.Redis,
) -> None:
    def scenario() -> None:
        channel = warm_channel(registry)
        registry.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            (result,) = send()  # held by the pause: not run, not acknowledged
            wait_for(lambda: channel.conn.unacked, what="the write in flight")
            registry.client_kill_filter(_id=channel_client(registry, channel.name))
        finally:
            registry.execute_command("CLIENT", "UNPAUSE")
        assert registry.llen(QUEUE) == 0  # the killed connection's command never ran
        with pytest.raises(CeleryTimeoutError):  # no worker; the read finds the loss
            result.get(timeout=1)
        assert registry.llen(QUEUE) == 1  # sent again once the read found the loss

    in_own_thread(scenario)


def test_an_await_whose_write_the_lost_connection_took_is_sent_again(
    registry: redis.Redis,
) -> None:
    """The asyncio client, as the thread's channel: a request written but not acknowledged
    when the connection went is sent again on the next one (not failed)."""
    from tasks.producer import AsyncInferenceClient

    async def scenario() -> None:
        client = AsyncInferenceClient()
        try:
            await client.start()
            registry.delete(QUEUE)
            registry.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:
                pending = await client.submit(Call("linear", [1.0] * 8))
                for _ in range(200):  # written (the flush runs on the loop), not answered
                    await asyncio.sleep(0.01)
                    if client.replies.conn._pending:
                        break
                registry.client_kill_filter(_id=channel_client(registry, client.replies.name))
            finally:
                registry.execute_command("CLIENT", "UNPAUSE")
            for _ in range(500):  # reconnects, finds it missing, sends it again
                await asyncio.sleep(0.01)
                if registry.llen(QUEUE) == 1:
                    break
            assert registry.llen(QUEUE) == 1
            # Still waiting for its answer (no worker here), not failed.
            with pytest.raises(CeleryTimeoutError):
                await client.result(pending, timeout=0.5)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_held_requests_go_out_while_the_thread_does_something_else(
    registry: redis.Redis, redis_server: Any
) -> None:
    from common.settings import ServingSettings
    from tasks.producer import Call, Producer
    from tasks.replies import replies_for
    from workers import app

    # Lookups cached (as in production): publishing does no read of its own.
    producer = Producer(ServingSettings(redis_url=redis_server.url, registry_cache_s=2))

    def scenario() -> None:
        def burst(n: int) -> list[Any]:
            return [producer.send(Call("linear", [float(i)] * 8), app) for i in range(n)]

        burst(1)  # warm: connected, lookups cached
        registry.delete(QUEUE)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1.0)  # no other thread runs until this one pauses
        try:
            results = burst(5)  # the first goes out at once, the rest are held behind it
            assert replies_for().channel().conn.holding
        finally:
            sys.setswitchinterval(switch)
        # This thread does not read: the flusher writes them.
        wait_for(lambda: registry.llen(QUEUE) == 5, timeout_s=5, what="the held requests")
        assert len(results) == 5

    in_own_thread(scenario)


def test_a_script_that_exits_right_after_delay_loses_nothing(
    registry: redis.Redis, tmp_path: Path
) -> None:
    registry.delete(QUEUE)
    script = tmp_path / "burst.py"
    script.write_text(
        "from tasks import predict\n"
        "for i in range(50):\n"
        "    predict.delay('linear', [float(i)] * 8)\n"
    )
    # Lookups cached (as in production): the requests behind the first are held.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REGISTRY_CACHE_S": "2"}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=60)
    assert registry.llen(QUEUE) == 50


@pytest.mark.parametrize("body_bytes", [0, 40, 300, 70_000, 200_000])
@pytest.mark.parametrize("reply_channel", [None, "inference:reply:abc"])
@pytest.mark.parametrize("priority", [0, 6])
@pytest.mark.parametrize("expires_s", [None, 0.0, 30.0, 86_400.5])
def test_the_envelope_template_packs_what_the_full_packing_packs(
    body_bytes: int, reply_channel: str | None, priority: int, expires_s: float | None
) -> None:
    inputs = np.arange(body_bytes // 4, dtype=np.float32)
    task_id = broker.new_task_id()
    expires = None if expires_s is None else broker.expires_at(expires_s)
    expiry = broker._expiry(expires)
    with (
        mock.patch.object(broker.time, "time", return_value=1234.5678),
        mock.patch.object(broker, "_expiry", return_value=expiry),
    ):
        templated = broker.encode_task_message(
            "tasks.predict", task_id, ("m", inputs), {"version": "v1"}, queue="model.m.v1",
            serializer=codec.SERIALIZER, reply_channel=reply_channel, priority=priority,
            expires=expires,
        )  # fmt: skip
    body = codec.dumps((["m", inputs], {"version": "v1"}, broker._EMBED))
    full = broker._pack_envelope(
        "tasks.predict", task_id, body, codec.CONTENT_TYPE, "binary", queue="model.m.v1",
        priority=priority, expiry=expiry, reply_channel=reply_channel, headers=None,
        published=1234.5678,
    )  # fmt: skip
    assert templated == full
    key = ("tasks.predict", "model.m.v1", reply_channel, priority, codec.CONTENT_TYPE, "binary")
    template = broker._Template.build((*key, expiry is not None))
    assert template is not None and template.fill(task_id.encode(), body, 1234.5678, expiry) == full
    decoded = broker.decode_task_message(templated, accept=["tensor"], max_body_bytes=1 << 20)
    assert decoded.task_id == task_id and decoded.reply_channel == reply_channel
    assert decoded.expires == expires
    np.testing.assert_array_equal(decoded.args[1], inputs)


def test_a_traffic_change_made_in_this_process_applies_to_its_next_request(
    registry: redis.Redis, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With lookups cached (as in production) the route a request took is reused for a
    moment; a split or balancing change made here must not wait for that moment."""
    from common.settings import ServingSettings
    from scaler import Autoscaler, AutoscalerConfig
    from tasks import producer as producer_module
    from tasks.producer import Producer

    producer = Producer(ServingSettings(redis_url=redis_server.url, registry_cache_s=2))
    monkeypatch.setattr(producer_module, "_producer", producer)
    v1, v2 = keys.queue_name("linear", "v1"), keys.queue_name("linear", "v2")
    registry.delete(v1, v2)
    autoscaler = Autoscaler(AutoscalerConfig(backend="static"))

    def sent_to() -> str:
        before = {q: registry.llen(q) for q in (v1, v2)}
        in_own_thread(lambda: send(1))
        after = {q: registry.llen(q) for q in (v1, v2)}
        (queue,) = [q for q in (v1, v2) if after[q] > before[q]]
        return queue

    assert sent_to() == v1  # the default version; the route is now cached
    asyncio.run(autoscaler.set_traffic_split("linear", None, default_version="v2"))
    assert sent_to() == v2
    asyncio.run(autoscaler.set_traffic_split("linear", None))
    assert sent_to() == v1


def test_inputs_that_cannot_be_sent_are_a_schema_error(registry: redis.Redis) -> None:
    from common.errors import SchemaError
    from tasks import predict

    for bad in ([object()] * 8, [1.0] * 7 + [1j], [1.0] * 7 + [{"x": 1j}]):
        with pytest.raises(SchemaError, match="linear/v1 cannot be sent"):
            predict.delay("linear", bad)
    assert registry.llen(QUEUE) == 0


def test_a_registry_lost_with_redis_does_not_fail_a_producer_that_saw_it(
    registry: redis.Redis, test_repo: Path
) -> None:
    """Redis restarted without persistence forgets the registry until the scaler or a
    worker publishes it again: a producer that knew the model keeps its last entry; one
    that never saw a registry is told at once."""
    from common.errors import RegistryUnavailableError
    from tasks.routing import RegistryView, run_sync

    def execute(commands: Any) -> list[Any]:
        return broker.run(registry, commands)

    seen, fresh = RegistryView(ttl_s=0), RegistryView(ttl_s=0)
    assert run_sync(seen.resolve("linear", None), execute) == "v1"
    registry.delete(keys.REGISTRY)
    seen.forget()  # as a producer does when it sees Redis restarted
    assert run_sync(seen.resolve("linear", "v2"), execute) == "v2"
    with pytest.raises(RegistryUnavailableError, match="registry is empty"):
        run_sync(fresh.resolve("linear", None), execute)
    publish_registry(registry, ModelRepository(test_repo).registry())
    with pytest.raises(Exception, match="unknown model 'nope'"):
        run_sync(seen.resolve("nope", None), execute)


def test_a_full_redis_keeps_answering_what_it_accepted(
    registry: redis.Redis, start_worker: Any
) -> None:
    """At maxmemory with noeviction a producer is refused at once, while the consumer's
    scripts (fetch, answer, acknowledge, heartbeat) still write: what was queued is
    answered, nothing is refused half way. A worker started while Redis is full waits for
    room (Celery's own start-up writes are refused) instead of exiting."""
    worker = start_worker("full", queues=[QUEUE], env={"WORKER_MODELS": "linear:v1"})
    worker.proc.send_signal(signal.SIGSTOP)  # requests pile up while it is frozen
    try:
        accepted = send(40)
        wait_for(
            lambda: (
                registry.llen(QUEUE) + int(registry.hget(keys.HELD_COUNTS, "linear/v1") or 0) == 40
            ),
            what="40 queued or held",
        )
        used = int(registry.info("memory")["used_memory"])
        registry.config_set("maxmemory-policy", "noeviction")
        registry.config_set("maxmemory", used - 64 * 1024)  # full: every growing write refused
        (refused,) = send()
        with pytest.raises(BrokerUnavailableError, match="OOM"):
            refused.get(timeout=10)
        # Once refused, the channel waits for Redis's answer: the error comes at delay().
        with pytest.raises(BrokerUnavailableError, match="was not queued: Redis refused it: OOM"):
            send()
        late = start_worker("late", queues=[QUEUE], wait=False)
        waiting = wait_for(
            lambda: "used memory > 'maxmemory'" in late.log() or not late.alive, timeout_s=60
        )
        assert waiting and late.alive, late.log()
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    answers = [r.get(timeout=60) for r in accepted]
    assert len(answers) == 40 and all(len(a) == 4 for a in answers)
    assert registry.llen(QUEUE) == 0 and worker.alive
    assert registry.hget(keys.HELD_COUNTS, "linear/v1") is None
    registry.config_set("maxmemory", 0)
    late.wait_ready(registry)

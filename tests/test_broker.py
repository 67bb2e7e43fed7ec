"""Contract tests of the broker layer against real kombu, Celery and Redis: a kombu or
Celery release that changes the message, priority or result layout fails here."""

from __future__ import annotations

import base64
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from kombu import Connection, Exchange, Producer
from kombu.serialization import loads

from common import keys
from loader.registry import publish_registry
from loader.repository import ModelRepository
from tasks import broker
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

QUEUE = keys.queue_name("linear", "v1")
LABEL = "linear/v1"


def consumer(name: str = "w@contract", queue: str = QUEUE) -> broker.ConsumerState:
    state = broker.ConsumerState(name)
    instance = keys.instance_queue("linear", "v1", name)
    state.set_sources([broker.Source(queue, queue, LABEL), broker.Source(instance, queue, LABEL)])
    return state


def execute(client: redis.Redis) -> broker.Execute:
    return functools.partial(broker.run, client)


def celery_message(client: redis.Redis, **options: Any) -> dict[str, Any]:
    """What Celery's own ``send_task`` writes for a prediction."""
    from workers import app

    client.delete(*broker.queue_lists(QUEUE))
    app.send_task("tasks.predict", ("linear", [1.0] * 8), {"version": "v1"}, queue=QUEUE, **options)
    step = broker.priority_list(QUEUE, options.get("priority"))
    raw = client.rpop(step)
    assert raw is not None, f"Celery's message is not in {step!r}"
    return json.loads(raw)  # type: ignore[no-any-return]


def test_our_message_carries_what_celery_writes(client: redis.Redis, test_repo: Path) -> None:
    """Ours is kombu's envelope packed with msgpack and the body raw: the same fields."""
    publish_registry(client, ModelRepository(test_repo).registry())
    theirs = celery_message(client, priority=5, expires=30)
    raw = broker.encode_task_message(
        "tasks.predict", broker.new_task_id(), ("linear", [1.0] * 8), {"version": "v1"},
        queue=QUEUE, serializer="json", priority=5, expires=broker.expires_at(30),
        reply_channel="inference:reply:x",
    )  # fmt: skip
    ours = broker.read_envelope(raw)
    assert set(ours) == set(theirs)
    assert set(ours["properties"]) == set(theirs["properties"])
    # Ours adds the reply channel and the publish time (Celery passes unknown headers on).
    assert set(ours["headers"]) - {broker.REPLY_HEADER, broker.PUBLISHED_HEADER} == set(
        theirs["headers"]
    )
    for field in ("content-type", "content-encoding"):
        assert ours[field] == theirs[field]
    for field in ("delivery_info", "priority", "delivery_mode"):
        assert ours["properties"][field] == theirs["properties"][field], field
    assert theirs["properties"]["body_encoding"] == "base64"
    assert ours["properties"]["body_encoding"] == broker.BINARY
    for field in ("task", "lang", "retries", "eta", "group", "timelimit", "parent_id"):
        assert ours["headers"][field] == theirs["headers"][field], field
    expiration = int(ours["properties"]["expiration"])
    assert abs(expiration - int(theirs["properties"]["expiration"])) < 2000
    body = loads(ours["body"], ours["content-type"], ours["content-encoding"])  # raw bytes
    their_body = loads(
        base64.b64decode(theirs["body"]), theirs["content-type"], theirs["content-encoding"]
    )
    assert body == their_body
    # Both decode to the same request.
    mine = broker.decode_task_message(raw, accept=["json"], max_body_bytes=1 << 20)
    celerys = broker.decode_task_message(
        json.dumps(theirs).encode(), accept=["json"], max_body_bytes=1 << 20
    )
    assert (mine.task_name, mine.args, mine.kwargs, mine.priority) == (
        celerys.task_name, celerys.args, celerys.kwargs, celerys.priority,
    )  # fmt: skip


def test_a_message_celery_publishes_is_fetched_and_decoded(
    client: redis.Redis, test_repo: Path
) -> None:
    """Celery's and kombu's publish land where the fetch reads, priority lists included."""
    from workers import app

    publish_registry(client, ModelRepository(test_repo).registry())
    client.delete(*broker.queue_lists(QUEUE))
    low = app.send_task(
        "tasks.predict", ("linear", [2.0] * 8), {"version": "v1"}, queue=QUEUE, priority=9
    )
    high = app.send_task("tasks.predict", ("linear", [1.0] * 8), {"version": "v1"}, queue=QUEUE)
    assert client.llen(broker.priority_list(QUEUE, 9)) == 1  # kombu's priority sub-list
    state = consumer()
    fetched = broker.fetch(execute(client), state, 10, 30)
    decoded = [
        broker.decode_task_message(f.raw, accept=["json", "tensor"], max_body_bytes=1 << 20)
        for f in fetched
    ]
    assert [d.task_id for d in decoded] == [high.id, low.id]  # priority 0 is served first
    assert decoded[0].args == ["linear", [1.0] * 8] and decoded[0].kwargs == {"version": "v1"}
    assert decoded[1].priority == 9
    assert all(f.source.label == LABEL for f in fetched)


def test_fetch_holds_atomically_and_the_ack_releases(client: redis.Redis) -> None:
    state = consumer()
    for i in range(5):
        broker.run(client, broker.publish_commands(QUEUE, 0, f"m{i}".encode()))
    fetched = broker.fetch(execute(client), state, 3, 30)
    assert [f.raw for f in fetched] == [b"m0", b"m1", b"m2"]  # oldest first
    assert client.hlen(state.held_key) == 3
    assert client.hgetall(keys.HELD_COUNTS) == {LABEL.encode(): b"3"}
    assert client.zscore(keys.LEASES, state.name) > time.time()
    # Messages remain: a wake token is left for another consumer.
    assert client.llen(broker.wake_key(QUEUE)) == 1
    broker.run(client, [broker.ack_command(state, [(f.tag, LABEL) for f in fetched[:2]])])
    assert client.hgetall(keys.HELD_COUNTS) == {LABEL.encode(): b"1"}
    # Acknowledging twice (a resend after a lost reply) changes nothing.
    broker.run(client, [broker.ack_command(state, [(f.tag, LABEL) for f in fetched[:2]])])
    assert client.hgetall(keys.HELD_COUNTS) == {LABEL.encode(): b"1"}
    rest = broker.fetch(execute(client), state, 10, 30)
    assert [f.raw for f in rest] == [b"m3", b"m4"]
    assert client.llen(broker.wake_key(QUEUE)) == 0  # nothing left: no token either


def test_given_back_messages_go_to_the_head_in_order(client: redis.Redis) -> None:
    state = consumer()
    for i in range(4):
        broker.run(client, broker.publish_commands(QUEUE, 0, f"m{i}".encode()))
    fetched = broker.fetch(execute(client), state, 3, 30)
    broker.give_back(execute(client), state, [f.tag for f in fetched])
    again = broker.fetch(execute(client), state, 10, 30)
    assert [f.raw for f in again] == [b"m0", b"m1", b"m2", b"m3"]
    assert client.hgetall(keys.HELD_COUNTS) == {LABEL.encode(): b"4"}


def test_a_fetch_that_fills_its_room_and_leaves_messages_pokes_the_scaler(
    client: redis.Redis,
) -> None:
    """A burst is seen by the first saturated fetch, not at the scaler's next tick: once a
    second per version, and never by a fetch that took everything."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.SCALER_POKE)
    state = consumer()
    for i in range(5):
        broker.run(client, broker.publish_commands(QUEUE, 0, f"m{i}".encode()))
    assert len(broker.fetch(execute(client), state, 2, 30)) == 2  # room filled, 3 left
    poke = wait_for(lambda: pubsub.get_message(timeout=0.1), what="the poke")
    assert poke["data"] == LABEL.encode()
    assert len(broker.fetch(execute(client), state, 2, 30)) == 2  # within the second: quiet
    client.delete(keys.SCALER_BACKLOG_PREFIX + LABEL)  # as if the second had passed
    assert len(broker.fetch(execute(client), state, 5, 30)) == 1  # took the rest: quiet
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_an_expired_lease_gives_the_messages_back(client: redis.Redis) -> None:
    dead, alive = consumer("dead@contract"), consumer("alive@contract")
    for i in range(3):
        broker.run(client, broker.publish_commands(QUEUE, 3, f"m{i}".encode()))
    broker.fetch(execute(client), dead, 10, lease_s=1)
    assert broker.fetch(execute(client), alive, 10, 30) == []
    wait_for(lambda: broker.sweep(client, lease_s=1) == 3, timeout_s=10, what="the expired lease")
    assert not client.exists(dead.held_key) and client.zscore(keys.LEASES, dead.name) is None
    taken = broker.fetch(execute(client), alive, 10, 30)
    assert [f.raw for f in taken] == [b"m0", b"m1", b"m2"]  # back on their priority list
    assert client.hgetall(keys.HELD_COUNTS) == {LABEL.encode(): b"3"}


def test_failover_moves_held_and_instance_queues_to_the_shared_queue(
    client: redis.Redis,
) -> None:
    gone = consumer("gone@contract")
    instance = keys.instance_queue("linear", "v1", gone.name)
    client.sadd(keys.INSTANCE_QUEUES, instance)
    broker.run(client, broker.publish_commands(QUEUE, 0, b"shared"))
    broker.fetch(execute(client), gone, 10, 30)
    broker.run(client, broker.publish_commands(instance, 0, b"routed-1"))
    broker.run(client, broker.publish_commands(instance, 6, b"routed-6"))
    assert broker.release(execute(client), gone.name) == 3
    assert client.llen(instance) == 0 and not client.sismember(keys.INSTANCE_QUEUES, instance)
    assert client.lrange(QUEUE, 0, -1) == [b"routed-1", b"shared"]  # the head is on the right
    assert client.lrange(broker.priority_list(QUEUE, 6), 0, -1) == [b"routed-6"]
    assert client.hgetall(keys.HELD_COUNTS) == {}


def test_load_counts_are_exact(client: redis.Redis, test_repo: Path) -> None:
    """Queued (shared, priority and instance queues) plus held, read in one step."""
    publish_registry(client, ModelRepository(test_repo).registry())
    client.sadd(keys.PRIORITY_QUEUES, QUEUE)
    state = consumer()
    client.sadd(keys.INSTANCE_QUEUES, keys.instance_queue("linear", "v1", state.name))
    for priority in (0, 0, 3, 9, 0):
        broker.run(client, broker.publish_commands(QUEUE, priority, b"m"))
    broker.run(
        client,
        broker.publish_commands(keys.instance_queue("linear", "v1", state.name), 0, b"r"),
    )
    broker.fetch(execute(client), state, 2, 30)
    load = broker.parse_load(broker.run(client, [broker.load_command()])[0])
    assert load.queued == {LABEL: 4} and load.held == {LABEL: 2}


def test_a_result_is_stored_as_celery_reads_it(client: redis.Redis) -> None:
    from celery.result import AsyncResult

    from workers import app

    value = np.arange(4, dtype=np.float32)
    meta = broker.result_meta(app, "r-1", "SUCCESS", value)
    broker.run(client, broker.result_commands("r-1", meta, expires_s=60, reply_channel=None))
    stored = app.backend.get_task_meta("r-1")
    assert stored["status"] == "SUCCESS"
    np.testing.assert_array_equal(stored["result"], value)
    # Celery's own result class, in a process that did not send it (polled from its key).
    np.testing.assert_array_equal(AsyncResult("r-1", app=app).get(timeout=5), value)
    assert 0 < client.ttl(broker.result_key("r-1")) <= 60


def test_unsupported_kombu_or_celery_fails_at_import() -> None:
    with pytest.raises(ImportError, match=r"kombu 5\.6\.2 is installed.*kombu>=5\.7,<5\.8"):
        broker.check_versions({"kombu": "5.6.2", "celery": "5.7.0"})
    with pytest.raises(ImportError, match=r"celery 6\.0\.0 is installed"):
        broker.check_versions({"kombu": "5.7.1", "celery": "6.0.0"})
    broker.check_versions({"kombu": "5.7.9", "celery": "5.7.0rc1"})


def test_a_pickle_published_through_kombu_is_refused_by_the_decoder(client: redis.Redis) -> None:
    with Connection(
        f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    ) as conn:
        Producer(conn.channel(), exchange=Exchange(""), serializer="pickle").publish(
            {"x": 1}, routing_key=QUEUE, headers={"task": "tasks.predict", "id": "p-1"}
        )
    (fetched,) = broker.fetch(execute(client), consumer(), 1, 30)
    with pytest.raises(broker.Refused, match="not accepted") as refused:
        broker.decode_task_message(fetched.raw, accept=["json", "tensor"], max_body_bytes=1 << 20)
    assert refused.value.task_id == "p-1"


def test_presence_finds_a_request_wherever_redis_keeps_it(client: redis.Redis) -> None:
    """What decides whether a request whose acknowledgement was lost is sent again."""
    state = consumer()
    instance = keys.instance_queue("linear", "v1", "w1@h")
    message = b"the message"

    def present(queue: str = QUEUE) -> bool:
        return bool(broker.run(client, [broker.presence_command("p-1", queue, QUEUE, message)])[0])

    assert not present()
    broker.run(client, broker.publish_commands(QUEUE, 6, b"another"))
    assert not present()
    broker.run(client, broker.publish_commands(QUEUE, 6, message))  # a priority sub-list
    assert present()
    (fetched,) = [f for f in broker.fetch(execute(client), state, 10, 30) if f.raw == message]
    assert client.llen(broker.priority_list(QUEUE, 6)) == 0 and present()  # held
    broker.run(client, [broker.ack_command(state, [(fetched.tag, LABEL)])])
    assert not present()
    broker.run(client, broker.publish_commands(instance, 0, message))  # routed to an instance
    assert present(instance)
    client.delete(instance)
    broker.run(client, broker.result_commands("p-1", b"meta", expires_s=60, reply_channel=None))
    assert present()  # answered

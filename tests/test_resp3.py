"""The RESP3 connection producers use: replies in order with pushed messages between them,
passwords and databases from the URL, a server that goes away."""

from __future__ import annotations

import asyncio

import pytest
import redis

from common.redis import EmbeddedRedis
from common.resp3 import AsyncConnection, Connection, Endpoint

pytestmark = pytest.mark.timeout(60)


def test_replies_in_order_and_pushes_between_them(redis_server: EmbeddedRedis) -> None:
    pushed: list[list[object]] = []
    conn = Connection(Endpoint.from_url(redis_server.url), pushed.append)
    assert conn.open(["results"], [("PING",)]) == [b"PONG"]
    other = redis.Redis.from_url(redis_server.url)
    other.publish("results", b"one")
    # A published message may arrive before, between or after the replies: it is handed
    # on as it is read, and the replies keep their order.
    assert conn.execute([("SET", "k", 1), ("INCR", "k"), ("GET", "k")]) == [b"OK", 2, b"2"]

    def messages() -> list[list[object]]:
        return [p for p in pushed if p[0] == b"message"]  # not the subscribe confirmation

    assert conn.read(lambda: bool(messages()), 5)
    assert messages() == [[b"message", b"results", b"one"]]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        conn.execute([("SET", "s", "x"), ("LPUSH", "s", "y"), ("GET", "s")])
    assert conn.execute([("GET", "s")]) == [b"x"]  # still in step after an error reply
    conn.close()


def test_password_and_database_come_from_the_url() -> None:
    with EmbeddedRedis(extra_args=["--requirepass", "s3cret"]) as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        conn = Connection(Endpoint.from_url(url), lambda push: None)
        conn.open()
        conn.execute([("SET", "where", "db3")])
        assert redis.Redis(port=server.port, password="s3cret", db=3).get("where") == b"db3"
        wrong = Connection(Endpoint.from_url(f"redis://:nope@127.0.0.1:{server.port}/0"), print)
        with pytest.raises(redis.ResponseError):
            wrong.open()


def test_a_lost_server_raises_and_the_connection_reopens(redis_server: EmbeddedRedis) -> None:
    conn = Connection(Endpoint.from_url(redis_server.url), lambda push: None)
    conn.open()
    redis_server.kill()
    redis_server.start()
    with pytest.raises(redis.ConnectionError):
        conn.execute([("PING",)])
    assert not conn.connected
    conn.open()
    assert conn.execute([("PING",)]) == [b"PONG"]


def test_the_async_connection_pipelines_callers(redis_server: EmbeddedRedis) -> None:
    async def main() -> list[list[object]]:
        pushed: list[list[object]] = []
        conn = AsyncConnection(Endpoint.from_url(redis_server.url), pushed.append)
        await conn.open(["results"])
        replies = await asyncio.gather(*(conn.execute([("INCR", "n")]) for _ in range(500)))
        await redis.asyncio.Redis.from_url(redis_server.url).publish("results", b"x")
        for _ in range(100):
            if any(p[0] == b"message" for p in pushed):
                break
            await asyncio.sleep(0.01)
        await conn.close()
        with pytest.raises(redis.ConnectionError):
            await conn.execute([("PING",)])
        return [sorted(r[0] for r in replies), pushed]  # type: ignore[index]

    counts, pushed = asyncio.run(main())
    assert counts == list(range(1, 501))  # every caller got its own reply
    assert [p for p in pushed if p[0] == b"message"] == [[b"message", b"results", b"x"]]

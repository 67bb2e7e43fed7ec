"""Results reach a producer over the connection it publishes on.

A producer thread (or event loop) keeps one RESP3 connection, subscribed to a reply
channel of its own. Its requests name that channel, and the worker publishes each result
there right after storing it under Celery's key. The publish reply and the results that
arrived meanwhile come back in the same read: a request costs the producer one round
trip, with no SUBSCRIBE, GET and UNSUBSCRIBE per request and no thread woken to carry a
result across. When the broker and the result backend are different servers, the channel
lives on the result backend and requests go out on a connection of their own.

A lost connection is routine: the channel reconnects with back-off, subscribes again and
reads the stored results of every call still waiting, so nothing published while it was
away is missed. A call that times out after its Redis restarted (a new ``run_id``) is told
its request may have been lost with Redis's memory (``RequestLostError``). A result the
process did not ask for (``AsyncResult(id).get()`` of a request another process sent) is
read from its key, polled with back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import redis

from common import keys
from common.errors import BrokerUnavailableError
from common.redis import Outage, redis_client
from common.resp3 import AsyncConnection, Connection, Endpoint, Push
from tasks import broker

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# A thread reading another thread's channel gives the socket back this often.
READ_SLICE_S = 0.05


def _new_channel() -> str:
    return keys.REPLY_PREFIX + uuid.uuid4().hex


def _run_id(info: Any) -> str:
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return ""


def _message(push: Push) -> tuple[str, bytes] | None:
    if len(push) == 3 and push[0] == b"message":
        return broker.split_reply(push[2])
    return None


class _Waiter:
    __slots__ = ("__weakref__", "channel", "generation", "raw")

    def __init__(self, channel: ThreadChannel) -> None:
        self.channel = channel
        self.generation = channel.generation
        self.raw: bytes | None = None


class ThreadChannel:
    """One thread's connection: its requests go out and their results come back on it.
    Another thread waiting for one of those results reads it here too, one at a time."""

    def __init__(self, hub: ReplyHub) -> None:
        self.hub = hub
        self.name = _new_channel()
        self.conn = Connection(hub.endpoint, self._on_push)
        self.generation = 0
        self._run_id: str | None = None
        self._cond = threading.Condition()
        self._busy = False
        self._sleepers = 0  # threads waiting for the socket
        self._resolved_elsewhere = False
        self.owner = threading.get_ident()
        self.outage = Outage("reply channel")

    # -- exclusive use of the socket --------------------------------------------------------
    def _acquire(self, deadline: float | None) -> bool:
        with self._cond:
            while self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._sleepers += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._sleepers -= 1
            self._busy = True
            self._resolved_elsewhere = False
            return True

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _on_push(self, push: Push) -> None:
        message = _message(push)
        if message is not None and self.hub.resolve(*message):
            self._resolved_elsewhere = True

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> None:
        (info,) = self.conn.open([self.name], [("INFO", "server")])
        run_id = _run_id(info)
        if self._run_id is not None and run_id != self._run_id:
            self.generation += 1
        self._run_id = run_id
        self.outage.ok()
        pending = self.hub.pending(self)
        for i in range(0, len(pending), 1000):
            chunk = pending[i : i + 1000]
            (raws,) = self.conn.execute([("MGET", *(broker.result_key(t) for t in chunk))])
            for task_id, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    self.hub.resolve(task_id, keys.raw_bytes(raw))

    def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Commands on this thread's connection (reconnecting once: a restarted Redis
        never ran what its old connection carried)."""
        self._acquire(None)
        try:
            for attempt in (1, 2):
                try:
                    reused = self.conn.connected
                    if not reused:
                        self._connect()
                    return self.conn.execute(commands)
                except redis.ConnectionError:
                    self.conn.close()
                    if attempt == 2 or not reused:
                        raise
            raise AssertionError("unreachable")
        finally:
            self._release()

    def wait(self, waiter: _Waiter, deadline: float | None) -> None:
        """Until the waiter's result came, or the deadline."""
        while waiter.raw is None:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not self._acquire(deadline):
                return
            try:
                if waiter.raw is not None:
                    return
                if not self.conn.connected:
                    self._connect()
                left = None if deadline is None else deadline - time.monotonic()
                # Give the socket back when results for threads waiting came, and now and
                # then if this is not the thread that publishes on it.
                own = threading.get_ident() == self.owner
                slice_s = 5.0 if own else READ_SLICE_S
                self.conn.read(
                    lambda: (
                        waiter.raw is not None or (self._resolved_elsewhere and self._sleepers > 0)
                    ),
                    min(slice_s, left) if left is not None else slice_s,
                )
            except redis.RedisError as exc:
                self.conn.close()
                pause = self.outage.failed(exc)
                if deadline is not None:
                    pause = min(pause, max(deadline - time.monotonic(), 0))
                time.sleep(pause)
            finally:
                self._release()


class ReplyHub:
    """A producer process's results for synchronous callers: a channel per thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.endpoint = Endpoint.from_url(url)
        self.client = redis_client(url, socket_timeout=10)
        self._waiters: weakref.WeakValueDictionary[str, _Waiter] = weakref.WeakValueDictionary()
        self._local = threading.local()
        self._lock = threading.Lock()

    def channel(self) -> ThreadChannel:
        """This thread's channel, subscribed before its first request goes out."""
        channel: ThreadChannel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = ThreadChannel(self)
            try:
                channel.execute([("PING",)])  # connects and subscribes
            except redis.RedisError as exc:
                raise BrokerUnavailableError(
                    f"no reply channel: Redis at {redis_url_for_logs(self.url)}: {exc}"
                ) from exc
            self._local.channel = channel
        return channel

    def expect(self, task_id: str, channel: ThreadChannel) -> _Waiter:
        """Register a call before its request is published; keep the waiter while waiting."""
        waiter = _Waiter(channel)
        self._waiters[task_id] = waiter
        return waiter

    def discard(self, task_id: str) -> None:
        self._waiters.pop(task_id, None)

    def resolve(self, task_id: str, meta: bytes) -> bool:
        """A result arrived; True if a call was waiting for it."""
        waiter = self._waiters.get(task_id)
        if waiter is None or waiter.raw is not None:
            return False
        waiter.raw = meta
        return True

    def pending(self, channel: ThreadChannel) -> list[str]:
        return [t for t, w in list(self._waiters.items()) if w.channel is channel and w.raw is None]

    def peek(self, task_id: str) -> bytes | None:
        waiter = self._waiters.get(task_id)
        return waiter.raw if waiter is not None else None

    def wait(self, task_id: str, timeout: float | None) -> bytes:
        waiter = self._waiters.get(task_id)
        if waiter is None:
            return self._poll(task_id, timeout)
        if waiter.raw is None:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
            waiter.channel.wait(waiter, deadline)
        if waiter.raw is not None:
            return waiter.raw
        stored = self._stored(task_id)
        if stored is not None:
            return stored
        lost = waiter.generation != waiter.channel.generation
        raise broker.not_answered(task_id, timeout, lost=lost)

    def _stored(self, task_id: str) -> bytes | None:
        with contextlib.suppress(redis.RedisError):
            raw = self.client.get(broker.result_key(task_id))
            return None if raw is None else keys.raw_bytes(raw)
        return None

    def _poll(self, task_id: str, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            raw = self._stored(task_id)
            if raw is not None:
                return raw
            if deadline is not None and time.monotonic() >= deadline:
                raise broker.not_answered(task_id, timeout, lost=False)
            pause = delay if deadline is None else min(delay, max(deadline - time.monotonic(), 0))
            time.sleep(pause)
            delay = min(delay * 1.5, 0.2)


def redis_url_for_logs(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


_hubs: dict[str, ReplyHub] = {}
_hubs_lock = threading.Lock()
# A forked child connects on its own: the parent's connections did not come along.
os.register_at_fork(after_in_child=_hubs.clear)


def replies_for(url: str | None = None) -> ReplyHub:
    """This process's reply hub for the result backend at ``url``."""
    if url is None:
        from common.settings import serving_settings

        url = serving_settings().backend_url
    hub = _hubs.get(url)
    if hub is None:
        with _hubs_lock:
            hub = _hubs.get(url)
            if hub is None:
                hub = _hubs[url] = ReplyHub(url)
    return hub


class AsyncChannel:
    """An event loop's connection: every coroutine's requests go out on it (together, a
    write per loop iteration) and all their results come back on it. A task keeps it
    connected: after an outage it subscribes again and reads what was stored meanwhile."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = _new_channel()
        self.conn = AsyncConnection(Endpoint.from_url(url), self._on_push)
        self._futures: dict[str, tuple[asyncio.Future[bytes], int]] = {}
        self._ready = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self.generation = 0
        self._run_id: str | None = None
        self.outage = Outage("reply channel")

    async def start(self) -> None:
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="replies")
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BrokerUnavailableError(
                f"no reply channel: Redis at {redis_url_for_logs(self.url)} did not answer "
                f"within {CONNECT_TIMEOUT_S:g} s"
            ) from None

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        await self.conn.close()
        for future, _ in self._futures.values():
            if not future.done():
                future.cancel()

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        if not self._ready.is_set():
            raise redis.ConnectionError("Redis connection lost")
        return await self.conn.execute(commands)

    def expect(self, task_id: str) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures[task_id] = (future, self.generation)
        return future

    def discard(self, task_id: str) -> None:
        self._futures.pop(task_id, None)

    async def stored(self, task_id: str) -> bytes | None:
        with contextlib.suppress(redis.RedisError):
            (raw,) = await self.execute([("GET", broker.result_key(task_id))])
            return None if raw is None else keys.raw_bytes(raw)
        return None

    async def wait(self, task_id: str, timeout: float | None) -> bytes:
        """The result of a registered call; raises like ``ReplyHub.wait`` on timeout."""
        future, generation = self._futures[task_id]
        try:
            if timeout is None:
                return await future
            if not future.done():
                loop = asyncio.get_running_loop()
                timer = loop.call_later(max(timeout, 0), _expire, future)
                try:
                    await asyncio.wait((future,))
                finally:
                    timer.cancel()
            if not future.cancelled() and future.exception() is None:
                return future.result()
            stored = await self.stored(task_id)
            if stored is not None:
                return stored
            raise broker.not_answered(task_id, timeout, lost=generation != self.generation)
        finally:
            self._futures.pop(task_id, None)

    def _on_push(self, push: Push) -> None:
        message = _message(push)
        if message is not None:
            entry = self._futures.get(message[0])
            if entry is not None and not entry[0].done():
                entry[0].set_result(message[1])

    async def _keep(self) -> None:
        while True:
            try:
                (info,) = await self.conn.open([self.name], [("INFO", "server")])
                run_id = _run_id(info)
                if self._run_id is not None and run_id != self._run_id:
                    self.generation += 1
                self._run_id = run_id
                self._ready.set()
                await self._recover()
                self.outage.ok()
                await self.conn.closed.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                pause = self.outage.failed(exc)
                await asyncio.sleep(pause)
            self._ready.clear()

    async def _recover(self) -> None:
        pending = [t for t, (f, _) in list(self._futures.items()) if not f.done()]
        for i in range(0, len(pending), 1000):
            chunk = pending[i : i + 1000]
            (raws,) = await self.conn.execute([("MGET", *(broker.result_key(t) for t in chunk))])
            for task_id, raw in zip(chunk, raws, strict=True):
                entry = self._futures.get(task_id)
                if raw is not None and entry is not None and not entry[0].done():
                    entry[0].set_result(keys.raw_bytes(raw))


class _Expired(Exception):
    pass


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(_Expired())

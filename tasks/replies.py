"""Results reach a producer process over one long-lived channel.

Each producer process subscribes once to its own reply channel; every request it
publishes names that channel, and the worker publishes the result there right after
storing it under Celery's key. Results are handed to the calls waiting for them, so a
request costs the producer its publish and a share of one socket read: no SUBSCRIBE, GET
and UNSUBSCRIBE per request.

Synchronous callers read the channel themselves, one at a time (leader and followers):
the thread that waits and finds nobody reading becomes the reader, hands every result it
reads to its waiter, and when its own has come, passes the reading on to a thread still
waiting. No thread is woken to carry a result across, which on a busy machine costs more
than the read itself. An event loop has one reading task (``AsyncReplies``).

A lost connection is routine: the reader reconnects with back-off, subscribes again and
then reads the stored results of every call still waiting, so nothing published while it
was away is missed. A call that times out after Redis restarted (a new ``run_id``) is told
its request may have been lost with Redis's memory (``RequestLostError``).

A result the process did not ask for (``AsyncResult(id).get()`` of a request another
process sent) is read from its key, polled with back-off.
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
from typing import Any

import redis
import redis.asyncio as aioredis

from common import keys
from common.errors import BrokerUnavailableError
from common.redis import redis_client
from tasks import broker

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class _Waiter:
    """One call's result. ``lock`` is held while nothing has arrived; it is released (by
    the reader, under the hub's lock) when the result comes or the reading is handed over."""

    __slots__ = ("__weakref__", "generation", "lock", "raw", "sleeping")

    def __init__(self, generation: int) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.raw: bytes | None = None
        self.generation = generation
        self.sleeping = False


def _outage_log(what: str, since: float | None, exc: BaseException) -> float:
    if since is None:
        logger.warning("%s: Redis unreachable (%s); reconnecting", what, exc)
        return time.monotonic()
    return since


class ReplyHub:
    """A process's reply channel for synchronous callers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.channel = keys.REPLY_PREFIX + uuid.uuid4().hex
        self.client = redis_client(url, socket_timeout=10)
        self._waiters: weakref.WeakValueDictionary[str, _Waiter] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()  # waiter states, and who reads
        self._reading = False
        self._pubsub: Any = None
        self._down_since: float | None = None
        self.generation = 0
        self._run_id: str | None = None

    # -- callers ----------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe before the first request goes out. Once subscribed, an outage does not
        hold callers up: the reader recovers what was published meanwhile."""
        if self._run_id is not None:
            return
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while self._run_id is None:
            if self._lead():
                try:
                    self._connect()
                except redis.RedisError as exc:
                    if time.monotonic() >= deadline:
                        raise BrokerUnavailableError(
                            f"no reply channel: Redis at {redis_url_for_logs(self.url)} did "
                            f"not answer within {CONNECT_TIMEOUT_S:g} s ({exc})"
                        ) from exc
                    time.sleep(0.1)
                finally:
                    self._end_reading()
            else:
                time.sleep(0.01)

    def expect(self, task_id: str) -> _Waiter:
        """Register a call before its request is published; keep the waiter while waiting."""
        waiter = _Waiter(self.generation)
        self._waiters[task_id] = waiter
        return waiter

    def discard(self, task_id: str) -> None:
        self._waiters.pop(task_id, None)

    def peek(self, task_id: str) -> bytes | None:
        waiter = self._waiters.get(task_id)
        return waiter.raw if waiter is not None else None

    def wait(self, task_id: str, timeout: float | None) -> bytes:
        waiter = self._waiters.get(task_id)
        if waiter is None:
            return self._poll(task_id, timeout)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
        while waiter.raw is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            with self._lock:
                if waiter.raw is not None:
                    break
                leading = not self._reading
                if leading:
                    self._reading = True
                else:
                    waiter.sleeping = True
            if leading:
                try:
                    self._read_until(waiter, deadline)
                finally:
                    self._end_reading()
                continue
            # Acquired: released by a result or a hand-over, and held again for next time.
            if not waiter.lock.acquire(timeout=-1 if left is None else left):
                with self._lock:
                    if waiter.sleeping:
                        waiter.sleeping = False  # nobody released it: still held
                    else:
                        waiter.lock.acquire(blocking=False)  # released just now: hold it
        if waiter.raw is not None:
            return waiter.raw
        stored = self._stored(task_id)
        if stored is not None:
            return stored
        raise broker.not_answered(task_id, timeout, lost=waiter.generation != self.generation)

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

    # -- reading (one thread at a time) -----------------------------------------------------
    def _lead(self) -> bool:
        with self._lock:
            if self._reading:
                return False
            self._reading = True
            return True

    def _end_reading(self) -> None:
        """Stop reading; a thread still waiting for its result reads next."""
        with self._lock:
            self._reading = False
            for waiter in list(self._waiters.values()):
                if waiter.sleeping and waiter.raw is None:
                    waiter.sleeping = False
                    waiter.lock.release()
                    return

    def _deliver(self, data: bytes) -> None:
        self._resolve(*broker.split_reply(data))

    def _resolve(self, task_id: str, meta: bytes) -> None:
        with self._lock:
            waiter = self._waiters.get(task_id)
            if waiter is not None and waiter.raw is None:
                waiter.raw = meta
                if waiter.sleeping:
                    waiter.sleeping = False
                    waiter.lock.release()

    def _read_until(self, waiter: _Waiter, deadline: float | None) -> None:
        while waiter.raw is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                if self._pubsub is None:
                    self._connect()
                    continue
                message = self._pubsub.get_message(timeout=min(left or 5.0, 5.0))
                while message is not None:
                    if message["type"] == "message":
                        self._deliver(message["data"])
                    message = self._pubsub.get_message(timeout=0)
            except redis.RedisError as exc:
                self._drop()
                self._down_since = _outage_log("reply channel", self._down_since, exc)
                pause = min(0.1 * 2 ** min(time.monotonic() - self._down_since, 4), 2.0)
                time.sleep(pause if left is None else min(pause, max(left, 0)))

    def _connect(self) -> None:
        pubsub = self.client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            while (m := pubsub.get_message(timeout=CONNECT_TIMEOUT_S)) is None or m[
                "type"
            ] != "subscribe":
                if m is None:
                    raise redis.ConnectionError("no subscription confirmation")
            run_id = str(self.client.info("server")["run_id"])
        except BaseException:
            with contextlib.suppress(Exception):
                pubsub.close()
            raise
        if self._run_id is not None and run_id != self._run_id:
            self.generation += 1
        self._run_id, self._pubsub = run_id, pubsub
        self._recover()
        if self._down_since is not None:
            logger.warning(
                "reply channel: Redis reachable again after %.1f s",
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _recover(self) -> None:
        """Results stored while the subscription was down."""
        pending = [t for t, w in list(self._waiters.items()) if w.raw is None]
        for i in range(0, len(pending), 1000):
            chunk = pending[i : i + 1000]
            for task_id, raw in zip(
                chunk, self.client.mget([broker.result_key(t) for t in chunk]), strict=True
            ):
                if raw is not None:
                    self._resolve(task_id, keys.raw_bytes(raw))


def redis_url_for_logs(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


_hubs: dict[str, ReplyHub] = {}
_hubs_lock = threading.Lock()
# A forked child subscribes on its own: the parent's reader thread did not come along.
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


class AsyncReplies:
    """A reply channel read by a task of one event loop: thousands of awaits, one socket."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.channel = keys.REPLY_PREFIX + uuid.uuid4().hex
        self._futures: dict[str, tuple[asyncio.Future[bytes], int]] = {}
        self._ready = asyncio.Event()
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self.generation = 0
        self._run_id: str | None = None

    async def start(self) -> None:
        if self._task is None:
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=10, socket_connect_timeout=5
            )
            self._task = asyncio.get_running_loop().create_task(self._run(), name="replies")
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BrokerUnavailableError(
                f"no reply channel: Redis at {redis_url_for_logs(self.url)} did not answer "
                f"within {CONNECT_TIMEOUT_S:g} s"
            ) from None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for future, _ in self._futures.values():
            if not future.done():
                future.cancel()
        if self._client is not None:
            await self._client.aclose()

    def expect(self, task_id: str) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures[task_id] = (future, self.generation)
        return future

    def discard(self, task_id: str) -> None:
        self._futures.pop(task_id, None)

    async def stored(self, task_id: str) -> bytes | None:
        assert self._client is not None
        with contextlib.suppress(redis.RedisError):
            raw = await self._client.get(broker.result_key(task_id))
            return None if raw is None else keys.raw_bytes(raw)
        return None

    async def wait(self, task_id: str, timeout: float | None) -> bytes:
        """The result of a registered call; raises like ``ReplyHub.wait`` on timeout."""
        future, generation = self._futures[task_id]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            stored = await self.stored(task_id)
            if stored is not None:
                return stored
            raise broker.not_answered(
                task_id, timeout, lost=generation != self.generation
            ) from None
        finally:
            self._futures.pop(task_id, None)

    def _deliver(self, data: bytes) -> None:
        self._resolve(*broker.split_reply(data))

    def _resolve(self, task_id: str, meta: bytes) -> None:
        entry = self._futures.get(task_id)
        if entry is not None and not entry[0].done():
            entry[0].set_result(meta)

    async def _recover(self) -> None:
        assert self._client is not None
        pending = [t for t, (f, _) in list(self._futures.items()) if not f.done()]
        for i in range(0, len(pending), 1000):
            chunk = pending[i : i + 1000]
            raws = await self._client.mget([broker.result_key(t) for t in chunk])
            for task_id, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    self._resolve(task_id, keys.raw_bytes(raw))

    async def _run(self) -> None:
        assert self._client is not None
        down_since: float | None = None
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    m = await pubsub.get_message(timeout=CONNECT_TIMEOUT_S)
                    if m is None:
                        raise redis.ConnectionError("no subscription confirmation")
                    if m["type"] == "subscribe":
                        break
                run_id = str((await self._client.info("server"))["run_id"])
                if self._run_id is not None and run_id != self._run_id:
                    self.generation += 1
                self._run_id = run_id
                self._ready.set()
                await self._recover()
                if down_since is not None:
                    logger.warning(
                        "reply channel: Redis reachable again after %.1f s",
                        time.monotonic() - down_since,
                    )
                    down_since = None
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message["type"] == "message":
                        self._deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._ready.clear()
                down_since = _outage_log("reply channel", down_since, exc)
                await asyncio.sleep(min(0.1 * 2 ** min(time.monotonic() - down_since, 4), 2.0))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

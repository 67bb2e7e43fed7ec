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
import atexit
import contextlib
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from common import keys
from common.errors import BrokerUnavailableError
from common.redis import Outage, redis_client
from common.resp3 import AsyncConnection, Connection, Endpoint, Push, Unacked, error_of
from tasks import broker

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# A thread reading another thread's channel gives the socket back this often.
READ_SLICE_S = 0.05
# Requests a thread may have written that Redis has not acknowledged yet; then it reads.
MAX_UNACKED = 256
# A connection idle this long is checked before a request is written on it (a write to a
# connection a restarted Redis closed succeeds, and is lost).
STALE_CHECK_S = 0.5
# Requests whose acknowledgement a lost connection took along are sent again when it is
# made again; they fail if Redis stays unreachable this long.
ORPHAN_GRACE_S = 2.0


def orphan_grace_s() -> float:
    """The grace, or with sentinels as long as a producer waits for a new primary
    (``PUBLISH_WAIT_S``)."""
    from common.settings import serving_settings

    return max(ORPHAN_GRACE_S, serving_settings().publish_wait)


# How often the flusher looks for held requests while there are any (from the shortest
# tick, doubled while their threads write them first, up to the longest), and how long it
# keeps looking after the last.
FLUSH_TICK_S = 0.001
FLUSH_TICK_MAX_S = 0.008
FLUSH_QUIET_S = 0.05
# An event loop's calls time out on a grid of this step (one timer per step, not per call).
DEADLINE_STEP_S = 0.01


def _new_channel() -> str:
    return keys.REPLY_PREFIX + uuid.uuid4().hex


def _run_id(info: Any) -> str:
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return ""


def _results(push: Push) -> list[tuple[str, bytes]]:
    """The (task id, stored result) pairs a pushed reply-channel message carries."""
    if len(push) == 3 and push[0] == b"message":
        return broker.split_reply(push[2])
    return []


class Published(Protocol):
    """A request written on a channel: what to send again if its acknowledgement is lost."""

    @property
    def task_id(self) -> str: ...

    @property
    def commands(self) -> Sequence[tuple[Any, ...]]: ...

    def presence(self) -> tuple[Any, ...]:
        """A command answering 1 if Redis has the request."""


# How long after a refusal requests wait for Redis's answer in ``delay()``.
REFUSING_S = 1.0


class _Waiter:
    __slots__ = ("__weakref__", "channel", "error", "generation", "raw")

    def __init__(self, channel: ThreadChannel) -> None:
        self.channel = channel
        self.generation = channel.generation
        self.raw: bytes | None = None  # b"" with ``error`` set: it failed here
        self.error: Exception | None = None


class ThreadChannel:
    """One thread's connection: its requests go out and their results come back on it.
    Another thread waiting for one of those results reads it here too, one at a time.

    A request is written and not waited for: Redis's acknowledgement comes back in order
    with the results, and is read by whichever read comes next. A refusal fails the
    request's call. A connection lost before the acknowledgement came is made again and the
    request sent again, unless Redis has it (answered, waiting or held: ``presence``)."""

    def __init__(self, hub: ReplyHub) -> None:
        self.hub = hub
        self.name = _new_channel()
        self.conn = Connection(hub.endpoint, self._on_push, self._on_acked)
        self.generation = 0
        self._run_id: str | None = None
        self._cond = threading.Condition()
        self._busy = False
        self._sleepers = 0  # threads waiting for the socket
        self._resolved_elsewhere = False
        self._refused_at = -math.inf  # when Redis last refused a request written here
        self._lost_at: float | None = None  # when unacknowledged requests lost their connection
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
        for task_id, meta in _results(push):
            if self.hub.resolve(task_id, meta):
                self._resolved_elsewhere = True

    def _on_acked(self, unacked: Unacked) -> None:
        if unacked.error is not None:
            self._refused_at = time.monotonic()
            self._not_queued(unacked.tag, f"Redis refused it: {unacked.error}")

    @property
    def refusing(self) -> bool:
        """Redis refused a request in the last second (full, read-only): until a second
        passes without one, each request waits for Redis's answer in ``delay()``, so
        that its caller hears a refusal there, not at ``get()``."""
        return time.monotonic() - self._refused_at < REFUSING_S

    def _not_queued(self, request: Published, why: str) -> None:
        logger.warning("request %s was not queued: %s", request.task_id, why)
        error = BrokerUnavailableError(f"request {request.task_id} was not queued: {why}")
        if self.hub.fail(request.task_id, error):
            self._resolved_elsewhere = True

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> None:
        # Named after its reply channel: CLIENT LIST tells producers apart.
        _, info = self.conn.open(
            [self.name], [("CLIENT", "SETNAME", self.name), ("INFO", "server")]
        )
        run_id = _run_id(info)
        if self._run_id is not None and run_id != self._run_id:
            self.generation += 1
        self._run_id = run_id
        self.outage.ok()
        self._send_again()
        pending = self.hub.pending(self)
        for i in range(0, len(pending), 1000):
            chunk = pending[i : i + 1000]
            (raws,) = self.conn.execute([("MGET", *(broker.result_key(t) for t in chunk))])
            for task_id, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    self.hub.resolve(task_id, keys.raw_bytes(raw))

    def _send_again(self) -> None:
        """Requests the lost connection took unacknowledged: sent again unless Redis has
        them (it ran them before the connection went, or kept them over a restart)."""
        orphans, self.conn.orphans = self.conn.orphans, []
        if not orphans:
            return
        try:
            present = self.conn.execute([o.tag.presence() for o in orphans])
        except redis.RedisError:
            self.conn.orphans[:0] = orphans
            raise
        for i, (orphan, here) in enumerate(zip(orphans, present, strict=True)):
            self.hub.renew(orphan.tag.task_id, self.generation)
            if here:
                continue
            try:
                self.conn.send_unacked(Unacked(orphan.tag, orphan.commands))
            except redis.RedisError:
                self.conn.orphans[:0] = orphans[i:]
                raise
        self._lost_at = None

    def _reconnect_failed(self, exc: BaseException) -> None:
        """Requests left unacknowledged fail once Redis stayed away a while: whether it has
        them cannot be known."""
        if not self.conn.orphans:
            return
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        if now - self._lost_at >= self.hub.orphan_grace_s:
            orphans, self.conn.orphans = self.conn.orphans, []
            for orphan in orphans:
                self._not_queued(
                    orphan.tag, f"Redis became unreachable before it acknowledged it ({exc})"
                )
            self._lost_at = None

    def publish(self, request: Published) -> None:
        """Write a request and return (see the class). Raises only if it was not written."""
        self._acquire(None)
        try:
            conn = self.conn
            sent = False
            for attempt in (1, 2):
                try:
                    if (
                        attempt == 2
                        or not conn.connected
                        or (time.monotonic() - conn.last_io > STALE_CHECK_S and conn.peer_closed())
                    ):
                        self._connect()
                    if not sent:
                        # The first request of a burst goes out at once; the ones behind
                        # it, while it is unacknowledged, go out together: when this
                        # thread next reads, a few requests later, or from the flusher.
                        burst = bool(conn.unacked)
                        if conn.send_unacked(Unacked(request, request.commands), hold=burst):
                            _flusher.due(self.hub)
                        sent = True
                    # Redis's output buffer for this connection stays small.
                    if len(conn.unacked) > MAX_UNACKED and not conn.read(
                        lambda: len(conn.unacked) <= MAX_UNACKED // 2, 30.0
                    ):
                        raise redis.ConnectionError("Redis acknowledged nothing for 30 s")
                    return
                except redis.ConnectionError as exc:
                    conn.close()
                    if attempt == 2:
                        self._reconnect_failed(exc)
                        if not sent:
                            raise
        finally:
            self._release()

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
                except redis.ConnectionError as exc:
                    self.conn.close()
                    if attempt == 2 or not reused:
                        self._reconnect_failed(exc)
                        raise
            raise AssertionError("unreachable")
        finally:
            self._release()

    def write_held(self) -> bool:
        """Write what ``publish`` held back; False if another call holds the socket."""
        if not self.conn.holding:
            return True
        if not self._acquire(time.monotonic()):
            return False
        try:
            self.conn.flush()
        except redis.ConnectionError:
            self.conn.close()
            try:
                self._connect()  # and send again what the lost connection took along
            except redis.RedisError as exc:
                self.conn.close()
                self._reconnect_failed(exc)
        finally:
            self._release()
        return True

    def flush(self, timeout_s: float) -> None:
        """Read until Redis acknowledged every request written here (at exit)."""
        if not self.conn.unacked or not self._acquire(time.monotonic() + timeout_s):
            return
        try:
            conn = self.conn
            conn.read(lambda: not conn.unacked, timeout_s)
        except redis.RedisError as exc:
            logger.warning("requests written at exit may not have been queued: %s", exc)
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
                    try:
                        self._connect()
                    except redis.RedisError as exc:
                        self.conn.close()
                        self._reconnect_failed(exc)
                        raise
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


class _Flusher:
    """Writes the requests a thread held back and left there: a buffer is written when its
    connection saw no write for a whole tick (its thread neither published nor read).
    Woken by the first held request after a quiet spell, it looks every ``FLUSH_TICK_S``;
    while threads write their buffers themselves (a producer reading its results) the
    tick doubles up to ``FLUSH_TICK_MAX_S``, so a busy process is not woken a thousand
    times a second for nothing; it sleeps again when nothing was held for
    ``FLUSH_QUIET_S``. A held request waits at most two ticks."""

    def __init__(self) -> None:
        self._hubs: weakref.WeakSet[ReplyHub] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._armed = False
        self._thread: threading.Thread | None = None
        # channel -> its connection's write count at the last tick
        self._seen: weakref.WeakKeyDictionary[ThreadChannel, int] = weakref.WeakKeyDictionary()

    def due(self, hub: ReplyHub) -> None:
        if self._armed:
            return
        with self._lock:
            self._hubs.add(hub)
            self._armed = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="inference-flusher", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _look(self, *, all_held: bool) -> tuple[bool, bool]:
        """Write the buffers left alone for a tick (every held one with ``all_held``).
        Returns (anything still held, anything written here)."""
        held = wrote = False
        for hub in list(self._hubs):
            for channel in hub.channels():
                conn = channel.conn
                writes, last = conn.writes, self._seen.get(channel)
                self._seen[channel] = writes
                if not conn.holding:
                    continue
                if (all_held or writes == last) and channel.write_held():
                    wrote = True
                    self._seen[channel] = conn.writes
                held = held or conn.holding
        return held, wrote

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            quiet_since = time.monotonic()
            tick = FLUSH_TICK_S
            while True:
                time.sleep(tick)
                held, wrote = self._look(all_held=False)
                tick = FLUSH_TICK_S if wrote else min(2 * tick, FLUSH_TICK_MAX_S)
                if held or wrote:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > FLUSH_QUIET_S:
                    self._armed = False
                    # A request held just before the flag fell found it still up.
                    if not self._look(all_held=True)[0]:
                        break
                    self._armed = True


_flusher = _Flusher()


class ReplyHub:
    """A producer process's results for synchronous callers: a channel per thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.endpoint = Endpoint.from_url(url)
        self.orphan_grace_s = orphan_grace_s()
        self.client = redis_client(url, socket_timeout=10)
        self._waiters: weakref.WeakValueDictionary[str, _Waiter] = weakref.WeakValueDictionary()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._channels: weakref.WeakSet[ThreadChannel] = weakref.WeakSet()
        # Answers that found no call waiting: a second answer, or one after its caller's
        # timeout (the fault suite counts them).
        self.unclaimed = 0

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
            self._channels.add(channel)
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
            self.unclaimed += 1
            return False
        waiter.raw = meta
        return True

    def fail(self, task_id: str, error: Exception) -> bool:
        """A request that never reached a queue: its call raises ``error``."""
        waiter = self._waiters.get(task_id)
        if waiter is None or waiter.raw is not None:
            return False
        waiter.error, waiter.raw = error, b""
        return True

    def renew(self, task_id: str, generation: int) -> None:
        """A request sent again to (or found in) the Redis of this generation."""
        waiter = self._waiters.get(task_id)
        if waiter is not None:
            waiter.generation = generation

    def channels(self) -> list[ThreadChannel]:
        return list(self._channels)

    def flush(self, timeout_s: float = 5.0) -> None:
        for channel in self.channels():
            channel.flush(timeout_s)

    def pending(self, channel: ThreadChannel) -> list[str]:
        return [t for t, w in list(self._waiters.items()) if w.channel is channel and w.raw is None]

    def peek(self, task_id: str) -> bytes | None:
        waiter = self._waiters.get(task_id)
        return waiter.raw if waiter is not None and waiter.error is None else None

    def wait(self, task_id: str, timeout: float | None) -> bytes:
        waiter = self._waiters.get(task_id)
        if waiter is None:
            return self._poll(task_id, timeout)
        if waiter.raw is None:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
            waiter.channel.wait(waiter, deadline)
        if waiter.error is not None:
            raise waiter.error
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


def _after_fork_in_child() -> None:
    """A forked child connects on its own: the parent's connections and threads did not
    come along."""
    global _flusher
    _hubs.clear()
    _flusher = _Flusher()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _flush_at_exit() -> None:
    """A process that exits right after ``delay()`` reads Redis's acknowledgements first:
    a refusal is logged, and the requests are not cut off with the connection."""
    for hub in list(_hubs.values()):
        hub.flush()


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
        self._deadlines: dict[int, dict[str, None]] = {}  # step -> calls it ends
        self._ready = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self.generation = 0
        self._run_id: str | None = None
        self.outage = Outage("reply channel")
        # Requests whose acknowledgement a lost connection took along, and since when.
        self._orphans: list[Published] = []
        self._lost_at: float | None = None
        self.orphan_grace_s = orphan_grace_s()

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self._keeper is not None and self._ready.is_set()

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

    def publish(self, request: Published) -> None:
        """Write a registered call's request without waiting. A refusal fails the call; a
        connection lost before Redis acknowledged it keeps the request, which is sent again
        on the next connection unless Redis has it (the call fails only if Redis stays
        away past the grace, as ``ThreadChannel``'s)."""
        if not self._ready.is_set():
            raise redis.ConnectionError("Redis connection lost")
        task_id = request.task_id

        def acknowledged(replies: list[Any] | Exception) -> None:
            # The message's own write decides; a refused wake token or count does not.
            error = replies if isinstance(replies, Exception) else error_of(replies[0])
            entry = self._futures.get(task_id) if error is not None else None
            if entry is None or entry[0].done():
                return
            if isinstance(error, redis.ResponseError):
                text = f"request {task_id} was not queued: Redis refused it: {error}"
                entry[0].set_exception(BrokerUnavailableError(text))
                return
            self._orphans.append(request)
            if self._lost_at is None:
                self._lost_at = time.monotonic()

        self.conn.send(request.commands, acknowledged)

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
                slot = self._expire_after(task_id, timeout)
                try:
                    with contextlib.suppress(Exception):  # looked at below
                        await future
                finally:
                    bucket = self._deadlines.get(slot)
                    if bucket is not None:
                        bucket.pop(task_id, None)
            error = None if future.cancelled() else future.exception()
            if not future.cancelled() and error is None:
                return future.result()
            if isinstance(error, BrokerUnavailableError):
                raise error
            stored = await self.stored(task_id)
            if stored is not None:
                return stored
            raise broker.not_answered(task_id, timeout, lost=generation != self.generation)
        finally:
            self._futures.pop(task_id, None)

    def _expire_after(self, task_id: str, timeout: float) -> int:
        """Fail the call's wait after ``timeout`` (up to ``DEADLINE_STEP_S`` later): calls
        whose deadlines fall in one step share a timer."""
        loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + max(timeout, 0.0)) / DEADLINE_STEP_S)
        bucket = self._deadlines.get(slot)
        if bucket is None:
            bucket = self._deadlines[slot] = {}
            loop.call_at(slot * DEADLINE_STEP_S, self._expire, slot)
        bucket[task_id] = None
        return slot

    def _expire(self, slot: int) -> None:
        for task_id in self._deadlines.pop(slot, ()):
            entry = self._futures.get(task_id)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(_Expired())

    def _on_push(self, push: Push) -> None:
        for task_id, meta in _results(push):
            entry = self._futures.get(task_id)
            if entry is not None and not entry[0].done():
                entry[0].set_result(meta)

    async def _keep(self) -> None:
        while True:
            try:
                # Named after its reply channel, as ThreadChannel's: CLIENT LIST tells it.
                _, info = await self.conn.open(
                    [self.name], [("CLIENT", "SETNAME", self.name), ("INFO", "server")]
                )
                run_id = _run_id(info)
                if self._run_id is not None and run_id != self._run_id:
                    self.generation += 1
                self._run_id = run_id
                self._ready.set()
                await self._send_again()
                await self._recover()
                self.outage.ok()
                await self.conn.closed.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail_orphans_after_grace(exc)
                pause = self.outage.failed(exc)
                await asyncio.sleep(pause)
            self._ready.clear()

    async def _send_again(self) -> None:
        """Requests the lost connection took unacknowledged: sent again unless Redis has
        them."""
        orphans, self._orphans = self._orphans, []
        if not orphans:
            return
        try:
            present = await self.conn.execute([o.presence() for o in orphans])
        except redis.RedisError:
            self._orphans[:0] = orphans
            raise
        for i, (orphan, here) in enumerate(zip(orphans, present, strict=True)):
            entry = self._futures.get(orphan.task_id)
            if entry is None or entry[0].done():
                continue
            # A call whose request is there or sent again belongs to this generation.
            self._futures[orphan.task_id] = (entry[0], self.generation)
            if not here:
                try:
                    self.publish(orphan)
                except redis.RedisError:
                    self._orphans[:0] = orphans[i:]
                    raise
        self._lost_at = None

    def _fail_orphans_after_grace(self, exc: BaseException) -> None:
        if self._lost_at is None or time.monotonic() - self._lost_at < self.orphan_grace_s:
            return
        orphans, self._orphans = self._orphans, []
        self._lost_at = None
        for orphan in orphans:
            entry = self._futures.get(orphan.task_id)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(
                    BrokerUnavailableError(
                        f"request {orphan.task_id} may not have been queued: Redis became "
                        f"unreachable before it acknowledged it ({exc})"
                    )
                )

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

"""Awaiting task results in the API's event loop: one Redis subscription for all requests.

Celery's Redis result backend stores a result under ``celery-task-meta-<id>`` and publishes
it on a channel of the same name. The waiter subscribes to that channel before the request
is queued, so the published result cannot be missed, and reads the key after every
(re)subscription in case it was stored while the connection was down: a restarted Redis
costs a caller a reconnect, not its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis
import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

RESULT_PREFIX = "celery-task-meta-"


class ResultWaiter:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(self.url, socket_timeout=None)
        self._reader = asyncio.create_task(self._read_forever(), name="result-reader")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        if self._client is not None:
            await self._client.aclose()

    async def subscribe(self, task_id: str) -> asyncio.Future[bytes]:
        """Register interest in a result; call before queueing the task."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        try:
            await asyncio.wait_for(self._connected.wait(), timeout=10)
        except asyncio.TimeoutError:
            self._pending.pop(task_id, None)
            raise redis.ConnectionError("no result subscription for 10 s") from None
        async with self._lock:
            await self._pubsub.subscribe(RESULT_PREFIX + task_id)
        return future

    async def release(self, task_id: str) -> None:
        self._pending.pop(task_id, None)
        if self._pubsub is not None and self._connected.is_set():
            with contextlib.suppress(Exception):
                async with self._lock:
                    await self._pubsub.unsubscribe(RESULT_PREFIX + task_id)

    async def check_stored(self, task_id: str) -> None:
        """Resolve from the stored key (a result published while nobody listened)."""
        assert self._client is not None
        raw = await self._client.get(RESULT_PREFIX + task_id)
        future = self._pending.get(task_id)
        if raw is not None and future is not None and not future.done():
            future.set_result(raw if isinstance(raw, bytes) else raw.encode())

    async def _read_forever(self) -> None:
        assert self._client is not None
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                channels = [RESULT_PREFIX + t for t in self._pending]
                # Some channel is needed for the connection to be established.
                await pubsub.subscribe(RESULT_PREFIX + "-", *channels)
                self._pubsub = pubsub
                self._connected.set()
                for task_id in list(self._pending):
                    await self.check_stored(task_id)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message["type"] != "message":
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    future = self._pending.get(channel[len(RESULT_PREFIX) :])
                    if future is not None and not future.done():
                        future.set_result(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                logger.warning("result subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

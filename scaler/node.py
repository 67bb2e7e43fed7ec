"""Many hosts: a node agent per host, and the scaler's backend that talks to them.

``celery -A workers node`` runs on every host that should run workers, under that host's
supervisor (systemd, compose). It owns the host's worker processes as the local backend
does on the scaler's host (one per GPU and pinned to it, or CPU workers up to
``NODE_MAX_WORKERS``; recorded in the fleet; drained on stop) and reports the host's
capacity every second: CPUs, RAM, each GPU's total and free memory, and its live workers.

The scaler's ``nodes`` backend places a new worker on the live node with the most room
and sends it ``start`` and ``stop`` through a Redis list per node. Nothing crosses between
hosts but Redis traffic: a node reaches Redis, never the scaler.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from typing import Any

import click
import redis
from celery.bin.base import CeleryCommand

from common import keys
from common.contracts import is_alive
from common.redis import Outage, redis_client
from common.settings import WorkerSettings
from monitoring.resources import gpu_count, host_capacity
from scaler.backends import WORKER_PREFIX, LocalBackend, _pid_alive, new_hostname
from scaler.store import FleetRecord, ScalerStore

logger = logging.getLogger(__name__)

# A start the node has not listed yet counts as alive this long (the command's trip, the
# agent's next report).
START_GRACE_S = 10.0
# A command older than this is stale: the scaler has given up on it.
COMMAND_TTL_S = 30.0
# A node without a GPU runs this many CPU workers unless told otherwise.
DEFAULT_CPU_WORKERS = 2


# What a start command may name: a worker of this project, model queues.
_WORKER_NAME = re.compile(re.escape(WORKER_PREFIX) + r"[0-9a-f]{8}@[A-Za-z0-9][A-Za-z0-9_.-]*")
_QUEUE = re.compile(re.escape(keys.QUEUE_PREFIX) + r"[A-Za-z0-9_.-]+")


def allowed_worker_env(requested: dict[str, Any]) -> dict[str, str]:
    """The settings a start command may pass on: the workers' own (``WORKER_*``), nothing
    else. Whoever writes to Redis must not choose a process's environment (``LD_PRELOAD``,
    ``PYTHONPATH``)."""
    allowed = {f"WORKER_{name}".upper() for name in WorkerSettings.model_fields}
    env = {str(k): str(v) for k, v in requested.items() if str(k) in allowed}
    dropped = sorted(str(k) for k in requested if str(k) not in allowed)
    if dropped:
        logger.warning("a start command named settings that are not a worker's: %s", dropped)
    return env


def node_ttl_s(interval_s: float) -> float:
    """How long a node's report lives: three intervals, at least 3 s."""
    return max(3.0, 3 * interval_s)


class NodeAgent:
    """One host's agent: starts and stops its workers on command, reports its capacity."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str | None = None,
        max_workers: int | None = None,
        report_interval_s: float = 1.0,
        orphan_exit_s: float = 30.0,
        log_dir: Any = None,
        gpus: int | None = None,
    ) -> None:
        self.client = client
        self.name = name or socket.gethostname()
        self.gpus = gpu_count() if gpus is None else gpus
        self.max_workers = max_workers or self.gpus or DEFAULT_CPU_WORKERS
        self.interval_s = report_interval_s
        self.store = ScalerStore(client)
        self.backend = LocalBackend(
            self.store,
            log_dir=log_dir,
            orphan_exit_s=orphan_exit_s,
            gpus=self.gpus,
            host=self.name,
        )
        self.workers: dict[str, FleetRecord] = {}
        self.started_at = time.time()
        self.outage = Outage(f"node {self.name}")
        self._reported = 0.0

    # -- the run loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        logger.info(
            "node %s: up to %d workers%s",
            self.name,
            self.max_workers,
            f" (one per GPU of {self.gpus})" if self.gpus else " on the CPU",
        )
        adopted = False
        while not stop.is_set():
            try:
                if not adopted:
                    self.adopt()
                    adopted = True
                self.step()
                self.outage.ok()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                stop.wait(self.outage.failed(exc))

    def step(self) -> None:
        self.reap()
        if time.monotonic() - self._reported >= self.interval_s:
            self.report()
        item = self.client.blpop([keys.node_commands_key(self.name)], timeout=self.interval_s)
        if item is not None:
            try:
                command = json.loads(item[1])
                if not isinstance(command, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                logger.warning("node %s: dropped an unreadable command: %s", self.name, exc)
                return
            self.handle(command)

    def adopt(self) -> None:
        """Workers of this node still running from an earlier agent (it crashed or was
        restarted): owned again, not started twice."""
        for raw in self.client.hgetall(keys.FLEET).values():
            record = FleetRecord.from_json(raw)
            if record.host == self.name and record.pid and _pid_alive(record.pid, record.hostname):
                self.workers[record.hostname] = record
                logger.info("node %s: adopted worker %s", self.name, record.hostname)

    def handle(self, command: dict[str, Any]) -> None:
        op, hostname = command.get("op"), str(command.get("hostname", ""))
        sent = command.get("sent")
        if not isinstance(sent, (int, float)) or time.time() - sent > COMMAND_TTL_S:
            logger.warning("node %s: dropped a stale %s of %s", self.name, op, hostname)
            return
        if op == "start":
            queues = command.get("queues")
            queues = [str(q) for q in queues] if isinstance(queues, list) else [""]
            requested = command.get("env")
            if not _WORKER_NAME.fullmatch(hostname) or not hostname.endswith(f"@{self.name}"):
                logger.warning(
                    "node %s: refused a start of %r (not its worker)", self.name, hostname
                )
                return
            if hostname in self.workers:
                return
            if not all(_QUEUE.fullmatch(q) for q in queues):
                logger.warning("node %s: refused a start with queues %r", self.name, queues)
                return
            if len(self.workers) >= self.max_workers:
                logger.warning("node %s is full: not starting %s", self.name, hostname)
                return
            record = self.backend.start(
                queues,
                hostname=hostname,
                env=allowed_worker_env(requested if isinstance(requested, dict) else {}),
            )
            if record is not None:
                self.workers[hostname] = record
        elif op == "stop":
            record = self.workers.get(hostname)
            if record is not None:
                self.backend.stop(record)
        else:
            logger.warning("node %s: unknown command %r", self.name, op)
        self.report()

    def reap(self) -> None:
        for hostname, record in list(self.workers.items()):
            if not self.backend.alive(record):
                self.workers.pop(hostname)
                logger.info("node %s: worker %s exited", self.name, hostname)

    def report(self) -> dict[str, Any]:
        now = time.time()
        report = {
            "name": self.name,
            "pid": os.getpid(),
            "time": now,
            "started_at": self.started_at,
            "max_workers": self.max_workers,
            **host_capacity(),
            "workers": {
                h: {"pid": r.pid, "gpu": r.gpu, "started_at": r.started_at}
                for h, r in self.workers.items()
            },
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.set(
            keys.node_report_key(self.name),
            json.dumps(report),
            px=int(node_ttl_s(self.interval_s) * 1000),
        )
        pipe.zadd(keys.NODES, {self.name: now})
        # Nodes gone for a day leave the set.
        pipe.zremrangebyscore(keys.NODES, "-inf", now - 86400)
        pipe.execute()
        self._reported = time.monotonic()
        return report

    def drain(self, *, timeout_s: float = 60.0) -> None:
        """A stop of the agent: its workers warm-stop (their waiting requests go back to
        their queues), then the node leaves. The processes need no Redis for that."""
        for record in self.workers.values():
            self.backend.stop(record)
        deadline = time.monotonic() + timeout_s
        for record in self.workers.values():
            while self.backend.alive(record) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.backend.alive(record):
                os.kill(record.pid, signal.SIGKILL)
        stopped, self.workers = list(self.workers), {}
        try:
            pipe = self.client.pipeline(transaction=False)
            if stopped:
                pipe.hdel(keys.FLEET, *stopped)
            pipe.delete(keys.node_report_key(self.name))
            pipe.zrem(keys.NODES, self.name)
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("node %s: Redis away at stop (its report expires): %s", self.name, exc)


def live_nodes(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every node whose report has not expired, by name."""
    names = [keys.text(n) for n in client.zrange(keys.NODES, 0, -1) if isinstance(n, bytes)]
    if not names:
        return {}
    raws = client.mget([keys.node_report_key(n) for n in names])
    return {n: json.loads(raw) for n, raw in zip(names, raws, strict=True) if raw is not None}


def room(node: dict[str, Any], pending: int = 0) -> int:
    return int(node.get("max_workers", 0)) - len(node.get("workers", {})) - pending


def free_memory(node: dict[str, Any]) -> int:
    """The memory a new worker of this node would have: its freest GPU's, else RAM."""
    gpus = node.get("gpus") or []
    if gpus:
        return max(int(g.get("memory_free_bytes", 0)) for g in gpus)
    return int(node.get("ram_available_bytes", 0))


class NodeBackend:
    """The scaler's backend over node agents: workers on whichever host has room."""

    can_start = True

    def __init__(self, store: ScalerStore, *, env: dict[str, str] | None = None) -> None:
        self.store = store
        self.env = dict(env or {})
        self._nodes: dict[str, dict[str, Any]] = {}
        self._read_at = -1.0

    def nodes(self) -> dict[str, dict[str, Any]]:
        # Read once per tick, however many records ask.
        if time.monotonic() - self._read_at > 0.2:
            self._nodes = live_nodes(self.store.client)
            self._read_at = time.monotonic()
        return self._nodes

    def _pending(self) -> dict[str, int]:
        """Per node: workers commanded that its report does not list yet."""
        nodes = self.nodes()
        counts: dict[str, int] = {}
        now = time.time()
        for raw in self.store.client.hgetall(keys.FLEET).values():
            record = FleetRecord.from_json(raw)
            node = nodes.get(record.host)
            if (
                node is not None
                and record.hostname not in node.get("workers", {})
                and now - record.started_at < START_GRACE_S
            ):
                counts[record.host] = counts.get(record.host, 0) + 1
        return counts

    def place(self) -> str | None:
        """The live node with room for one more worker: the most room, then the most free
        device memory."""
        pending = self._pending()
        fits = [
            (room(node, pending.get(name, 0)), free_memory(node), name)
            for name, node in self.nodes().items()
        ]
        fits = [f for f in fits if f[0] > 0]
        return max(fits)[2] if fits else None

    def _send(self, node: str, command: dict[str, Any]) -> None:
        key = keys.node_commands_key(node)
        pipe = self.store.client.pipeline(transaction=False)
        pipe.rpush(key, json.dumps({**command, "sent": time.time()}))
        pipe.expire(key, int(COMMAND_TTL_S))
        pipe.execute()

    def start(self, queues: list[str]) -> FleetRecord | None:
        node = self.place()
        if node is None:
            logger.warning("no node has room for another worker (%d live)", len(self.nodes()))
            return None
        hostname = new_hostname(node)
        record = FleetRecord(
            hostname=hostname, pid=0, host=node, started_at=time.time(), queues=list(queues)
        )
        self.store.fleet_add(record)
        self._send(node, {"op": "start", "hostname": hostname, "queues": queues, "env": self.env})
        self._read_at = -1.0  # its room changed
        logger.info("asked node %s to start worker %s for %s", node, hostname, queues or "standby")
        return record

    def stop(self, record: FleetRecord) -> None:
        self._send(record.host, {"op": "stop", "hostname": record.hostname})

    def alive(self, record: FleetRecord) -> bool:
        node = self.nodes().get(record.host)
        if node is None:
            # The node is silent (its host lost, or only its link to Redis): its worker is
            # alive for as long as it reports itself.
            raw = self.store.client.get(keys.worker_report_key(record.hostname))
            return raw is not None and is_alive(json.loads(raw), time.time())
        if record.hostname in node.get("workers", {}):
            return True
        return time.time() - record.started_at < START_GRACE_S

    def adopt(self, hostname: str, report: dict[str, Any]) -> FleetRecord | None:
        """A worker a live node lists but the fleet does not (its record went while its
        node was cut off): recorded again, so that the scaler may stop it."""
        node = self.nodes().get(str(report.get("host")))
        info = (node or {}).get("workers", {}).get(hostname)
        if info is None:
            return None
        record = FleetRecord(
            hostname=hostname,
            pid=int(info.get("pid", 0)),
            host=str(report["host"]),
            started_at=float(info.get("started_at", time.time())),
            queues=[q for q in report.get("queues", []) if q.startswith(keys.QUEUE_PREFIX)],
            seen=True,
            gpu=info.get("gpu"),
        )
        self.store.fleet_add(record)
        return record


def run_agent(agent: NodeAgent) -> None:
    """Until SIGTERM or SIGINT, then drain."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run(stop)
    logger.info("node %s stopping: draining its workers", agent.name)
    agent.drain()


@click.command(cls=CeleryCommand)
@click.option("--name", help="The node's name (NODE_NAME); default: the hostname.")
@click.option("--max-workers", type=int, help="Workers at most (NODE_MAX_WORKERS).")
@click.option("-l", "--loglevel", default="INFO", help="Logging level.")
@click.pass_context
def node(ctx: click.Context, name: str | None, max_workers: int | None, loglevel: str) -> None:
    """Run this host's node agent: the scaler's ``nodes`` backend starts and stops
    workers here through it."""
    from common.settings import node_settings, serving_settings

    logging.basicConfig(
        level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
    )
    settings = node_settings()
    client = redis_client(serving_settings().redis_url, socket_timeout=10)
    agent = NodeAgent(
        client,
        name=name or settings.name,
        max_workers=max_workers or settings.max_workers,
        report_interval_s=settings.report_interval_s,
        orphan_exit_s=settings.orphan_exit_s,
        log_dir=settings.log_dir,
    )
    run_agent(agent)

"""The node agent on this host (no namespaces): what a start command may ask of it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from common import keys
from scaler.node import NodeAgent
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


def test_a_start_command_passes_worker_settings_only_and_names_only_its_workers(
    client: redis.Redis, tmp_path: Path
) -> None:
    agent = NodeAgent(client, name="here", max_workers=1, gpus=0, log_dir=tmp_path)
    queue = keys.queue_name("example", "v1")

    def start(hostname: str, queues: list[str], env: dict[str, str]) -> None:
        agent.handle(
            {"op": "start", "hostname": hostname, "queues": queues, "env": env,
             "sent": time.time()}
        )  # fmt: skip

    try:
        start("scaled-0123abcd@elsewhere", [queue], {})  # another node's worker
        start("-n x@here", [queue], {})  # not a worker name
        start("scaled-0123abcd@here", ["celery,pidbox"], {})  # not model queues
        # Garbage through Redis is dropped, and the agent goes on.
        for raw in (b"not json", b"[1, 2]", b'{"op": "start", "sent": "soon"}'):
            client.rpush(keys.node_commands_key("here"), raw)
            agent.step()
        agent.handle({"op": "start", "hostname": "scaled-0123abcd@here", "queues": "x",
                      "env": [1], "sent": time.time()})  # fmt: skip
        assert agent.workers == {}

        start(
            "scaled-0123abcd@here",
            [queue],
            {"WORKER_MAX_BATCH_SIZE": "8", "LD_PRELOAD": "/tmp/x.so", "PYTHONPATH": "/tmp"},
        )
        record = agent.workers["scaled-0123abcd@here"]
        env = environ(record.pid)
        assert env["WORKER_MAX_BATCH_SIZE"] == "8"
        assert "LD_PRELOAD" not in env and "/tmp" not in env["PYTHONPATH"].split(":")
        # Full: a second start is refused.
        start("scaled-4567cdef@here", [queue], {})
        assert list(agent.workers) == ["scaled-0123abcd@here"]
        # A stale command (older than the scaler waits) is dropped.
        agent.handle({"op": "stop", "hostname": "scaled-0123abcd@here", "sent": 0})
        assert agent.backend.alive(record)
        agent.handle({"op": "stop", "hostname": "scaled-0123abcd@here", "sent": time.time()})
        wait_for(lambda: not agent.backend.alive(record), timeout_s=60, what="a warm stop")
    finally:
        agent.drain(timeout_s=30)
    assert not client.exists(keys.node_report_key("here"))


def test_the_agent_command_starts_what_the_backend_asks_and_drains_on_sigterm(
    client: redis.Redis, tmp_path: Path
) -> None:
    import json
    import os

    from scaler.node import NodeBackend, live_nodes
    from scaler.store import ScalerStore
    from tests.helpers import ServiceProcess

    agent = ServiceProcess(
        "node",
        ["-m", "celery", "-A", "workers", "node", "--name", "here", "--max-workers", "1"],
        env={"NODE_REPORT_INTERVAL_S": "0.25"},
        log_dir=tmp_path,
    )
    try:
        node = wait_for(lambda: live_nodes(client).get("here"), timeout_s=60, what="the node")
        assert node["max_workers"] == 1 and node["ram_total_bytes"] > 0
        backend = NodeBackend(ScalerStore(client))
        record = backend.start([keys.queue_name("example", "v1")])
        assert record is not None and record.hostname.endswith("@here")
        assert backend.start([]) is None  # the node's one slot is taken
        report = wait_for(
            lambda: client.get(keys.worker_report_key(record.hostname)),
            timeout_s=60,
            what=lambda: f"the worker's report\n{agent.log()}",
        )
        pid = json.loads(report)["pid"]
        assert json.loads(client.hget(keys.FLEET, record.hostname))["pid"] == pid
        assert backend.alive(record)

        agent.proc.terminate()  # SIGTERM: the agent drains its worker, then leaves
        assert agent.proc.wait(60) == 0, agent.log()
        assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped by the agent
        assert not client.hexists(keys.FLEET, record.hostname)
        assert "here" not in live_nodes(client)
    finally:
        agent.stop()

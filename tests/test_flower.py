"""Flower (``celery -A workers flower``) against a running worker: its API needs the basic
auth, and with it lists the worker and the model queue the worker consumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common import keys
from common.redis import free_port
from tests.helpers import ServiceProcess, wait_for

pytestmark = pytest.mark.timeout(120)


def test_flower_shows_workers_and_model_queues(
    client: redis.Redis, start_worker: Any, tmp_path: Path
) -> None:
    queue = keys.queue_name("linear", "v1")
    worker = start_worker("flower-w1", queues=[queue])
    port = free_port()
    flower = ServiceProcess(
        "flower",
        ["-m", "celery", "-A", "workers", "flower", f"--port={port}"],
        env={"FLOWER_BASIC_AUTH": "ops:secret"},
        log_dir=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    auth = ("ops", "secret")
    try:

        def answering() -> httpx.Response | None:
            assert flower.proc.poll() is None, flower.log()
            try:
                return httpx.get(base + "/api/workers", timeout=5)
            except httpx.HTTPError:
                return None

        unauthenticated = wait_for(answering, timeout_s=60, what="flower to answer")
        assert unauthenticated.status_code == 401
        wrong = httpx.get(base + "/api/workers", auth=("ops", "nope"), timeout=5)
        assert wrong.status_code == 401

        def lists_worker() -> dict[str, Any] | None:
            response = httpx.get(base + "/api/workers?refresh=1", auth=auth, timeout=30)
            assert response.status_code == 200, response.text
            workers = response.json()
            return workers if worker.hostname in workers else None

        workers = wait_for(lists_worker, timeout_s=60, what="flower to list the worker")
        consumed = {q["name"] for q in workers[worker.hostname].get("active_queues", [])}
        assert queue in consumed

        def lengths() -> dict[str, int] | None:
            response = httpx.get(base + "/api/queues/length", auth=auth, timeout=30)
            assert response.status_code == 200, response.text
            found = {q["name"]: q["messages"] for q in response.json().get("active_queues", [])}
            return found if queue in found else None

        found = wait_for(lengths, timeout_s=30, what="flower's queue lengths")
        assert found[queue] == 0

        # Flower's Prometheus text is closed too; a scraper gives the credentials.
        assert httpx.get(base + "/metrics", timeout=10).status_code == 401
        metrics = httpx.get(base + "/metrics", auth=auth, timeout=10)
        assert metrics.status_code == 200 and "flower_" in metrics.text
    finally:
        flower.stop()

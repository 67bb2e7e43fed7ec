"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) against uvicorn, a real
worker and Redis: no generated request may get a 5xx answer.

The one 5xx a correct server gives to a valid request is 504 for a ``timeout`` shorter
than the model can answer in; it is accepted only for timeouts under a second.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from common import keys
from tests.helpers import ApiProcess, WorkerProcess, wait_for

pytestmark = pytest.mark.timeout(300)

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATUSES: Counter[int] = Counter()
EXAMPLES = 100


@pytest.fixture(scope="module")
def api_url(
    tmp_path_factory: pytest.TempPathFactory, example_repo: Path, redis_server: Any
) -> Iterator[str]:
    redis_server.start()
    root = tmp_path_factory.mktemp("fuzz")
    repo = root / "repo"
    shutil.copytree(example_repo, repo)
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    env = {"MODEL_REPOSITORY": str(repo)}
    worker = WorkerProcess(
        "fuzz-w1",
        queues=[keys.queue_name("example", "v1")],
        env={**env, "WORKER_MODELS": "example:v1"},
        log_dir=root,
    )
    worker.wait_ready(client)
    wait_for(
        lambda: (worker.report(client) or {}).get("models"), timeout_s=60, what="example loaded"
    )
    api = ApiProcess("fuzz-api", env={**env, "API_TOKEN": TOKEN}, log_dir=root)
    api.wait_ready()
    yield api.url
    api.stop()
    worker.stop(timeout_s=15)
    client.delete(keys.OVERRIDES)


def test_no_server_errors(api_url: str) -> None:
    # Driven through hypothesis directly: schemathesis' pytest plugin does not load under
    # this pytest version.
    schema = schemathesis.openapi.from_url(api_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(base_url=api_url, headers=AUTH, timeout=60)
            STATUSES[response.status_code] += 1
            if response.status_code == 504:
                body = case.body if isinstance(case.body, dict) else {}
                assert float(body.get("timeout") or 30) < 1.0, response.text
                return
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.query} {case.body!r} -> "
                f"{response.status_code} {response.text[:500]}"
            )

        check()
    total = sum(STATUSES.values())
    print(f"schemathesis sent {total} requests; statuses {dict(sorted(STATUSES.items()))}")
    assert total >= 5 * len(operations), STATUSES

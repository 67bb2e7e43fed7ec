"""Test session: a private Redis-compatible server on a free port, flushed per test, and
real worker processes. The server starts before any test module imports the Celery app,
so that the app's settings point at it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.redis import EmbeddedRedis
from tests.helpers import WorkerProcess, write_state_dict_model

_server: EmbeddedRedis | None = None
# Short leases and intervals for the session's workers (and REDIS_URL, MODEL_REPOSITORY and
# MODEL_FACTORY_MODULES beside them).
SESSION_ENV = {
    "VISIBILITY_TIMEOUT_S": "3",
    "UNACKED_RESTORE_INTERVAL_S": "0.5",
    "REGISTRY_CACHE_S": "0",
    "WORKER_REPORT_INTERVAL_S": "0.25",
    "WORKER_TORCH_THREADS": "1",
    "WORKER_FAILURE_COOLDOWN_SECONDS": "2",
}
_session_dir = Path(tempfile.mkdtemp(prefix="inference-tests-"))


def pytest_configure(config: pytest.Config) -> None:
    global _server
    _server = EmbeddedRedis().start()
    repo = _session_dir / "repo"
    from loader.examples import write_examples

    write_examples(repo)
    os.environ.update(
        REDIS_URL=_server.url,
        MODEL_REPOSITORY=str(repo),
        MODEL_FACTORY_MODULES="tests.factories",
        **SESSION_ENV,
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.__exit__(None, None, None)
    shutil.rmtree(_session_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> EmbeddedRedis:
    assert _server is not None
    return _server


@pytest.fixture(scope="session")
def example_repo() -> Path:
    return _session_dir / "repo"


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    redis_server.start()  # a test may have stopped it
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def test_repo(tmp_path: Path, example_repo: Path) -> Path:
    """A repository of its own per test: the examples plus the test factories' models."""
    repo = tmp_path / "repo"
    shutil.copytree(example_repo, repo)
    write_state_dict_model(
        repo,
        "recorder",
        "v1",
        factory="recorder",
        factory_kwargs={"log_path": str(tmp_path / "executions.log")},
    )
    write_state_dict_model(
        repo,
        "picky",
        "v1",
        factory="picky",
        batching={"max_batch_size": 8, "max_batch_delay_ms": 300},
    )
    return repo


@pytest.fixture
def start_worker(tmp_path: Path, client: redis.Redis) -> Iterator[object]:
    """Start real worker processes; all are stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def start(
        name: str = "w1",
        *,
        queues: list[str] | None = None,
        repo: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        worker_env = dict(env or {})
        if repo is not None:
            worker_env["MODEL_REPOSITORY"] = str(repo)
        worker = WorkerProcess(name, queues=queues or [], env=worker_env, log_dir=tmp_path)
        started.append(worker)
        if wait:
            worker.wait_ready(client)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout_s=15)

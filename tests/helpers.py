"""Test helpers: waiting on conditions, writing small model repositories, worker processes."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import torch

import tests.factories  # noqa: F401 - registers the test model factories
from common import keys
from scaler import processes

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout_s: float = 30.0,
    what: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``
    (``what`` may be a function: what to tell, read when it failed)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            told = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s} s waiting for {told}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def write_state_dict_model(
    root: Path,
    name: str,
    version: str,
    *,
    factory: str,
    features: int = 4,
    factory_kwargs: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
) -> Path:
    from loader.factories import get_factory

    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"features": features, **(factory_kwargs or {})}
    module = get_factory(factory)(**kwargs)
    torch.save(module.state_dict(), folder / "model.pt")
    spec = {
        "format": "state_dict",
        "file": "model.pt",
        "factory": factory,
        "factory_kwargs": kwargs,
        "input": {"dtype": "float32", "shape": [features]},
        "batching": batching or {},
    }
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


def write_slow_recorder(repo: Path, log: Path, *, delay_s: float) -> str:
    """``slow/v1``: doubles its input, sleeps ``delay_s`` per batch of at most 4 and logs
    every row it runs to ``log``. Returns its queue."""
    write_state_dict_model(
        repo,
        "slow",
        "v1",
        factory="recorder",
        factory_kwargs={"delay_s": delay_s, "log_path": str(log)},
        batching={"max_batch_size": 4},
    )
    return keys.queue_name("slow", "v1")


class WorkerProcess(processes.WorkerProcess):
    """A real ``celery -A workers worker`` subprocess, with test conveniences."""

    def __init__(self, name: str, *, queues: list[str], env: dict[str, str], log_dir: Path) -> None:
        super().__init__(
            f"{name}@test",
            queues=queues,
            env={"PYTHONPATH": str(ROOT), **env},
            log_path=log_dir / f"{name}.log",
        )

    def wait_ready(self, client: redis.Redis, *, timeout_s: float = 60.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if not self.alive:
                raise AssertionError(f"worker {self.hostname} exited:\n{self.log()}")
            raw = client.get(keys.worker_report_key(self.hostname))
            if raw is None or "ready." not in self.log():
                return None
            return json.loads(raw)  # type: ignore[no-any-return]

        return wait_for(ready, timeout_s=timeout_s, what=f"worker {self.hostname} ready")  # type: ignore[no-any-return]

    def report(self, client: redis.Redis) -> dict[str, Any] | None:
        raw = client.get(keys.worker_report_key(self.hostname))
        return json.loads(raw) if raw else None

    def log(self) -> str:
        return self.log_tail()


class ServiceProcess:
    """A project command run as a subprocess (``python -m ...``) with its log in a file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        import os
        import subprocess
        import sys

        from common.redis import die_with_parent

        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class BeatProcess(ServiceProcess):
    """A real ``celery -A workers beat`` subprocess: the scaler."""

    def __init__(self, name: str, *, env: dict[str, str], log_dir: Path) -> None:
        argv = ["-m", "celery", "-A", "workers", "beat", "--loglevel", "INFO"]
        super().__init__(
            name, [*argv, "-s", str(log_dir / f"{name}-schedule")], env=env, log_dir=log_dir
        )


class ApiProcess(ServiceProcess):
    """``python -m api`` (uvicorn) on a free loopback port."""

    def __init__(self, name: str, *, env: dict[str, str], log_dir: Path) -> None:
        from common.redis import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            name, ["-m", "api"], env={"API_PORT": str(self.port), **env}, log_dir=log_dir
        )

    def wait_ready(self, *, timeout_s: float = 60.0) -> None:
        import httpx

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"API exited:\n{self.log()}")
            try:
                return httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s=timeout_s, what="the API to answer")


def stop_fleet(client: redis.Redis, *, timeout_s: float = 30.0) -> None:
    """Warm-stop every worker the local backend recorded, then kill what remains."""
    import os
    import signal

    records = [json.loads(raw) for raw in client.hgetall(keys.FLEET).values()]
    for record in records:
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    for record in records:
        while time.monotonic() < deadline:
            try:
                os.kill(record["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record["pid"], signal.SIGKILL)
    client.delete(keys.FLEET)

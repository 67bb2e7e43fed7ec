"""Predictions through real Redis and a real worker process: formats, versions, batching,
result kinds, bad input and remote control."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from common import keys
from common.contracts import report_ttl_s
from common.errors import (
    ModelExecutionError,
    ModelLoadError,
    PayloadTooLargeError,
    RejectedMessageError,
    SchemaError,
    UnknownModelError,
)
from loader.formats import load_module
from loader.repository import ModelRepository
from tests.helpers import WorkerProcess, wait_for, write_state_dict_model

pytestmark = pytest.mark.timeout(120)

WORKER_PAYLOAD_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, example_repo: Path) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("serving") / "repo"
    shutil.copytree(example_repo, root)
    write_state_dict_model(
        root,
        "picky",
        "v1",
        factory="picky",
        batching={"max_batch_size": 8, "max_batch_delay_ms": 400},
    )
    broken = root / "broken" / "v1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text(
        json.dumps(
            {
                "format": "state_dict",
                "factory": "linear",
                "input": {"dtype": "float32", "shape": [8]},
            }
        )
    )
    (broken / "model.pt").write_bytes(b"this is not a model file")
    return root


@pytest.fixture(scope="module")
def worker(
    repo: Path, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    queues = [
        keys.queue_name(n, v)
        for n in ModelRepository(repo).list_models()
        for v in ModelRepository(repo).versions(n)
    ]
    proc = WorkerProcess(
        "serving",
        queues=queues,
        log_dir=tmp_path_factory.mktemp("logs"),
        env={"MODEL_REPOSITORY": str(repo), "MAX_PAYLOAD_BYTES": str(WORKER_PAYLOAD_LIMIT)},
    )
    proc.wait_ready(client)
    yield proc
    proc.stop()
    client.close()


@pytest.fixture
def rclient(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def local_model(repo: Path, name: str, version: str) -> Any:
    repository = ModelRepository(repo)
    spec = repository.spec(name, version)
    return load_module(spec, repository.model_file(name, version, spec), torch.device("cpu"))


def run_local(module: Any, rows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(rows))).numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("name", "shape"),
    [("tiny_mlp", (64,)), ("small_cnn", (3, 64, 64)), ("linear", (8,))],
    ids=["torchscript", "export", "state_dict"],
)
def test_round_trip_for_each_format(
    worker: WorkerProcess, repo: Path, name: str, shape: tuple[int, ...]
) -> None:
    from tasks import predict

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    served = predict.delay(name, x).get(timeout=60)
    expected = run_local(local_model(repo, name, "v1"), x[None])[0]
    assert isinstance(served, np.ndarray)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_versions_serve_side_by_side(worker: WorkerProcess, repo: Path) -> None:
    from tasks import predict

    x = [0.5] * 8
    v1 = predict.apply_async(("linear", x), kwargs={"version": "v1"}).get(timeout=30)
    v2 = predict.apply_async(("linear", x), kwargs={"version": "v2"}).get(timeout=30)
    default = predict.delay("linear", x).get(timeout=30)
    rows = np.asarray([x], np.float32)
    np.testing.assert_allclose(v1, run_local(local_model(repo, "linear", "v1"), rows)[0], rtol=1e-5)
    np.testing.assert_allclose(v2, run_local(local_model(repo, "linear", "v2"), rows)[0], rtol=1e-5)
    assert not np.allclose(v1, v2)
    assert default == v1  # linear/model.json names v1 the default


def test_results_come_back_as_the_kind_sent(worker: WorkerProcess) -> None:
    from tasks import predict, predict_batch

    as_list = predict.delay("linear", [1.0] * 8).get(timeout=30)
    as_array = predict.delay("linear", np.ones(8, np.float32)).get(timeout=30)
    as_tensor = predict.delay("linear", torch.ones(8)).get(timeout=30)
    batch = predict_batch.delay("linear", np.ones((3, 8), np.float32)).get(timeout=30)
    batch_list = predict_batch.delay("linear", [[1.0] * 8, [2.0] * 8]).get(timeout=30)
    assert isinstance(as_list, list) and len(as_list) == 4
    assert isinstance(as_array, np.ndarray) and as_array.dtype == np.float32
    assert isinstance(as_tensor, torch.Tensor) and tuple(as_tensor.shape) == (4,)
    assert isinstance(batch, np.ndarray) and batch.shape == (3, 4)
    assert isinstance(batch_list, list) and len(batch_list) == 2
    np.testing.assert_allclose(as_array, as_list, rtol=1e-6)
    np.testing.assert_allclose(as_tensor.numpy(), as_list, rtol=1e-6)


def test_batched_rows_equal_single_runs(
    worker: WorkerProcess, repo: Path, rclient: redis.Redis
) -> None:
    from tasks import predict

    rows = np.random.default_rng(1).uniform(0.1, 1.0, (8, 4)).astype(np.float32)
    results = [predict.delay("picky", row) for row in rows]
    outputs = np.stack([r.get(timeout=30) for r in results])
    np.testing.assert_allclose(outputs, rows, rtol=1e-6)  # picky returns its input

    def batched() -> dict[str, int] | None:
        report = worker.report(rclient) or {}
        stats = report.get("batching", {}).get("picky/v1")
        return stats if stats and stats["rows"] >= 8 else None

    stats = wait_for(batched, what="picky's batch statistics in the worker report")
    assert stats["max_batch_rows"] == 8, stats  # eight requests within the 400 ms window: one pass

    # Rows from a real batch of the MLP equal the same inputs run one at a time in-process.
    inputs = np.random.default_rng(2).standard_normal((24, 64)).astype(np.float32)
    served = np.stack([r.get(timeout=30) for r in [predict.delay("tiny_mlp", x) for x in inputs]])
    module = local_model(repo, "tiny_mlp", "v1")
    singles = np.stack([run_local(module, x[None])[0] for x in inputs])
    np.testing.assert_allclose(served, singles, rtol=1e-4, atol=1e-5)


def test_a_result_tells_how_it_was_served(worker: WorkerProcess) -> None:
    from celery.result import AsyncResult

    from tasks import predict
    from workers import app

    results = [predict.delay("linear", [float(i)] * 8, version="v2") for i in range(20)]
    for r in results:
        r.get(timeout=60)
    first = results[0]
    assert first.worker == worker.hostname and first.queue == keys.queue_name("linear", "v2")
    info = first.inference
    assert info is not None and info["version"] == "v2"
    assert 1 <= info["batch_size"] <= 20
    assert info["queue_wait_ms"] >= 0 and info["inference_ms"] > 0
    # Another process's handle reads the same from the stored result (Celery's meta).
    other = AsyncResult(first.id, app=app)
    assert other.worker == worker.hostname
    assert other._get_task_meta()["inference"] == info
    # A request refused by the worker says who refused it.
    bad = predict.delay("linear", [1.0, 2.0])
    with pytest.raises(SchemaError):
        bad.get(timeout=30)
    assert bad.worker == worker.hostname and bad.inference["version"] == "v1"


def test_a_bad_request_fails_alone_in_its_batch(worker: WorkerProcess) -> None:
    from tasks import predict

    good = [predict.delay("picky", [float(i + 1), 1.0, 1.0, 1.0]) for i in range(5)]
    raising = predict.delay("picky", [-1.0, 1.0, 1.0, 1.0])  # the model raises on this row
    wrong_shape = predict.delay("picky", [1.0, 2.0])
    wrong_dtype = predict.delay("picky", np.ones(4, np.float64))
    not_finite = [predict.delay("picky", [1.0, v, 1.0, 1.0]) for v in (np.nan, np.inf, -np.inf)]
    assert [r.get(timeout=30)[0] for r in good] == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ModelExecutionError, match="negative first feature"):
        raising.get(timeout=30)
    with pytest.raises(SchemaError, match=r"float32\[4\]"):
        wrong_shape.get(timeout=30)
    with pytest.raises(SchemaError, match=r"dtype float64 .* float32\[4\]"):
        wrong_dtype.get(timeout=30)
    for result in not_finite:  # the HTTP API's rule (422 there)
        with pytest.raises(SchemaError, match="finite numbers"):
            result.get(timeout=30)


def test_unknown_model_or_version_fails_in_the_producer(worker: WorkerProcess) -> None:
    from tasks import predict

    with pytest.raises(
        UnknownModelError, match=r"unknown model 'nope'; models: .*linear.*tiny_mlp"
    ):
        predict.delay("nope", [1.0])
    with pytest.raises(UnknownModelError, match=r"'linear' has no version 'v9'; versions: v1, v2"):
        predict.apply_async(("linear", [1.0] * 8), kwargs={"version": "v9"})
    with pytest.raises(ValueError, match="invalid model name"):
        predict.delay("../etc", [1.0])


def test_broken_model_file_fails_its_callers_and_nothing_else(
    worker: WorkerProcess, rclient: redis.Redis
) -> None:
    from tasks import predict

    with pytest.raises(ModelLoadError, match=r"model\.pt"):
        predict.delay("broken", [1.0] * 8).get(timeout=30)
    assert len(predict.delay("linear", [1.0] * 8).get(timeout=30)) == 4
    record = wait_for(
        lambda: rclient.hget(keys.LOAD_FAILURES, "broken/v1"),
        what="the load failure recorded in Redis",
    )
    assert "ModelLoadError" in json.loads(record)["error_type"]
    report = wait_for(
        lambda: (worker.report(rclient) or {}).get("failed_models"),
        what="the failed model in the worker report",
    )
    assert report[0]["name"] == "broken"
    # Within the cooldown, a second caller gets the recorded error at once.
    with pytest.raises(ModelLoadError):
        predict.delay("broken", [1.0] * 8).get(timeout=30)
    assert worker.proc.poll() is None


def test_oversized_payloads_are_refused(worker: WorkerProcess) -> None:
    from tasks import predict

    with pytest.raises(PayloadTooLargeError, match="MAX_PAYLOAD_BYTES"):
        predict.delay("linear", np.zeros(5_000_000, np.float32))
    # The worker's own limit is lower than this producer's: it refuses before decoding.
    with pytest.raises(PayloadTooLargeError, match=f"limit of {WORKER_PAYLOAD_LIMIT} bytes"):
        predict.delay("linear", [0.123456789] * 40_000).get(timeout=30)
    assert len(predict.delay("linear", [1.0] * 8).get(timeout=30)) == 4


class _Exploit:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_a_pickle_message_is_rejected_never_executed(worker: WorkerProcess, tmp_path: Path) -> None:
    from kombu import Connection, Exchange, Producer

    from workers import app

    marker = tmp_path / "pwned"
    task_id = "pickle-probe"
    with Connection(app.conf.broker_url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(""), serializer="pickle")
        producer.publish(
            ((_Exploit(str(marker)),), {"version": "v1"}, {}),
            routing_key=keys.queue_name("linear", "v1"),
            headers={
                "task": "tasks.predict",
                "id": task_id,
                "lang": "py",
                "argsrepr": "",
                "kwargsrepr": "",
            },
        )
    with pytest.raises(RejectedMessageError, match="not accepted"):
        app.AsyncResult(task_id).get(timeout=30)
    assert not marker.exists()
    from tasks import predict

    assert len(predict.delay("linear", [1.0] * 8).get(timeout=30)) == 4


def test_expired_requests_are_revoked(worker: WorkerProcess) -> None:
    from celery.exceptions import TaskRevokedError

    from tasks import predict

    result = predict.apply_async(("linear", [1.0] * 8), expires=-1)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=30)


def test_a_plain_producer_script_in_another_process(worker: WorkerProcess, tmp_path: Path) -> None:
    script = tmp_path / "producer.py"
    script.write_text(
        textwrap.dedent("""
        import json
        import numpy as np
        from tasks import predict
        result = predict.apply_async(("linear", np.ones(8, np.float32)),
                                     kwargs={"version": "v2"}, priority=3, expires=60)
        print(json.dumps(result.get(timeout=30).tolist()))
    """)
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    from tasks import predict

    expected = predict.apply_async(("linear", [1.0] * 8), kwargs={"version": "v2"}).get(timeout=30)
    np.testing.assert_allclose(json.loads(done.stdout), expected, rtol=1e-6)


def test_remote_control_preloads_reports_and_unloads(worker: WorkerProcess) -> None:
    from workers import app

    def cached() -> dict[str, Any]:
        replies = app.control.inspect(destination=[worker.hostname], timeout=5)._request(
            "cached_models"
        )
        return replies[worker.hostname]

    reply = app.control.broadcast(
        "preload_model",
        arguments={"model": "small_cnn", "version": "v1"},
        destination=[worker.hostname],
        reply=True,
        timeout=5,
    )
    assert "small_cnn/v1" in reply[0][worker.hostname]["ok"]
    wait_for(
        lambda: any(m["name"] == "small_cnn" for m in cached()["loaded"]),
        what="small_cnn in the worker's cache",
    )
    reply = app.control.broadcast(
        "unload_model",
        arguments={"model": "small_cnn", "version": "v1"},
        destination=[worker.hostname],
        reply=True,
        timeout=5,
    )
    assert reply[0][worker.hostname] == {"ok": "small_cnn/v1 unloaded"}
    assert not any(m["name"] == "small_cnn" for m in cached()["loaded"])
    reply = app.control.broadcast(
        "preload_model",
        arguments={"model": "ghost"},
        destination=[worker.hostname],
        reply=True,
        timeout=5,
    )
    assert "unknown model 'ghost'" in reply[0][worker.hostname]["error"]


def test_worker_report_describes_the_worker(worker: WorkerProcess, rclient: redis.Redis) -> None:
    from tasks import predict

    predict.delay("linear", [1.0] * 8).get(timeout=30)
    report = wait_for(lambda: worker.report(rclient), what="worker report")
    assert report["pid"] == worker.proc.pid
    assert report["device"] == "cpu"
    assert report["device_memory"]["gpu"] is None and "no GPU" in report["device_memory"]["reason"]
    assert keys.queue_name("linear", "v1") in report["queues"]
    assert any(m["name"] == "linear" and m["bytes"] > 0 for m in report["models"])
    assert report["served"] >= 1 and report["resources"]["rss_bytes"] > 0
    ttl = rclient.ttl(keys.worker_report_key(worker.hostname))
    assert 0 < ttl <= report_ttl_s(0.25)  # the tests' report interval


def test_task_events_reach_monitors_like_flower(worker: WorkerProcess) -> None:
    import threading

    from workers import app

    events: list[dict[str, Any]] = []
    ready = threading.Event()

    def capture() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": events.append})
            ready.set()
            receiver.should_stop = False
            thread_state["receiver"] = receiver
            receiver.capture(limit=None, timeout=None, wakeup=False)

    thread_state: dict[str, Any] = {}
    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(10)
    app.control.enable_events(destination=[worker.hostname])  # what Flower does
    try:
        from tasks import predict

        def delivered() -> set[str] | None:
            # A request sent before the worker took the command has no events: try again.
            result = predict.delay("linear", [1.0] * 8)
            result.get(timeout=30)

            def both() -> set[str] | None:
                kinds = {e["type"] for e in events if e.get("uuid") == result.id}
                return kinds if {"task-received", "task-succeeded"} <= kinds else None

            try:
                return wait_for(both, timeout_s=3, what="both events")
            except AssertionError:
                return None

        assert wait_for(delivered, timeout_s=30, what="task events for a prediction")
    finally:
        app.control.disable_events(destination=[worker.hostname])
        receiver = thread_state.get("receiver")
        if receiver is not None:
            receiver.should_stop = True
        thread.join(10)


def test_an_undecodable_message_fails_its_caller_at_once(worker: WorkerProcess) -> None:
    from kombu import Connection, Exchange, Producer

    from workers import app

    task_id = "garbage-probe"
    with Connection(app.conf.broker_url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(""))
        producer.publish(
            b"\xc1 not msgpack",
            routing_key=keys.queue_name("linear", "v1"),
            content_type="application/x-inference-tensor",
            content_encoding="binary",
            headers={"task": "tasks.predict", "id": task_id, "lang": "py"},
        )
    with pytest.raises(RejectedMessageError, match=r"undecodable tasks\.predict request"):
        app.AsyncResult(task_id).get(timeout=30)
    from tasks import predict

    assert len(predict.delay("linear", [1.0] * 8).get(timeout=30)) == 4


def test_a_worker_with_no_queue_waits_instead_of_spinning(
    start_worker: Any, client: redis.Redis
) -> None:
    """A warm standby consumes nothing: its serving loop sleeps on Redis. (It once spun,
    and a model it preloaded took 24 s instead of 1 for want of the GIL.)"""
    import os

    worker = start_worker("standby", queues=[])
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def report_time() -> float:
        raw = client.get(keys.worker_report_key(worker.hostname))
        return float(json.loads(raw)["time"]) if raw else 0.0

    def warm() -> float:
        # Its one-time start-up work (a format's first-use cost) is not idling.
        raw = client.get(keys.worker_report_key(worker.hostname))
        report = json.loads(raw) if raw else {"prewarming": True}
        return 0.0 if report["prewarming"] else float(report["time"])

    first = wait_for(warm, what="a report after the prewarm")
    cpu_before = cpu_s()
    # Three more seconds by the worker's own reports (once a second), not a sleep here.
    later = wait_for(lambda: (t := report_time()) >= first + 3 and t, what="three seconds")
    used = cpu_s() - cpu_before
    assert used < 0.5 * (later - first), f"{used:.2f} s of CPU in {later - first:.1f} s idle"

"""The HTTP API served by uvicorn on a loopback port, called over HTTP, with a real worker:
every endpoint's success and error paths, metrics of a scripted workload, Prometheus text."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from common import keys
from loader.formats import load_module
from loader.repository import ModelRepository
from tests.helpers import ApiProcess, WorkerProcess, wait_for, write_slow_recorder

pytestmark = pytest.mark.timeout(120)

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Stack:
    def __init__(self, api: ApiProcess, worker: WorkerProcess, repo: Path, redis_url: str) -> None:
        self.api = api
        self.worker = worker
        self.repo = repo
        self.http = httpx.Client(base_url=api.url, timeout=30)
        self.redis = redis.Redis.from_url(redis_url)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_repo: Path, redis_server: Any
) -> Iterator[Stack]:
    redis_server.start()
    root = tmp_path_factory.mktemp("api")
    repo = root / "repo"
    shutil.copytree(example_repo, repo)
    write_slow_recorder(repo, root / "slow.log", delay_s=3.0)
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    env = {"MODEL_REPOSITORY": str(repo)}
    worker = WorkerProcess(
        "api-w1",
        queues=[keys.queue_name("example", "v1"), keys.queue_name("linear", "v1"),
                keys.queue_name("slow", "v1")],
        env={**env, "WORKER_MODELS": "example:v1,linear:v1,slow:v1"},
        log_dir=root,
    )  # fmt: skip
    worker.wait_ready(r)
    wait_for(
        lambda: len((worker.report(r) or {}).get("models", [])) == 3,
        timeout_s=60,
        what="three models loaded",
    )
    api = ApiProcess(
        "api",
        env={**env, "API_TOKEN": TOKEN, "API_COLD_START_TIMEOUT_S": "2"},
        log_dir=root,
    )
    api.wait_ready()
    yield Stack(api, worker, repo, redis_server.url)
    api.stop()
    worker.stop(timeout_s=15)


def expected(repo: Path, name: str, version: str, rows: np.ndarray) -> np.ndarray:
    repository = ModelRepository(repo)
    spec = repository.spec(name, version)
    module = load_module(spec, repository.model_file(name, version, spec), torch.device("cpu"))
    with torch.inference_mode():
        return module(torch.from_numpy(rows)).numpy()


def test_predict_single_and_batch(stack: Stack) -> None:
    rows = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    want = expected(stack.repo, "example", "v1", rows)
    # SEED.md's body verbatim: no model named, the API's default model answers.
    one = stack.http.post("/predict", json={"inputs": [1, 2, 3], "priority": 5, "timeout": 30.0})
    assert one.status_code == 200, one.text
    body = one.json()
    assert (body["model"], body["version"]) == ("example", "v1")
    np.testing.assert_allclose(body["outputs"], want[0], rtol=1e-5)
    batch = stack.http.post(
        "/predict/batch", json={"inputs": rows.tolist(), "priority": 1, "timeout": 60.0}
    )
    assert batch.status_code == 200, batch.text
    np.testing.assert_allclose(batch.json()["outputs"], want, rtol=1e-5)
    named = stack.http.post(
        "/predict", json={"model": "linear", "version": "v1", "inputs": list(range(8))}
    )
    assert named.status_code == 200, named.text
    assert len(named.json()["outputs"]) == 4


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"model": "nope", "inputs": [1, 2, 3]}, 404, "unknown model 'nope'"),
        ({"model": "linear", "version": "v9", "inputs": [1] * 8}, 404, "has no version 'v9'"),
        ({"inputs": [1, 2]}, 422, "shape [2] does not match the model's input float32[3]"),
        ({"inputs": ["a", "b", "c"]}, 422, "not a numeric array of float32[3]"),
        ({"inputs": [1, float("nan"), 3]}, 422, "inputs must be finite numbers"),
        ({"inputs": [1, float("inf"), 3]}, 422, "inputs must be finite numbers"),
        ({"inputs": [1, 2, 3], "priority": 12}, 422, "priority"),
        ({"inputs": [1, 2, 3], "colour": "red"}, 422, "colour"),
        ({"inputs": [1, 2, 3], "timeout": -1}, 422, "timeout"),
        ({"model": "../etc", "inputs": [1, 2, 3]}, 422, "model"),
    ],
)
def test_bad_requests_are_answered_at_once(
    stack: Stack, body: dict[str, Any], status: int, text: str
) -> None:
    import json

    started = time.monotonic()
    response = stack.http.post(  # NaN and Infinity written as Python's json writes them
        "/predict", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert text in response.text
    assert time.monotonic() - started < 10  # never the request's timeout


def test_bad_batch_and_malformed_json(stack: Stack) -> None:
    response = stack.http.post("/predict/batch", json={"inputs": [[1, 2, 3], [1, 2]]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "inputs"]
    response = stack.http.post("/predict/batch", json={"inputs": []})
    assert response.status_code == 422
    response = stack.http.post(
        "/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_oversized_body_is_413(stack: Stack) -> None:
    big = b'{"inputs": [' + b"1," * (9 * 1024 * 1024) + b"1]}"
    response = stack.http.post(
        "/predict", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "MAX_PAYLOAD_BYTES" in response.text

    def chunks() -> Iterator[bytes]:  # no content-length: a chunked body
        yield b'{"inputs": ['
        for _ in range(9 * 1024):
            yield b"1," * 1024
        yield b"1]}"

    chunked = stack.http.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413, chunked.text
    assert "MAX_PAYLOAD_BYTES" in chunked.text

    def small() -> Iterator[bytes]:  # a chunked body under the limit is served
        yield b'{"model": "linear", '
        yield b'"inputs": [1, 2, 3, 4, 5, 6, 7, 8]}'

    served = stack.http.post(
        "/predict", content=small(), headers={"content-type": "application/json"}
    )
    assert served.status_code == 200, served.text


def test_timeout_is_504_and_no_instance_is_503(stack: Stack) -> None:
    # slow/v1 is loaded and consumed but takes 3 s: a 1 s timeout answers 504.
    started = time.monotonic()
    response = stack.http.post(
        "/predict", json={"model": "slow", "inputs": [1.0] * 4, "timeout": 1.0}
    )
    assert response.status_code == 504, response.text
    assert "within the timeout of 1 s" in response.text
    assert time.monotonic() - started < 5
    # A timeout shorter than the trip: the worker finds the request expired; 504 too.
    response = stack.http.post(
        "/predict", json={"model": "linear", "inputs": [1.0] * 8, "timeout": 0.001}
    )
    assert response.status_code == 504, response.text
    assert "within the timeout of 0.001 s" in response.text
    # linear/v2: nobody serves it and no scaler runs: 503 after API_COLD_START_TIMEOUT_S.
    started = time.monotonic()
    response = stack.http.post(
        "/predict", json={"model": "linear", "version": "v2", "inputs": [1] * 8, "timeout": 20}
    )
    assert response.status_code == 503, response.text
    assert "no instance of linear/v2 became ready within 2 s" in response.text
    assert time.monotonic() - started < 10


def test_a_load_longer_than_the_cold_start_timeout_is_waited_for(
    stack: Stack, tmp_path: Path
) -> None:
    from tests.helpers import write_state_dict_model

    # The API gives up on a cold start after 2 s; this version's load takes 5 s. A worker
    # loading it means it is coming: the request waits, as predict.delay().get() would.
    write_state_dict_model(stack.repo, "slowload", "v1", factory="slow_loading")
    worker = WorkerProcess(
        "api-slowload",
        queues=[keys.queue_name("slowload", "v1")],
        env={"MODEL_REPOSITORY": str(stack.repo), "SLOW_LOAD_S": "5"},
        log_dir=tmp_path,
    )
    try:
        worker.wait_ready(stack.redis)
        started = time.monotonic()
        response = stack.http.post(
            "/predict", json={"model": "slowload", "inputs": [1.0] * 4, "timeout": 60}
        )
        assert response.status_code == 200, response.text
        assert response.json()["outputs"] == [2.0] * 4
        assert time.monotonic() - started > 4  # it did wait past the cold-start timeout
    finally:
        worker.stop(timeout_s=15)


def test_management_needs_the_token(stack: Stack) -> None:
    url = "/autoscaler/scale?model_name=linear&target_instances=2"
    assert stack.http.post(url).status_code == 401
    wrong = stack.http.post(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = stack.http.post(url + "&version=v2", headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {
        "model": "linear", "version": "v2", "target_instances": 2, "replaced": None,
    }  # fmt: skip
    import json

    override = json.loads(stack.redis.hget(keys.OVERRIDES, "linear/v2"))
    assert override == {"instances": 2}
    assert stack.http.post("/autoscaler/load?model_name=tiny_mlp", headers=AUTH).json() == {
        "model": "tiny_mlp",
        "version": "v1",
        "state": "loading",
        "replaced": None,
    }
    assert json.loads(stack.redis.hget(keys.OVERRIDES, "tiny_mlp/v1")) == {"load": True}
    unload = stack.http.delete("/autoscaler/unload?model_name=tiny_mlp&version=v1", headers=AUTH)
    assert unload.status_code == 200
    assert unload.json()["replaced"] == {"load": True}  # the latest command wins, and says so
    assert "unload_at" in json.loads(stack.redis.hget(keys.OVERRIDES, "tiny_mlp/v1"))
    # A pin (or a load, an unload) is released over HTTP: back to the automatic policy.
    release = "/autoscaler/scale?model_name=linear&version=v2"
    assert stack.http.delete(release).status_code == 401
    released = stack.http.delete(release, headers=AUTH)
    assert released.status_code == 200, released.text
    assert released.json()["replaced"] == {"instances": 2}
    assert stack.redis.hget(keys.OVERRIDES, "linear/v2") is None
    assert stack.http.delete(release, headers=AUTH).json()["replaced"] is None
    assert stack.http.post("/autoscaler/load?model_name=nope", headers=AUTH).status_code == 404
    negative = stack.http.post(
        "/autoscaler/scale?model_name=linear&target_instances=-1", headers=AUTH
    )
    assert negative.status_code == 422
    stack.redis.hdel(keys.OVERRIDES, "linear/v2", "tiny_mlp/v1")


def test_metrics_of_a_scripted_workload(stack: Stack) -> None:
    def requests_so_far() -> int:
        window = stack.http.get("/autoscaler/metrics?window_seconds=3600&model=linear/v1")
        return int(window.json()["requests"])

    before = requests_so_far()
    for i in range(30):
        response = stack.http.post("/predict", json={"model": "linear", "inputs": [i] * 8})
        assert response.status_code == 200
    for _ in range(3):  # refused by the API: never queued, never counted
        assert (
            stack.http.post("/predict", json={"model": "linear", "inputs": [1]}).status_code == 422
        )
    wait_for(lambda: requests_so_far() - before >= 30, timeout_s=20, what="30 requests recorded")
    window = stack.http.get("/autoscaler/metrics?window_seconds=3600&model=linear/v1").json()
    assert window["requests"] - before == 30
    assert window["errors"] == 0 and window["error_rate_percent"] == 0.0
    m = window["models"]["linear/v1"]
    assert 0 < m["p50_response_time_ms"] <= m["p95_response_time_ms"] <= m["p99_response_time_ms"]
    assert m["cache_hit_rate"] == 1.0  # preloaded
    assert window["cpu_usage_percent"] is not None and window["memory_rss_bytes"] > 0
    assert window["gpu"] == "no GPU reported by any worker"
    # the key metrics SEED.md's dashboard prints
    for key in ("active_instances", "requests_per_second", "average_response_time_ms",
                "error_rate_percent", "scale_up_events", "cold_starts", "popularity"):  # fmt: skip
        assert key in window
    assert window["queue_depths"]["small_cnn/v1"] == 0  # every model queue, those at zero too
    bad = stack.http.get("/autoscaler/metrics?window_seconds=0")
    assert bad.status_code == 422
    too_long = stack.http.get("/autoscaler/metrics?window_seconds=99999999")
    assert too_long.status_code == 422

    text = stack.http.get("/metrics")
    assert text.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    requests = {
        (s.labels["model"], s.labels["version"]): s.value
        for s in families["inference_requests"].samples
        if s.name == "inference_requests_total"
    }
    assert requests[("linear", "v1")] >= 30
    histogram = families["inference_request_duration_seconds"]
    count = next(
        s.value
        for s in histogram.samples
        if s.name.endswith("_count") and s.labels["model"] == "linear"
    )
    assert count == requests[("linear", "v1")]
    buckets = [
        s.value
        for s in histogram.samples
        if s.name.endswith("_bucket") and s.labels["model"] == "linear"
    ]
    assert buckets == sorted(buckets) and buckets[-1] == count
    assert "inference_queue_depth" in families
    workers = {s.labels["worker"] for s in families["inference_worker_rss_bytes"].samples}
    assert stack.worker.hostname in workers

    # The same requests as a series: per-step points that add up to the window.
    url = "/autoscaler/metrics/series?window_seconds=600&step_seconds=10&model=linear&version=v1"
    series = stack.http.get(url).json()
    assert series["step_seconds"] == 10 and len(series["t"]) == 60
    points = series["models"]["linear/v1"]
    assert sum(points["requests"]) >= 30 and len(points["p95_response_time_ms"]) == 60
    one = stack.http.get(url + "&metric=requests").json()["models"]["linear/v1"]
    assert list(one) == ["requests"]
    for query, field in (("metric=nope", "metric"), ("step_seconds=0", "step_seconds"),
                         ("version=v1", "version"), ("model=../x", "model")):  # fmt: skip
        bad = stack.http.get(f"/autoscaler/metrics/series?window_seconds=60&{query}")
        assert bad.status_code == 422 and field in bad.text, (query, bad.text)


def test_made_up_model_names_never_become_metrics(stack: Stack) -> None:
    for i in range(50):
        response = stack.http.post("/predict", json={"model": f"made-up-{i}", "inputs": [1]})
        assert response.status_code == 404
    fields = [keys.text(f) for f in stack.redis.hkeys(keys.METRICS_TOTAL)]
    assert fields and not [f for f in fields if "made-up" in f]
    text = stack.http.get("/metrics").text
    assert "made-up" not in text


def test_read_endpoints_and_schema(stack: Stack) -> None:
    models = stack.http.get("/models").json()["models"]
    assert set(models) >= {"example", "linear", "tiny_mlp", "small_cnn", "slow"}
    assert models["linear"]["versions"]["v2"]["input"] == {"dtype": "float32", "shape": [8]}
    stats = stack.http.get("/autoscaler/stats").json()
    assert set(stats["queues"]) >= {"linear/v2", "small_cnn/v1", "tiny_mlp/v1"}
    health = stack.http.get("/autoscaler/health").json()
    assert health["redis"] == "ok"
    workers = stack.http.get("/autoscaler/workers").json()["workers"]
    mine = workers[stack.worker.hostname]
    assert mine["device"] == "cpu" and mine["gpu"]["gpu"] is None and mine["rss_bytes"] > 0
    assert {f"{m['name']}/{m['version']}" for m in mine["models"]} == {
        "example/v1", "linear/v1", "slow/v1"
    }  # fmt: skip
    assert all(m["bytes"] > 0 for m in mine["models"] if m["name"] != "slow")
    alerts = stack.http.get("/autoscaler/alerts").json()
    assert set(alerts) == {"active", "history"}
    schema = stack.http.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/autoscaler/stats", "/autoscaler/health", "/autoscaler/scale", "/autoscaler/load",
        "/autoscaler/unload", "/autoscaler/metrics", "/predict", "/predict/batch", "/models",
        "/metrics", "/autoscaler/metrics/series", "/autoscaler/alerts", "/autoscaler/workers",
    }  # fmt: skip
    assert "/dashboard" not in schema["paths"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_traffic_split_and_balancing_through_the_api(stack: Stack) -> None:
    import json

    url = "/autoscaler/traffic?model_name=linear"
    assert stack.http.post(url, json={"weights": {"v1": 90, "v2": 10}}).status_code == 401
    ok = stack.http.post(url, json={"weights": {"v1": 90, "v2": 10}}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    assert json.loads(stack.redis.hget(keys.TRAFFIC, "linear"))["weights"] == {"v1": 90, "v2": 10}
    unknown = stack.http.post(url, json={"weights": {"v7": 1}}, headers=AUTH)
    assert unknown.status_code == 404 and "has no version 'v7'" in unknown.text
    empty = stack.http.post(url, json={"weights": {"v1": 0}}, headers=AUTH)
    assert empty.status_code == 422
    reset = stack.http.delete(url, headers=AUTH)
    assert reset.status_code == 200 and stack.redis.hget(keys.TRAFFIC, "linear") is None

    balancing = "/autoscaler/balancing?model_name=linear&strategy=weighted_round_robin"
    ok = stack.http.post(balancing, json={"weights": {stack.worker.hostname: 2}}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    record = json.loads(stack.redis.hget(keys.BALANCING, "linear"))
    assert record == {"strategy": "weighted_round_robin", "weights": {stack.worker.hostname: 2}}
    bad = stack.http.post("/autoscaler/balancing?model_name=linear&strategy=fastest", headers=AUTH)
    assert bad.status_code == 422
    cleared = stack.http.post("/autoscaler/balancing?model_name=linear", headers=AUTH)
    assert cleared.status_code == 200 and stack.redis.hget(keys.BALANCING, "linear") is None
    health = stack.http.get("/autoscaler/health").json()
    instance = health["instances"]["linear/v1"][stack.worker.hostname]
    assert instance["state"] == "healthy" and instance["routable"]


def test_a_restarted_redis_costs_a_retry_not_a_timeout(stack: Stack, redis_server: Any) -> None:
    """Last in this module: it restarts the server under the running stack."""
    redis_server.stop()
    try:
        started = time.monotonic()
        down = stack.http.post("/predict", json={"inputs": [1, 2, 3], "timeout": 30})
        assert down.status_code == 503, down.text
        assert "Redis is unreachable" in down.text
        assert time.monotonic() - started < 20
    finally:
        redis_server.start()

    def answered() -> bool:
        response = stack.http.post("/predict", json={"inputs": [1, 2, 3], "timeout": 10})
        return response.status_code == 200

    # The worker republishes the registry and reconnects; the API's subscription too.
    wait_for(answered, timeout_s=60, what="answers after the restart")


def test_priority_is_served_as_documented_over_both_paths(stack: Stack) -> None:
    """0 (the default) is served first and 9 last, whether the request came through
    ``predict.delay`` or ``POST /predict``, queued or already held by the worker."""
    import threading

    from tasks import predict

    log = stack.repo.parent / "slow.log"
    start = len(log.read_text().splitlines()) if log.exists() else 0
    busy = [predict.delay("slow", [100.0] * 4) for _ in range(4)]  # one batch: 3 s
    wait_for(
        lambda: (
            (log.exists() and len(log.read_text().splitlines()) > start)
            or (stack.worker.report(stack.redis) or {}).get("busy", {}).get("slow/v1")
        ),
        what="the worker busy with the first batch",
    )
    low = [predict.apply_async(("slow", [9.0] * 4), priority=9) for _ in range(4)]
    answers: list[httpx.Response] = []

    def over_http() -> None:
        body = {"model": "slow", "inputs": [1.0] * 4, "priority": 0, "timeout": 60.0}
        answers.append(stack.http.post("/predict", json=body, timeout=90))

    thread = threading.Thread(target=over_http)
    thread.start()
    urgent = [predict.delay("slow", [float(v)] * 4) for v in (2, 3, 4)]
    for result in busy + urgent + low:
        result.get(timeout=60)
    thread.join(90)
    assert answers and answers[0].status_code == 200, answers
    values = [int(line.split()[0]) for line in log.read_text().splitlines()[start:]]
    ours = [v for v in values if v in (1, 2, 3, 4, 9)]
    assert sorted(ours[:4]) == [1, 2, 3, 4] and ours[4:] == [9] * 4, values

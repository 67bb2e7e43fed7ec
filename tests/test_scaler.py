"""The scaler with real beat and worker processes: from zero, bursts, back to zero, one
leader, restarts that adopt the fleet, and scale-down that loses nothing."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from api.prometheus import render_metrics
from common import keys
from common.settings import MetricsSettings
from monitoring.metrics import MetricsHistory
from tests.helpers import BeatProcess, stop_fleet, wait_for, write_slow_recorder

pytestmark = pytest.mark.timeout(240)

FAST = {
    "tick_interval_s": 0.25,
    "scale_down_stabilization_s": 1.0,
    "target_load_per_instance": 8,
    "max_workers": 3,
    "worker_start_timeout_s": 60,
    "leader_ttl_s": 1.5,
    "zero_scaling": {"scale_to_zero_delay": 3.0, "cold_start_strategy": "lazy",
                     "preload_popular_models": False},
    "model_loading": {"failure_cooldown_seconds": 30},
}  # fmt: skip


@pytest.fixture
def scaler(tmp_path: Path, test_repo: Path, client: redis.Redis) -> Iterator[Any]:
    """Start beat scalers with a config; the fleet they start is stopped afterwards."""
    beats: list[BeatProcess] = []

    def start(name: str = "beat", overrides: dict[str, Any] | None = None) -> BeatProcess:
        config = json.loads(json.dumps(FAST))
        for section, value in (overrides or {}).items():
            if isinstance(value, dict):
                config.setdefault(section, {}).update(value)
            else:
                config[section] = value
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        beat = BeatProcess(name, log_dir=tmp_path, env={
            "SCALER_CONFIG_FILE": str(path),
            "SCALER_LOG_DIR": str(tmp_path),
            "MODEL_REPOSITORY": str(test_repo),
        })  # fmt: skip
        beats.append(beat)
        wait_for(
            lambda: client.exists(keys.REGISTRY) or beat.proc.poll() is not None,
            what=f"{name} to publish the registry",
        )
        assert beat.proc.poll() is None, beat.log()
        return beat

    yield start
    for beat in beats:
        beat.stop()
    stop_fleet(client)


def status(client: redis.Redis) -> dict[str, Any]:
    raw = client.get(keys.SCALER_STATUS)
    return json.loads(raw) if raw else {}


def instances(client: redis.Redis, text: str) -> int:
    return int(status(client).get("instances", {}).get(text, 0))


def fleet_pids(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): json.loads(v)["pid"] for k, v in client.hgetall(keys.FLEET).items()}


def decisions(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(d) for d in client.lrange(keys.SCALER_DECISIONS, 0, -1)]


def test_from_zero_burst_and_back_to_zero(
    scaler: Any, client: redis.Redis, test_repo: Path, tmp_path: Path
) -> None:
    from tasks import predict

    # 20 ms per batch of 4: one instance needs about 15 s for the burst, longer than a
    # second worker takes to start, however fast the broker path is.
    write_slow_recorder(test_repo, tmp_path / "slow.log", delay_s=0.02)
    scaler()
    assert fleet_pids(client) == {}  # nothing to serve: no worker process at all
    started = time.monotonic()
    first = predict.delay("slow", np.ones(4, np.float32)).get(timeout=60)
    cold_s = time.monotonic() - started
    assert first.tolist() == [2.0] * 4
    assert any(d["to"] == 1 and "cold start" in d["reason"] for d in decisions(client))
    # The request that found no instance is the version's cold start, as its caller saw it.
    history = MetricsHistory(client, MetricsSettings())

    def cold_stats() -> dict[str, Any] | None:
        stats = history.window(300)["models"].get("slow/v1", {})
        return stats if stats.get("cold_start_requests") == 1 else None

    cold = wait_for(cold_stats, what="the cold-start request in the history")
    assert 0 < cold["average_cold_start_ms"] <= cold_s * 1000 * 1.25 + 50, (cold, cold_s)
    families = {
        f.name: f for f in text_string_to_metric_families(render_metrics(client)[0].decode())
    }
    exported = {s.name: s.value for s in families["inference_cold_start_seconds"].samples}
    assert exported["inference_cold_start_seconds_count"] == 1
    assert exported["inference_cold_start_seconds_sum"] == pytest.approx(
        cold["average_cold_start_ms"] / 1000, rel=0.01
    )

    results = [predict.delay("slow", np.full(4, i, np.float32)) for i in range(3000)]
    wait_for(lambda: instances(client, "slow/v1") >= 2, timeout_s=60, what="a second instance")
    assert [float(r.get(timeout=120)[0]) for r in results] == [2.0 * i for i in range(3000)]

    wait_for(lambda: not fleet_pids(client), timeout_s=60, what="the fleet back at zero processes")
    assert instances(client, "slow/v1") == 0
    reasons = [d["reason"] for d in decisions(client)]
    assert any("scale_to_zero_delay" in r for r in reasons)
    print(f"\ncold start from zero (process start + load): {cold_s:.2f} s")


def test_a_forecast_loads_a_version_before_its_traffic_and_names_it(
    scaler: Any, client: redis.Redis
) -> None:
    """Yesterday this version had traffic from five minutes after this time of day: with a
    day and an hour of minute history in Redis, beat loads it before any request."""
    now = int(time.time())
    pipe = client.pipeline(transaction=False)
    for minute in range(now // 60 - 25 * 60, now // 60):
        since_yesterday = minute - (now // 60 - 24 * 60)
        if 5 <= since_yesterday < 35:  # 30 requests a minute, then, yesterday
            bucket = keys.metrics_forecast_key(minute)
            pipe.hincrbyfloat(bucket, "linear/v1|req", 30)
            pipe.expire(bucket, 7200)
    pipe.execute()
    scaler()
    wait_for(lambda: instances(client, "linear/v1") == 1, timeout_s=60, what="linear/v1 loaded")
    reasons = [d["reason"] for d in decisions(client) if d["model"] == "linear"]
    assert any(r.startswith("forecast: ") and "within 30 min" in r for r in reasons), reasons
    assert client.llen(keys.queue_name("linear", "v1")) == 0  # no request asked for it


def test_two_beats_one_leader_and_failover(scaler: Any, client: redis.Redis) -> None:
    first = scaler("first")
    leader = wait_for(lambda: client.get(keys.SCALER_LEADER), what="a leader").decode()
    second = scaler("second")
    seen = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # several ticks of both: only the first acts
        seen.add(status(client).get("leader"))
        time.sleep(0.1)
    assert seen == {leader}
    first.kill()
    new_leader = wait_for(
        lambda: (v := client.get(keys.SCALER_LEADER)) and v.decode() != leader and v.decode(),
        timeout_s=15, what="the second beat to take over",
    )  # fmt: skip
    wait_for(
        lambda: status(client).get("leader") == new_leader,
        timeout_s=10,
        what="the second beat to tick as leader",
    )
    assert second.proc.poll() is None


def test_a_killed_scaler_is_restarted_and_adopts_its_workers(
    scaler: Any, client: redis.Redis
) -> None:
    from tasks import predict

    beat = scaler("original", {"zero_scaling": {"scale_to_zero_delay": 60.0}})
    assert len(predict.delay("linear", [1.0] * 8).get(timeout=60)) == 4
    before = fleet_pids(client)
    assert len(before) == 1
    beat.kill()  # mid-whatever: SIGKILL
    client.delete(keys.SCALER_LEADER)  # as its TTL would, only sooner
    scaler("restarted", {"zero_scaling": {"scale_to_zero_delay": 60.0}})
    wait_for(lambda: status(client).get("instances", {}).get("linear/v1") == 1, what="adoption")
    for _ in range(8):  # a few ticks: no duplicate worker appears
        time.sleep(0.25)
        assert fleet_pids(client) == before
    assert len(predict.delay("linear", [1.0] * 8).get(timeout=30)) == 4


def test_a_worker_whose_record_was_lost_is_adopted_and_still_scaled_to_zero(
    scaler: Any, client: redis.Redis
) -> None:
    """A Redis that restarted without persistence forgets the fleet: the workers this host's
    backend started are recognised by their reports and adopted, not left running."""
    from tasks import predict

    scaler()
    assert len(predict.delay("linear", [1.0] * 8).get(timeout=60)) == 4
    before = fleet_pids(client)
    assert len(before) == 1
    client.delete(keys.FLEET)
    wait_for(lambda: fleet_pids(client) == before, what="the worker adopted")
    wait_for(lambda: not fleet_pids(client), timeout_s=60, what="the fleet back at zero")
    (pid,) = before.values()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the adopted worker's exit")


def test_a_stopped_scaler_drains_the_workers_it_started(scaler: Any, client: redis.Redis) -> None:
    import os

    from tasks import predict

    beat = scaler("stopped", {"zero_scaling": {"scale_to_zero_delay": 60.0}})
    assert len(predict.delay("linear", [1.0] * 8).get(timeout=60)) == 4
    pids = fleet_pids(client)
    assert len(pids) == 1
    beat.stop()  # SIGTERM, as Ctrl-C or a supervisor's stop
    assert beat.proc.returncode == 0, beat.log()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(map(gone, pids.values())), timeout_s=30, what="its workers to exit")
    assert fleet_pids(client) == {}
    assert "draining the workers it started" in beat.log()


def test_manual_control_survives_a_scaler_restart(scaler: Any, client: redis.Redis) -> None:
    import asyncio

    from scaler import Autoscaler

    beat = scaler("pinning")
    api = Autoscaler(run_scaler=False)
    asyncio.run(api.scale_model("linear", 2, version="v2"))
    wait_for(lambda: instances(client, "linear/v2") == 2, timeout_s=60, what="two pinned instances")
    beat.kill()
    client.delete(keys.SCALER_LEADER)
    scaler("again")
    time.sleep(FAST["zero_scaling"]["scale_to_zero_delay"] + 1)  # past the idle delay on purpose
    assert instances(client, "linear/v2") == 2
    asyncio.run(api.scale_model("linear", None, version="v2"))
    wait_for(lambda: instances(client, "linear/v2") == 0, timeout_s=60, what="automatic again")


def test_scale_down_with_requests_in_flight_loses_none(
    scaler: Any, client: redis.Redis, test_repo: Path, tmp_path: Path
) -> None:
    import asyncio

    from scaler import Autoscaler
    from tasks import predict

    log = tmp_path / "slow.log"
    write_slow_recorder(test_repo, log, delay_s=0.05)
    scaler("downsizer")
    api = Autoscaler(run_scaler=False)
    wait_for(lambda: client.hexists(keys.REGISTRY, "slow"), what="slow in the registry")
    asyncio.run(api.scale_model("slow", 3))
    wait_for(lambda: instances(client, "slow/v1") == 3, timeout_s=90, what="three instances")
    results = [predict.delay("slow", np.full(4, i, np.float32)) for i in range(1, 201)]
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) > 20, what="work under way")
    asyncio.run(api.scale_model("slow", 1))
    answers = [float(r.get(timeout=120)[0]) for r in results]
    assert answers == [2.0 * i for i in range(1, 201)]
    assert instances(client, "slow/v1") == 1


def test_a_model_that_cannot_load_fails_fast_and_is_not_retried_in_a_loop(
    scaler: Any, client: redis.Redis, test_repo: Path
) -> None:
    from common.errors import ModelLoadError
    from tasks import predict

    (test_repo / "linear" / "v2" / "model.pt").write_bytes(b"broken")
    scaler("failing")
    for _ in range(3):
        with pytest.raises(ModelLoadError):
            predict.apply_async(("linear", [1.0] * 8), {"version": "v2"}).get(timeout=60)
    wait_for(lambda: client.hexists(keys.LOAD_FAILURES, "linear/v2"), what="the failure recorded")
    time.sleep(2)
    reports = [
        json.loads(client.get(keys.worker_report_key(h)) or "{}") for h in fleet_pids(client)
    ]
    assert sum(r.get("load_failures", 0) for r in reports) == 1  # one load, not one per request
    assert instances(client, "linear/v2") <= 1


def test_the_python_api_in_process(client: redis.Redis, example_repo: Path) -> None:
    import asyncio

    from scaler import (
        AutoscalerConfig,
        DynamicModelLoader,
        ModelLoaderConfig,
        ZeroScaler,
        ZeroScalingConfig,
    )

    async def scenario() -> None:
        loader = DynamicModelLoader(ModelLoaderConfig(max_instances_per_model=2))
        loader.autoscaler.config = AutoscalerConfig(
            **{**FAST, "model_loading": {"max_instances_per_model": 2}}
        )
        await loader.start()
        try:
            await loader.load_model("linear", "v2")

            def loaded() -> bool:
                return any(m["version"] == "v2" for m in loader.list_loaded_models())

            await asyncio.to_thread(wait_for, loaded, timeout_s=60, what="linear/v2 loaded by hand")
            out = await loader.predict("linear", [1.0] * 8, version="v2")
            assert len(out) == 4
            stats = loader.get_stats()
            assert stats["active_instances"]["linear/v2"] == 1
            assert any(d["reason"] == "loaded by hand" for d in stats["decisions"])
            health = loader.autoscaler.get_health_status()
            assert health["healthy"] and health["redis"] == "ok"
        finally:
            await loader.autoscaler.stop(stop_workers=True)
        assert not client.hgetall(keys.FLEET)

        zero = ZeroScaler(ZeroScalingConfig(scale_to_zero_delay=1.0))
        zero.autoscaler.config = AutoscalerConfig(**FAST)
        async with zero.scaler_context():
            assert (await zero.predict("tiny_mlp", [0.0] * 64))[0] != 0
            assert client.hgetall(keys.FLEET)

            def cold_start() -> dict[str, Any] | None:
                # The worker records it within its metrics flush (a second).
                return zero.autoscaler.get_stats()["cold_starts"].get("tiny_mlp/v1")

            tiny = await asyncio.to_thread(wait_for, cold_start, what="tiny_mlp's cold start")
            assert tiny["requests"] == 1 and tiny["average_ms"] > 0
        assert not client.hgetall(keys.FLEET)  # leaving the context stopped its workers

    asyncio.run(scenario())

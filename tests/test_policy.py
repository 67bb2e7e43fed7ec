"""The scaling policy, tick by tick on a fake clock, and its invariants under random load."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.contracts import ModelKey
from common.errors import ConfigError
from scaler.config import AutoscalerConfig, ColdStartStrategy, ModelLoaderConfig, ZeroScalingConfig
from scaler.policy import NEW_WORKER_PREFIX, Plan, PolicyState, Snapshot, WorkerInfo, decide

pytestmark = pytest.mark.timeout(120)

A, B, C = ModelKey("a", "v1"), ModelKey("b", "v1"), ModelKey("c", "v2")
MODELS = {A: 100, B: 200, C: 300}
GB = 1024**3


def config(**overrides: Any) -> AutoscalerConfig:
    zero = overrides.pop("zero", {})
    loading = overrides.pop("loading", {})
    return AutoscalerConfig(
        zero_scaling=ZeroScalingConfig(
            **{"scale_to_zero_delay": 60, "cold_start_strategy": ColdStartStrategy.LAZY, **zero}
        ),
        model_loading=ModelLoaderConfig(**loading),
        scale_down_stabilization_s=10,
        target_load_per_instance=10,
        **overrides,
    )


class Fleet:
    """Applies plans perfectly: new workers appear serving what they were given."""

    def __init__(self, cfg: AutoscalerConfig) -> None:
        self.cfg = cfg
        self.state = PolicyState()
        self.workers: dict[str, WorkerInfo] = {}
        self.started = 0

    def tick(self, now: float, queued: dict[ModelKey, int] | None = None, **extra: Any) -> Plan:
        snapshot = Snapshot(
            now=now, models=MODELS, queued=queued or {}, workers=self.workers, **extra
        )
        plan, self.state = decide(snapshot, self.cfg, self.state)
        workers = {}
        for name, keys in plan.assignments.items():
            if name in plan.stop_workers:
                continue
            if name.startswith(NEW_WORKER_PREFIX):
                name = f"w{self.started}"
                self.started += 1
                base = WorkerInfo(name, managed=True)
            else:
                base = self.workers[name]
            loaded = base.loaded | keys | plan.preload.get(name, frozenset())
            workers[name] = replace(base, serving=keys, loaded=loaded, busy=())
        self.workers = workers
        return plan

    def instances(self, key: ModelKey) -> int:
        return sum(1 for w in self.workers.values() if key in w.serving)


def test_a_first_request_starts_a_worker_with_its_model() -> None:
    fleet = Fleet(config())
    plan = fleet.tick(0.0, {A: 1})
    assert plan.start_workers == 1
    assert plan.decisions[0].model == A and "cold start" in plan.decisions[0].reason
    assert fleet.instances(A) == 1


def test_a_burst_adds_instances_at_once_up_to_max() -> None:
    fleet = Fleet(config(loading={"max_instances_per_model": 3}))
    fleet.tick(0.0, {A: 1})
    assert fleet.tick(1.0, {A: 25}).desired[A] == 3
    assert fleet.tick(2.0, {A: 500}).desired[A] == 3  # never above max
    assert fleet.instances(A) == 3


def test_scale_down_waits_for_the_stabilization_window() -> None:
    fleet = Fleet(config())
    fleet.tick(0.0, {A: 30})
    assert fleet.instances(A) == 3
    for t in range(1, 10):
        fleet.tick(float(t), {A: 5})
        assert fleet.instances(A) == 3, t
    fleet.tick(11.0, {A: 5})
    assert fleet.instances(A) == 1


def test_idle_versions_go_to_zero_after_the_delay_and_the_fleet_stops() -> None:
    fleet = Fleet(config())
    fleet.tick(0.0, {A: 3})
    for t in range(1, 60):
        fleet.tick(float(t))
        assert fleet.instances(A) == 1, t  # min_instances_per_model=1 until the delay
    plan = fleet.tick(60.0)
    assert plan.desired.get(A, 0) == 0 and "scale_to_zero_delay" in plan.decisions[0].reason
    assert plan.stop_workers == ["w0"]
    assert fleet.workers == {}


def test_manual_pins_loads_and_unloads() -> None:
    fleet = Fleet(config())
    assert fleet.tick(0.0, pins={A: 2}).desired[A] == 2
    fleet.tick(1000.0, pins={A: 2})
    assert fleet.instances(A) == 2  # pinned: idle time does not matter
    fleet.tick(1001.0, loads=frozenset({B}))
    assert fleet.instances(B) == 1
    fleet.tick(5000.0, loads=frozenset({B}))
    assert fleet.instances(B) == 1  # loaded by hand: kept past the delay
    plan = fleet.tick(5001.0, unloads={B: 5001.0})
    assert plan.desired[B] == 0 and fleet.instances(B) == 0
    # A request after the unload brings it back.
    assert fleet.tick(5002.0, {B: 1}, unloads={B: 5001.0}).desired[B] == 1


def test_scale_model_to_zero_takes_effect_in_the_same_tick() -> None:
    fleet = Fleet(config())  # scale_to_zero_delay 60 s, stabilization 10 s
    fleet.tick(0.0, {A: 5})
    fleet.tick(1.0)
    assert fleet.instances(A) == 1
    plan = fleet.tick(2.0, pins={A: 0})  # idle for 1 s only: the pin does not wait
    assert plan.desired[A] == 0 and fleet.instances(A) == 0
    assert [(d.from_instances, d.to_instances, d.reason) for d in plan.decisions] == [
        (1, 0, "pinned by hand")
    ]


def test_a_restarted_scaler_waits_the_stabilization_window_before_scaling_down() -> None:
    fleet = Fleet(config())  # stabilization 10 s
    fleet.tick(0.0, {A: 25})
    assert fleet.instances(A) == 3
    fleet.state = PolicyState()  # the scaler restarts: no memory of its recommendations
    plan = fleet.tick(100.0)
    assert plan.desired[A] == 3 and not plan.decisions  # not lowered on its first tick
    assert fleet.tick(105.0).desired[A] == 3
    plan = fleet.tick(111.0)
    assert plan.desired[A] == 1  # the window has passed


def test_a_failed_model_keeps_one_instance_during_its_cooldown() -> None:
    fleet = Fleet(config(loading={"failure_cooldown_seconds": 30}))
    plan = fleet.tick(0.0, {A: 100}, failures={A: 0.0})
    assert plan.desired[A] == 1 and "load failed" in plan.decisions[0].reason
    assert fleet.tick(31.0, {A: 100}, failures={A: 0.0}).desired[A] == 3


def test_popular_models_stay_loaded_with_eager_preloading() -> None:
    cfg = config(zero={"cold_start_strategy": ColdStartStrategy.EAGER, "popularity_threshold": 5})
    fleet = Fleet(cfg)
    plan = fleet.tick(0.0, popularity={C: 9.0, B: 1.0})
    assert plan.desired == {C: 1}
    fleet.tick(500.0, popularity={C: 9.0})
    assert fleet.instances(C) == 1
    fleet.tick(501.0, popularity={C: 1.0})
    assert fleet.instances(C) == 0  # no longer popular and long idle


def test_hybrid_keeps_one_warm_standby_while_serving() -> None:
    fleet = Fleet(config(zero={"cold_start_strategy": ColdStartStrategy.HYBRID}))
    fleet.tick(0.0, {A: 1})
    assert len(fleet.workers) == 1  # the cold start first: no standby competing with it
    fleet.tick(0.5)  # A's instance carries its load: the standby starts
    assert sorted(len(w.serving) for w in fleet.workers.values()) == [0, 1]
    plan = fleet.tick(1.0)
    (standby,) = [n for n, w in fleet.workers.items() if not w.serving]
    assert plan.preload == {standby: {A}}  # it holds A without consuming A's queue
    fleet.tick(1.5, {A: 1, B: 1})  # the standby takes B
    assert fleet.instances(B) == 1 and fleet.workers[standby].serving == {B}
    fleet.tick(2.0)  # absorbed: a new standby is started
    assert sorted(len(w.serving) for w in fleet.workers.values()) == [0, 1, 1]
    fleet.tick(200.0)
    assert fleet.workers == {}  # nothing to serve: no standby either


def test_a_burst_goes_to_the_standby_that_holds_the_model_and_no_standby_starts_in_it() -> None:
    fleet = Fleet(config(zero={"cold_start_strategy": ColdStartStrategy.HYBRID}, max_workers=4))
    fleet.tick(0.0, {A: 1})
    fleet.tick(0.5)
    fleet.tick(1.0)  # the standby preloads A
    (standby,) = [n for n, w in fleet.workers.items() if not w.serving]
    assert A in fleet.workers[standby].loaded
    plan = fleet.tick(2.0, {A: 35})  # the most instances, three, wanted (10 requests each)
    assert A in plan.assignments[standby]  # the holder of A first: no load on the way
    assert plan.start_workers == 1  # the third instance; no new standby during the burst
    fleet.tick(2.5, {A: 35})  # more than the three carry: still no standby
    assert all(w.serving for w in fleet.workers.values())
    fleet.tick(3.0, {A: 5})  # absorbed by the three: a standby again
    assert sum(1 for w in fleet.workers.values() if not w.serving) == 1


def test_instances_are_taken_from_idle_workers_first() -> None:
    cfg = config()
    busy = WorkerInfo("busy", serving=frozenset({A}), busy=((A, 4),), managed=True)
    idle = WorkerInfo("idle", serving=frozenset({A}), managed=True)
    state = PolicyState()
    snapshot = Snapshot(now=0.0, models=MODELS, workers={"busy": busy, "idle": idle}, pins={A: 1})
    plan, _ = decide(snapshot, cfg, state)
    assert plan.assignments["busy"] == {A} and plan.assignments["idle"] == frozenset()
    assert plan.stop_workers == ["idle"]


def test_a_tick_with_ten_thousand_versions_stays_pure_and_small() -> None:
    models = {ModelKey(f"m{i}", "v1"): 1000 for i in range(10_000)}
    queued = {k: 1 for k in list(models)[:200]}
    plan, state = decide(
        Snapshot(now=0.0, models=models, queued=queued), config(max_workers=64), PolicyState()
    )
    assert len(plan.desired) == 200 and len(state.versions) == 200


def test_invalid_configs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="min_instances_per_model=4 is above"):
        ModelLoaderConfig(min_instances_per_model=4, max_instances_per_model=3)
    with pytest.raises(ConfigError, match="scale_to_zero_delay=-1"):
        ZeroScalingConfig(scale_to_zero_delay=-1)
    with pytest.raises(ConfigError, match="cold_start_strategy='fast'"):
        ZeroScalingConfig(cold_start_strategy="fast")


loads = st.lists(
    st.dictionaries(st.sampled_from([A, B, C]), st.integers(0, 80), max_size=3),
    min_size=1,
    max_size=40,
)
gaps = st.lists(st.floats(0.5, 40.0), min_size=40, max_size=40)


@settings(max_examples=150, deadline=None)
@given(loads=loads, gaps=gaps, low=st.integers(0, 2), high=st.integers(2, 4))
def test_bounds_hold_unless_idle_past_the_delay(
    loads: list[dict[ModelKey, int]], gaps: list[float], low: int, high: int
) -> None:
    cfg = config(
        loading={"min_instances_per_model": low, "max_instances_per_model": high}, max_workers=16
    )
    fleet = Fleet(cfg)
    now, last_busy = 0.0, dict.fromkeys(MODELS, -1e9)
    for queued, gap in zip(loads + [{}] * 10, gaps + [30.0] * 10, strict=False):
        now += gap
        plan = fleet.tick(now, queued)
        for key in MODELS:
            if queued.get(key):
                last_busy[key] = now
            n = plan.desired.get(key, 0)
            assert n <= high
            if n > 0:
                assert n >= low
            if n == 0 and queued.get(key):
                raise AssertionError(f"{key} has waiting requests and no instance")
            if n < low and now - last_busy[key] < cfg.zero_scaling.scale_to_zero_delay:
                assert last_busy[key] < 0 or n >= low, (key, n, now, last_busy[key])


@settings(max_examples=100, deadline=None)
@given(load=st.integers(1, 200), ticks=st.integers(5, 60))
def test_constant_load_never_oscillates(load: int, ticks: int) -> None:
    fleet = Fleet(config(max_workers=16))
    history = []
    for t in range(ticks):
        history.append(fleet.tick(float(t), {A: load}).desired[A])
    assert len(set(history)) == 1, history


@settings(max_examples=100, deadline=None)
@given(delay=st.floats(1.0, 100.0), busy_ticks=st.integers(1, 10))
def test_zero_exactly_after_the_delay(delay: float, busy_ticks: int) -> None:
    fleet = Fleet(config(zero={"scale_to_zero_delay": delay}))
    for t in range(busy_ticks):
        fleet.tick(float(t), {A: 3})
    last_busy = float(busy_ticks - 1)
    t = last_busy
    while t < last_busy + delay + 2:
        t += 0.5
        fleet.tick(t)
        expected = 0 if t - last_busy >= delay else 1
        assert fleet.instances(A) == expected, (t, last_busy, delay)


sizes = st.integers(1, 6 * GB)


@settings(max_examples=150, deadline=None)
@given(
    models=st.dictionaries(
        st.builds(ModelKey, st.sampled_from("pqrstu"), st.just("v1")), sizes, min_size=1
    ),
    workers=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 4)), min_size=0, max_size=5),
    queued=st.lists(st.integers(0, 60), min_size=6, max_size=6),
)
def test_placement_never_exceeds_a_workers_memory_or_slots(
    models: dict[ModelKey, int], workers: list[tuple[int, int]], queued: list[int]
) -> None:
    cfg = config(max_workers=8, loading={"cache_size_gb": 8.0}, zero={"max_loaded_models": 3})
    infos = {
        f"w{i}": WorkerInfo(f"w{i}", capacity_bytes=gb * GB, max_models=slots, managed=True)
        for i, (gb, slots) in enumerate(workers)
    }
    snapshot = Snapshot(
        now=0.0, models=models, workers=infos,
        queued={k: q for k, q in zip(sorted(models), queued, strict=False) if q},
    )  # fmt: skip
    plan, _ = decide(snapshot, cfg, PolicyState())
    for name, keys in plan.assignments.items():
        cap_bytes, cap_models = (
            (infos[name].capacity_bytes, infos[name].max_models) if name in infos else (8 * GB, 3)
        )
        assert len(keys) <= cap_models
        assert sum(models[k] for k in keys) <= cap_bytes
    assert len(infos) + plan.start_workers <= cfg.max_workers


def test_a_version_goes_only_where_its_measured_bytes_fit_the_free_memory() -> None:
    """Placement by measured memory: the version's bytes plus the margin must fit the
    device's free memory; what the worker holds and no longer serves counts as free."""
    cfg = config(max_workers=3, loading={"memory_margin_mb": 1.0})
    mb = 1024**2
    models = {A: 100 * mb, B: 300 * mb}
    full = WorkerInfo("w-full", free_bytes=200 * mb)  # B (300 MB) does not fit here
    roomy = WorkerInfo("w-roomy", free_bytes=400 * mb)
    snapshot = Snapshot(now=0.0, models=models, workers={"w-full": full, "w-roomy": roomy},
                        pins={B: 1})  # fmt: skip
    plan, _ = decide(snapshot, cfg, PolicyState())
    assert B in plan.assignments["w-roomy"] and B not in plan.assignments["w-full"]

    # Nowhere with room: a new worker (another device) rather than an overfull one.
    tight = replace(snapshot, workers={"w-full": full})
    plan, _ = decide(tight, cfg, PolicyState())
    assert B not in plan.assignments["w-full"] and plan.start_workers == 1

    # The margin counts: 300 MB free is not enough for 300 MB and a 1 MB margin.
    exact = replace(snapshot, workers={"w-full": replace(full, free_bytes=300 * mb)})
    plan, _ = decide(exact, cfg, PolicyState())
    assert B not in plan.assignments["w-full"]

    # A version it holds but no longer serves is unloaded: its memory makes the room.
    holding = replace(
        full, loaded=frozenset({A}), model_bytes=((A, 150 * mb),), free_bytes=200 * mb
    )
    evicting = replace(snapshot, workers={"w-full": holding})
    plan, _ = decide(evicting, cfg, PolicyState())
    assert plan.assignments["w-full"] == frozenset({B})

    # A version already loaded needs no more room.
    loaded = replace(full, loaded=frozenset({B}), model_bytes=((B, 300 * mb),), free_bytes=0)
    plan, _ = decide(replace(snapshot, workers={"w-full": loaded}), cfg, PolicyState())
    assert B in plan.assignments["w-full"]


def test_no_room_and_no_new_worker_the_least_recently_used_idle_version_makes_room() -> None:
    # One instance of every version kept while idle (min_instances_per_model).
    cfg = config(max_workers=1, loading={"memory_margin_mb": 0.0}, zero={"mode": "min"})
    mb = 1024**2
    models = {A: 100 * mb, B: 100 * mb, C: 100 * mb}
    worker = WorkerInfo(
        "w1",
        serving=frozenset({A, C}),
        loaded=frozenset({A, C}),
        model_bytes=((A, 100 * mb), (C, 100 * mb)),
        idle_s=((A, 50.0), (C, 5.0)),  # A ran longest ago
        free_bytes=50 * mb,  # room for neither B nor anything else
        managed=True,
    )
    snapshot = Snapshot(now=0.0, models=models, workers={"w1": worker}, queued={B: 5})
    plan, _ = decide(snapshot, cfg, PolicyState())
    assert plan.assignments["w1"] == frozenset({B, C})
    assert plan.start_workers == 0
    assert any(d.model == A and "least recently used" in d.reason for d in plan.decisions)

    # A version with requests of its own is not evicted: B waits for room instead.
    busy = replace(snapshot, queued={B: 5, A: 3, C: 2})
    plan, _ = decide(busy, cfg, PolicyState())
    assert B not in plan.assignments["w1"] and plan.unplaced.get(B)
    # Nor is a version pinned by hand.
    pinned = replace(snapshot, pins={A: 1, C: 1})
    plan, _ = decide(pinned, cfg, PolicyState())
    assert B not in plan.assignments["w1"]


def test_an_unhealthy_instance_is_replaced_elsewhere_and_not_placed_back() -> None:
    cfg = config(max_workers=3)
    sick = WorkerInfo("w-sick", serving=frozenset({A}), loaded=frozenset({A}),
                      unhealthy=frozenset({A}))  # fmt: skip
    idle = WorkerInfo("w-idle")
    snapshot = Snapshot(
        now=0.0, models=MODELS, workers={"w-sick": sick, "w-idle": idle}, pins={A: 1}
    )
    assert snapshot.current(A) == 0  # the sick instance does not count
    plan, _ = decide(snapshot, cfg, PolicyState())
    assert A not in plan.assignments["w-sick"]  # it stops consuming the version
    assert A in plan.assignments["w-idle"]  # another worker takes it
    # With no other worker, a new one is started rather than the sick one reused.
    alone = replace(snapshot, workers={"w-sick": sick})
    plan, _ = decide(alone, cfg, PolicyState())
    assert A not in plan.assignments["w-sick"]
    assert plan.start_workers == 1
    # Once the worker retries it (the cooldown is over), it may serve it again.
    retried = replace(alone, workers={"w-sick": replace(sick, unhealthy=frozenset())})
    plan, _ = decide(retried, cfg, PolicyState())
    assert A in plan.assignments["w-sick"]


# -- every SEED setting does what it says ----------------------------------------------------


def test_eager_loading_strategy_loads_every_version_at_start_then_idles_them_out() -> None:
    fleet = Fleet(config(loading={"loading_strategy": "eager"}))
    plan = fleet.tick(0.0)
    assert plan.desired == {A: 1, B: 1, C: 1}
    assert all("loading_strategy eager" in d.reason for d in plan.decisions)
    fleet.tick(30.0)
    assert fleet.instances(A) == 1  # within scale_to_zero_delay of the start
    fleet.tick(61.0)
    fleet.tick(75.0)
    assert fleet.workers == {}  # unused since the start: idle past the delay, then gone
    lazy = Fleet(config())
    assert lazy.tick(0.0).desired == {}


def test_without_dynamic_loading_every_version_stays_loaded() -> None:
    fleet = Fleet(config(enable_dynamic_loading=False, max_workers=3))
    fleet.tick(0.0)
    for now in (100.0, 1000.0, 5000.0):
        fleet.tick(now)
        assert {k: fleet.instances(k) for k in MODELS} == {A: 1, B: 1, C: 1}
    fleet.tick(5001.0, {A: 25})  # demand still adds instances
    assert fleet.instances(A) == 3


def test_without_model_caching_an_idle_version_is_not_kept() -> None:
    fleet = Fleet(config(loading={"enable_model_caching": False}))
    fleet.tick(0.0, {A: 5})
    fleet.tick(1.0)  # idle: nothing is kept loaded for a later request
    fleet.tick(12.0)
    assert fleet.instances(A) == 0
    cached = Fleet(config())
    cached.tick(0.0, {A: 5})
    cached.tick(12.0)
    assert cached.instances(A) == 1  # kept until scale_to_zero_delay (60 s)


def test_prefetch_and_preload_of_popular_versions_are_separate() -> None:
    popular = {"popularity": {C: 9.0}}
    eager = {"cold_start_strategy": ColdStartStrategy.EAGER, "popularity_threshold": 5}
    # prefetch only: loaded when the scaler starts, not kept once idle past the delay
    fleet = Fleet(config(zero={**eager, "preload_popular_models": False}))
    plan = fleet.tick(0.0, **popular)
    assert plan.desired == {C: 1} and "prefetched at start" in plan.decisions[0].reason
    fleet.tick(30.0, **popular)
    assert fleet.instances(C) == 1
    fleet.tick(100.0, **popular)
    assert fleet.instances(C) == 0
    # preload only: not loaded without a request, kept once loaded
    fleet = Fleet(config(zero=eager, loading={"prefetch_popular_models": False}))
    assert fleet.tick(0.0, **popular).desired == {}
    fleet.tick(1.0, {C: 1}, **popular)
    fleet.tick(500.0, **popular)
    assert fleet.instances(C) == 1


def test_predictive_scaling_needs_a_day_of_learning() -> None:
    with pytest.raises(ConfigError, match="learning_window_hours=6 is below the 24 hours"):
        ZeroScalingConfig(learning_window_hours=6)
    assert ZeroScalingConfig(learning_window_hours=6, enable_predictive_scaling=False)
    with pytest.raises(ConfigError, match="enable_predictive_scaling needs enable_metrics"):
        AutoscalerConfig(enable_metrics=False)
    quiet = ZeroScalingConfig(enable_predictive_scaling=False)
    assert not AutoscalerConfig(enable_metrics=False, zero_scaling=quiet).enable_metrics


@pytest.mark.parametrize(
    ("overrides", "at_500", "at_2000"),
    [
        ({}, 0, 0),  # zero: gone after scale_to_zero_delay (60 s)
        ({"zero": {"mode": "min"}}, 1, 0),  # min: kept, until model_ttl_seconds (1800 s)
        ({"enable_zero_scaling": False}, 1, 0),
        ({"zero": {"enabled": False}}, 1, 0),
        ({"zero": {"mode": "fixed"}}, 1, 1),  # fixed: only scale_model changes it
    ],
)
def test_modes_and_model_ttl(overrides: dict[str, Any], at_500: int, at_2000: int) -> None:
    fleet = Fleet(config(**overrides))
    fleet.tick(0.0, {A: 5})
    fleet.tick(1.0, {A: 5})
    fleet.tick(500.0)
    assert fleet.instances(A) == at_500
    fleet.tick(2000.0)
    assert fleet.instances(A) == at_2000


def test_the_workers_a_scaler_starts_get_its_loader_settings() -> None:
    from scaler.beat import worker_env

    env = worker_env(
        config(
            zero={"max_loaded_models": 2, "warmup_timeout": 20},
            loading={
                "cache_size_gb": 1.5, "load_timeout_seconds": 99, "warmup_timeout_seconds": 40,
                "concurrent_loads": 3, "failure_cooldown_seconds": 7,
                "health_check_interval_seconds": 4, "max_consecutive_failures": 5,
            },
        )
    )  # fmt: skip
    assert env == {
        "WORKER_MAX_LOADED_MODELS": "2",
        "WORKER_CACHE_SIZE_GB": "1.5",
        "WORKER_LOAD_TIMEOUT_SECONDS": "99.0",
        "WORKER_WARMUP_TIMEOUT_SECONDS": "20.0",  # the smaller of the two warm-up limits
        "WORKER_CONCURRENT_LOADS": "3",
        "WORKER_FAILURE_COOLDOWN_SECONDS": "7.0",
        "WORKER_HEALTH_CHECK_INTERVAL_S": "4.0",
        "WORKER_HEALTH_MAX_FAILURES": "5",
        "WORKER_HEALTH_COOLDOWN_S": "7.0",
    }

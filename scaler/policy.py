"""The scaling policy: a pure function from a snapshot of the fleet to a plan.

``decide(snapshot, config, state)`` reads no clock and does no I/O: the snapshot carries
the time. It returns the plan (instances per model version, which worker serves what,
how many worker processes to start or stop, and a reason for every change) and the
policy's next state (when each version was last busy, recent recommendations).

Rules, per model version:
- requests waiting or running: ``ceil(load / target_load_per_instance)`` instances, at
  least ``default_instances_per_model`` on a cold start, within
  ``min_instances_per_model``..``max_instances_per_model``; scale-up is immediate;
- fewer instances only once every recommendation of the last
  ``scale_down_stabilization_s`` allows it (no flapping under steady load);
- idle for ``scale_to_zero_delay`` (or ``model_ttl_seconds``): zero instances;
- pinned by hand (``scale_model``), loaded by hand (``load_model``) or popular: kept;
- a version whose load failed keeps at most one instance until ``failure_cooldown_seconds``
  pass: its callers get the recorded error at once and nothing reloads in a loop.

Placement keeps what already runs where it runs, takes instances away from idle workers
first, puts new ones on workers that hold the model already, then on workers with free
slots and memory, and only then asks for new worker processes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

from common.contracts import ModelKey
from scaler.config import AutoscalerConfig, ColdStartStrategy, ScalingMode

NEW_WORKER_PREFIX = "new-"


@dataclass(frozen=True)
class WorkerInfo:
    hostname: str
    serving: frozenset[ModelKey] = frozenset()
    loaded: frozenset[ModelKey] = frozenset()
    busy: tuple[tuple[ModelKey, int], ...] = ()  # requests held per model version
    capacity_bytes: int = 10 * 1024**3
    max_models: int = 5
    managed: bool = False  # started by this scaler's backend: may be stopped
    starting: bool = False  # launched, not reporting yet
    # Versions whose health checks fail here: not instances, not placed here again until
    # the worker retries them (after failure_cooldown_seconds).
    unhealthy: frozenset[ModelKey] = frozenset()

    def busy_on(self, key: ModelKey) -> int:
        return dict(self.busy).get(key, 0)

    @property
    def total_busy(self) -> int:
        return sum(n for _, n in self.busy)


@dataclass(frozen=True)
class Snapshot:
    now: float
    # Every registered model version and its size estimate (bytes of weights).
    models: dict[ModelKey, int]
    # Requests waiting in a version's queues, and held by workers (taken, not answered):
    # exact counts, read in one atomic step.
    queued: dict[ModelKey, int] = field(default_factory=dict)
    held: dict[ModelKey, int] = field(default_factory=dict)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    popularity: dict[ModelKey, float] = field(default_factory=dict)
    pins: dict[ModelKey, int] = field(default_factory=dict)  # scale_model
    loads: frozenset[ModelKey] = frozenset()  # load_model
    unloads: dict[ModelKey, float] = field(default_factory=dict)  # unload_model: when
    failures: dict[ModelKey, float] = field(default_factory=dict)  # last failed load: when
    # Per-version overrides from the model config's "scaling" section.
    overrides: dict[ModelKey, dict[str, float]] = field(default_factory=dict)

    def in_flight(self, key: ModelKey) -> int:
        return self.held.get(key, 0)

    def load(self, key: ModelKey) -> int:
        return self.queued.get(key, 0) + self.in_flight(key)

    def current(self, key: ModelKey) -> int:
        return sum(1 for w in self.workers.values() if key in w.serving and key not in w.unhealthy)


@dataclass
class VersionState:
    last_active: float
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    # The target of the last tick: a change is announced once, not on every tick that the
    # fleet takes to converge.
    target: int | None = None


@dataclass
class PolicyState:
    versions: dict[ModelKey, VersionState] = field(default_factory=dict)
    started_at: float | None = None


@dataclass(frozen=True)
class Decision:
    model: ModelKey
    from_instances: int
    to_instances: int
    reason: str


@dataclass
class Plan:
    desired: dict[ModelKey, int]
    assignments: dict[str, frozenset[ModelKey]]
    start_workers: int
    stop_workers: list[str]
    decisions: list[Decision]
    # Workers the plan could not place because the fleet is at max_workers.
    unplaced: dict[ModelKey, int] = field(default_factory=dict)


def decide(
    snapshot: Snapshot, config: AutoscalerConfig, state: PolicyState
) -> tuple[Plan, PolicyState]:
    now = snapshot.now
    versions = dict(state.versions)
    started_at = state.started_at if state.started_at is not None else now
    keys = (
        set(snapshot.queued) | set(snapshot.held) | set(snapshot.pins) | set(snapshot.loads)
        | set(versions)
        | {k for w in snapshot.workers.values() for k in w.serving | {b for b, _ in w.busy}}
        | _popular(snapshot, config)
    )  # fmt: skip
    keys &= set(snapshot.models)
    desired: dict[ModelKey, int] = {}
    decisions: list[Decision] = []
    for key in sorted(keys):
        current = snapshot.current(key)
        # A version found serving by a fresh scaler (a restart) counts as just active, so
        # that a restart never scales the fleet down on the spot.
        vstate = versions.get(key)
        if vstate is None:
            vstate = VersionState(last_active=now if current > 0 else -math.inf)
            if current > 0:  # a restarted scaler: what serves now is wanted for the window
                vstate.recommendations.append((now, current))
        target, reason, immediate, vstate = _recommend(
            key, snapshot, config, vstate, current, started_at
        )
        target, reason = _stabilize(vstate, config, now, current, target, reason, immediate)
        if target > 0 or current > 0:
            desired[key] = target
        if target != current and target != vstate.target:
            decisions.append(Decision(key, current, target, reason))
        vstate.target = target
        versions[key] = vstate
        forgettable = target == 0 and current == 0 and snapshot.load(key) == 0
        if forgettable and now - vstate.last_active > config.scale_down_stabilization_s:
            versions.pop(key, None)  # nothing to remember about a version idle at zero
    plan = _place(snapshot, config, desired, decisions)
    return plan, PolicyState(versions=versions, started_at=started_at)


def _popular(snapshot: Snapshot, config: AutoscalerConfig) -> set[ModelKey]:
    zero = config.zero_scaling
    if not zero.preload_popular_models:
        return set()
    return {k for k, score in snapshot.popularity.items() if score >= zero.popularity_threshold}


def _bound(key: ModelKey, snapshot: Snapshot, config: AutoscalerConfig) -> tuple[int, int]:
    loading = config.model_loading
    override = snapshot.overrides.get(key, {})
    low = int(override.get("min_instances", loading.min_instances_per_model))
    high = int(override.get("max_instances", loading.max_instances_per_model))
    return low, max(high, 1)


def _recommend(
    key: ModelKey,
    snapshot: Snapshot,
    config: AutoscalerConfig,
    vstate: VersionState,
    current: int,
    started_at: float,
) -> tuple[int, str, bool, VersionState]:
    """(instances, reason, apply at once, state) for one version, before stabilization."""
    now = snapshot.now
    zero, loading = config.zero_scaling, config.model_loading
    override = snapshot.overrides.get(key, {})
    load = snapshot.load(key)
    if load > 0:
        vstate = replace(vstate, last_active=now)
    low, high = _bound(key, snapshot, config)
    target_load = float(override.get("target_load_per_instance", config.target_load_per_instance))
    delay = float(override.get("scale_to_zero_delay", zero.scale_to_zero_delay))
    unloaded_at = snapshot.unloads.get(key)

    if key in snapshot.pins:
        return min(snapshot.pins[key], config.max_workers), "pinned by hand", True, vstate
    if unloaded_at is not None and unloaded_at >= vstate.last_active:
        return 0, "unloaded by hand", True, vstate

    if load > 0:
        wanted = math.ceil(load / target_load)
        reason = f"{load} requests queued or running"
        if current == 0:
            wanted = max(wanted, loading.default_instances_per_model)
            reason = f"cold start: {load} requests waiting"
        target = min(max(wanted, low, 1), high)
    elif zero.mode is ScalingMode.FIXED:
        return current, "fixed mode", True, vstate
    else:
        idle_s = now - vstate.last_active
        zero_ok = config.enable_zero_scaling and zero.enabled and zero.mode is ScalingMode.ZERO
        immediate = False
        if current == 0:
            target, reason = 0, "idle"
        elif zero_ok and idle_s >= delay:
            target, reason, immediate = (
                0,
                f"idle for {idle_s:.0f} s (scale_to_zero_delay {delay:g} s)",
                True,
            )
        elif idle_s >= zero.model_ttl_seconds:
            target, reason, immediate = (
                0,
                f"idle past model_ttl_seconds ({zero.model_ttl_seconds:g} s)",
                True,
            )
        else:
            target, reason = min(low, high), "idle"
        keep = _keep_reason(key, snapshot, config, started_at) if target == 0 else None
        if keep:
            return 1, keep, True, vstate
        return target, reason, immediate, vstate
    keep = _keep_reason(key, snapshot, config, started_at) if target == 0 else None
    if keep:
        target, reason = 1, keep
    failed_at = snapshot.failures.get(key)
    if failed_at is not None and now - failed_at < loading.failure_cooldown_seconds and target > 1:
        target, reason = 1, "load failed: one instance answers callers until the cooldown ends"
    return target, reason, False, vstate


def _keep_reason(
    key: ModelKey, snapshot: Snapshot, config: AutoscalerConfig, started_at: float
) -> str | None:
    if key in snapshot.loads:
        return "loaded by hand"
    zero = config.zero_scaling
    score = snapshot.popularity.get(key, 0.0)
    eager = zero.cold_start_strategy in (ColdStartStrategy.EAGER, ColdStartStrategy.HYBRID)
    if eager and zero.preload_popular_models and score >= zero.popularity_threshold:
        return f"popular (score {score:.1f} >= {zero.popularity_threshold:g}): kept loaded"
    return None


def _stabilize(
    vstate: VersionState,
    config: AutoscalerConfig,
    now: float,
    current: int,
    target: int,
    reason: str,
    immediate: bool,
) -> tuple[int, str]:
    """Scale up at once; scale down only to the highest recommendation of the window."""
    window = vstate.recommendations
    window.append((now, target))
    while window and window[0][0] < now - config.scale_down_stabilization_s:
        window.popleft()
    if immediate or target >= current:
        return target, reason
    highest = max(n for _, n in window)
    if highest >= current:
        return current, reason
    return highest, f"{reason}; lower for {config.scale_down_stabilization_s:g} s"


def _place(
    snapshot: Snapshot,
    config: AutoscalerConfig,
    desired: dict[ModelKey, int],
    decisions: list[Decision],
) -> Plan:
    workers = snapshot.workers
    assign: dict[str, set[ModelKey]] = {
        name: {k for k in w.serving if desired.get(k, 0) > 0 and k not in w.unhealthy}
        for name, w in workers.items()
    }
    size = snapshot.models
    capacity = {name: (w.capacity_bytes, w.max_models) for name, w in workers.items()}
    new_capacity = (
        int(config.model_loading.cache_size_gb * 1024**3),
        config.zero_scaling.max_loaded_models,
    )

    def fits(name: str, key: ModelKey) -> bool:
        cap_bytes, cap_models = capacity.get(name, new_capacity)
        held = assign[name]
        return (
            len(held) < cap_models
            and sum(size.get(k, 0) for k in held) + size.get(key, 0) <= cap_bytes
        )

    unplaced: dict[ModelKey, int] = {}
    new_workers = 0
    for key in sorted(desired, key=lambda k: -desired[k]):
        want = desired[key]
        holders = [n for n, keys in assign.items() if key in keys]
        if len(holders) > want:
            # Take instances away from the idlest workers first.
            holders.sort(key=lambda n: (workers[n].busy_on(key) if n in workers else 0, n))
            for name in holders[: len(holders) - want]:
                assign[name].discard(key)
            continue
        missing = want - len(holders)
        candidates = [
            n
            for n in assign
            if key not in assign[n]
            and not n.startswith(NEW_WORKER_PREFIX)
            and key not in workers[n].unhealthy
        ]
        candidates.sort(
            key=lambda n: (
                key not in workers[n].loaded,  # already holds the model: no load at all
                workers[n].starting,
                len(assign[n]),
                n,
            )
        )
        for name in candidates:
            if missing == 0:
                break
            if fits(name, key):
                assign[name].add(key)
                missing -= 1
        # New worker processes: first those this plan already creates, then more.
        for name in [n for n in assign if n.startswith(NEW_WORKER_PREFIX)]:
            if missing == 0:
                break
            if key not in assign[name] and fits(name, key):
                assign[name].add(key)
                missing -= 1
        while missing > 0 and len(workers) + new_workers < config.max_workers:
            name = f"{NEW_WORKER_PREFIX}{new_workers}"
            new_workers += 1
            assign[name] = {key}
            missing -= 1
        if missing:
            unplaced[key] = missing

    stop = [
        name
        for name, w in sorted(workers.items())
        if w.managed and not assign[name] and w.total_busy == 0 and not w.starting
    ]
    if config.zero_scaling.cold_start_strategy is ColdStartStrategy.HYBRID and any(
        desired.values()
    ):
        # Keep one empty managed worker as the warm standby while anything is served.
        if stop:
            stop = stop[1:]
        elif (
            not any(not keys for n, keys in assign.items())
            and len(workers) + new_workers < config.max_workers
        ):
            assign[f"{NEW_WORKER_PREFIX}{new_workers}"] = set()
            new_workers += 1
    for key, missing in unplaced.items():
        decisions.append(
            Decision(
                key,
                desired[key] - missing,
                desired[key],
                f"{missing} instances wait for room (max_workers)",
            )
        )
    return Plan(
        desired=desired,
        assignments={n: frozenset(k) for n, k in assign.items()},
        start_workers=new_workers,
        stop_workers=stop,
        decisions=decisions,
        unplaced=unplaced,
    )

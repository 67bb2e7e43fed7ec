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
  pass: its callers get the recorded error at once and nothing reloads in a loop;
- with a forecast (``enable_predictive_scaling``): instances come up a cold start ahead of
  predicted traffic, and an idle version whose traffic is predicted back within the
  horizon is not taken to zero.

The rest of a tick's judgement lives here too, its memory carried in ``PolicyState``: the
cold-start watch (a version waiting past ``cold_start_timeout``, and each version brought
up from zero), the recycle of a worker whose memory did not come back after an unload, the
reap of workers that never reported, and the popularity counts and their decay. ``decide``
never changes its inputs: the state it returns is new where it differs.

Placement keeps what already runs where it runs, takes instances away from idle workers
first, puts new ones on workers that hold the model already, then on workers with free
slots and memory, and only then asks for new worker processes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from common.contracts import ModelKey
from scaler.config import AutoscalerConfig, ColdStartStrategy, ModelLoadingStrategy, ScalingMode

NEW_WORKER_PREFIX = "new-"
# An unload of at least this many bytes must show in the worker's RSS, or it is recycled.
RECYCLE_MIN_BYTES = 64 * 1024**2
# Predicted requests within a window worth an instance: more likely than not that one comes
# (a Poisson arrival within the window has probability 1 - exp(-n)).
LIKELY_ARRIVALS = math.log(2)


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
    # Resident memory, the bytes of each loaded version, and the rows served per version
    # since the worker started (from its report).
    rss_bytes: int = 0
    model_bytes: tuple[tuple[ModelKey, int], ...] = ()
    rows: tuple[tuple[ModelKey, int], ...] = ()
    # Memory a new version could take on its device (NVML free on a GPU, available RAM on
    # the CPU); None: not reported.
    free_bytes: int | None = None
    # Seconds since each loaded version last ran here: the least recently used is evicted
    # first when a version with requests waiting needs the room.
    idle_s: tuple[tuple[ModelKey, float], ...] = ()

    def busy_on(self, key: ModelKey) -> int:
        return dict(self.busy).get(key, 0)

    @property
    def total_busy(self) -> int:
        return sum(n for _, n in self.busy)


@dataclass(frozen=True)
class Snapshot:
    now: float
    # Every registered model version and its size: the memory a load of it was measured
    # to take, else the estimate (bytes of weights).
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
    # Processes this scaler started that do not report (yet): when each started.
    silent: dict[str, float] = field(default_factory=dict)
    forecasts: dict[ModelKey, Forecast] = field(default_factory=dict)

    def in_flight(self, key: ModelKey) -> int:
        return self.held.get(key, 0)

    def load(self, key: ModelKey) -> int:
        return self.queued.get(key, 0) + self.in_flight(key)

    def current(self, key: ModelKey) -> int:
        return sum(1 for w in self.workers.values() if key in w.serving and key not in w.unhealthy)


@dataclass(frozen=True)
class Forecast:
    """A version's predicted request rate: ``rates[i]`` requests/s from ``start + i * step_s``,
    with what it takes to act on it: its measured cold start and seconds of work per
    request (from the history)."""

    start: float
    step_s: float
    rates: tuple[float, ...]
    cold_start_s: float = 0.0
    service_s: float = 0.0

    def expected(self, begin: float, end: float) -> float:
        """Requests predicted in [begin, end)."""
        total = 0.0
        for i, rate in enumerate(self.rates):
            lo = max(begin, self.start + i * self.step_s)
            hi = min(end, self.start + (i + 1) * self.step_s)
            if hi > lo:
                total += rate * (hi - lo)
        return total

    def peak(self, begin: float, end: float) -> float:
        """The highest predicted rate over [begin, end)."""
        return max(
            (
                rate
                for i, rate in enumerate(self.rates)
                if self.start + i * self.step_s < end and self.start + (i + 1) * self.step_s > begin
            ),
            default=0.0,
        )


@dataclass
class VersionState:
    last_active: float  # a request waiting, running or answered since the tick before
    # A request waiting or running (not only answered: answers are reported late, and one
    # from before an unload must not undo it).
    last_request: float = -math.inf
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    # The target of the last tick: a change is announced once, not on every tick that the
    # fleet takes to converge.
    target: int | None = None


@dataclass
class PolicyState:
    versions: dict[ModelKey, VersionState] = field(default_factory=dict)
    started_at: float | None = None
    # Versions waiting for a first instance since, and those reported past the timeout.
    cold_since: dict[ModelKey, float] = field(default_factory=dict)
    cold_reported: frozenset[ModelKey] = frozenset()
    # Per worker: its RSS and model bytes at the last tick, and an unload being watched
    # (when, RSS before, bytes unloaded).
    memory: dict[str, tuple[int, dict[ModelKey, int]]] = field(default_factory=dict)
    unloads: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    # Rows served per (worker, version) at the last count, and when popularity last moved.
    rows: dict[tuple[str, ModelKey], int] = field(default_factory=dict)
    popularity_at: float | None = None


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
    # Versions whose cold start ended this tick, workers to replace (memory not returned,
    # never reported), and requests counted for popularity with the decay
    # of the scores since the last count.
    cold_starts: list[ModelKey] = field(default_factory=list)
    recycle: list[str] = field(default_factory=list)
    reap: list[str] = field(default_factory=list)
    popularity: tuple[dict[ModelKey, float], float] | None = None
    # Versions the warm standby keeps loaded without consuming their queues.
    preload: dict[str, frozenset[ModelKey]] = field(default_factory=dict)


def decide(
    snapshot: Snapshot, config: AutoscalerConfig, state: PolicyState
) -> tuple[Plan, PolicyState]:
    served, rows = _served(snapshot, state)
    plan, versions, started_at = _scale(snapshot, config, state, served)
    cold_since, cold_reported = _watch_cold_starts(snapshot, config, state, plan)
    memory, unloads = _watch_memory(snapshot, config, state, plan)
    _reap(snapshot, config, plan)
    popularity_at = _count_popularity(snapshot, config, state, plan, served)
    return plan, PolicyState(
        versions=versions,
        started_at=started_at,
        cold_since=cold_since,
        cold_reported=cold_reported,
        memory=memory,
        unloads=unloads,
        rows=rows,
        popularity_at=popularity_at,
    )


def _scale(
    snapshot: Snapshot, config: AutoscalerConfig, state: PolicyState, served: dict[ModelKey, float]
) -> tuple[Plan, dict[ModelKey, VersionState], float]:
    now = snapshot.now
    versions = dict(state.versions)
    started_at = state.started_at if state.started_at is not None else now
    keys = (
        set(snapshot.queued) | set(snapshot.held) | set(snapshot.pins) | set(snapshot.loads)
        | set(versions)
        | {k for w in snapshot.workers.values() for k in w.serving | {b for b, _ in w.busy}}
        | _popular(snapshot, config)
        | _predicted(snapshot, config)
        | _eager(snapshot, config, started_at)
    )  # fmt: skip
    keys &= set(snapshot.models)
    desired: dict[ModelKey, int] = {}
    decisions: list[Decision] = []
    for key in sorted(keys):
        current = snapshot.current(key)
        vstate = versions.get(key)
        if vstate is None:
            # A version found serving by a fresh scaler (a restart) counts as just active,
            # so that a restart never scales the fleet down on the spot.
            vstate = VersionState(last_active=now if current > 0 else -math.inf)
            if current > 0:
                vstate.recommendations.append((now, current))
        else:  # copy on write: the caller's state stays as it was
            vstate = replace(vstate, recommendations=deque(vstate.recommendations))
        if served.get(key):
            # Answered since the last tick: busy, even if nothing waits at this instant
            # (a request of a few ms is rarely in flight when the scaler looks).
            vstate.last_active = now
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
    return _place(snapshot, config, desired, decisions), versions, started_at


def _popular(snapshot: Snapshot, config: AutoscalerConfig) -> set[ModelKey]:
    zero, loading = config.zero_scaling, config.model_loading
    if not (zero.preload_popular_models or loading.prefetch_popular_models):
        return set()
    return {k for k, score in snapshot.popularity.items() if score >= zero.popularity_threshold}


def _predicted(snapshot: Snapshot, config: AutoscalerConfig) -> set[ModelKey]:
    return set(snapshot.forecasts) if config.zero_scaling.enable_predictive_scaling else set()


def _eager(snapshot: Snapshot, config: AutoscalerConfig, started_at: float) -> set[ModelKey]:
    """Versions loaded without a request: all of them with ``enable_dynamic_loading`` off,
    and at the scaler's start (until ``scale_to_zero_delay``) with ``loading_strategy``
    eager."""
    if _static(config) or _eager_window(snapshot.now, config, started_at):
        return set(snapshot.models)
    return set()


def _static(config: AutoscalerConfig) -> bool:
    return not config.enable_dynamic_loading


def _eager_window(now: float, config: AutoscalerConfig, started_at: float) -> bool:
    eager = config.model_loading.loading_strategy is ModelLoadingStrategy.EAGER
    return eager and now - started_at < config.zero_scaling.scale_to_zero_delay


def _lead_s(forecast: Forecast, config: AutoscalerConfig) -> float:
    """How far ahead instances are started: a cold start, and a tick to see the need."""
    return forecast.cold_start_s + config.tick_interval_s


def _forecast_instances(
    forecast: Forecast | None, now: float, config: AutoscalerConfig, target_load: float
) -> tuple[int, str]:
    """Instances the predicted rate needs a cold start from now (Little's law: requests
    in flight = rate x seconds per request), and the reason that names the forecast."""
    if forecast is None:
        return 0, ""
    lead = _lead_s(forecast, config)
    peak = forecast.peak(now, now + lead)
    in_flight = peak * forecast.service_s
    if in_flight / target_load > 1:
        need = math.ceil(in_flight / target_load - 1e-9)
    else:  # one instance where a request is likely before one could start
        need = int(forecast.expected(now, now + lead) >= LIKELY_ARRIVALS)
    cold = forecast.cold_start_s
    return need, f"forecast: {peak:.3g} req/s within {lead:.0f} s (cold start {cold:.1f} s)"


def _forecast_keep(forecast: Forecast | None, now: float, config: AutoscalerConfig) -> str | None:
    """A reason to hold one instance: a request is more likely than not within the horizon."""
    if forecast is None:
        return None
    horizon = config.zero_scaling.prediction_horizon_minutes * 60
    expected = forecast.expected(now, now + horizon)
    if expected < LIKELY_ARRIVALS:
        return None
    return f"forecast: {expected:.3g} requests within {horizon / 60:g} min"


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
        vstate = replace(vstate, last_active=now, last_request=now)
    low, high = _bound(key, snapshot, config)
    target_load = _target_load(key, snapshot, config)
    delay = float(override.get("scale_to_zero_delay", zero.scale_to_zero_delay))
    if not loading.enable_model_caching:
        delay = 0.0  # nothing is kept loaded for later requests
    unloaded_at = snapshot.unloads.get(key)
    forecast = snapshot.forecasts.get(key) if zero.enable_predictive_scaling else None
    predicted, predicted_reason = _forecast_instances(forecast, now, config, target_load)

    if key in snapshot.pins:
        return min(snapshot.pins[key], config.max_workers), "pinned by hand", True, vstate
    if unloaded_at is not None and unloaded_at >= vstate.last_request:
        return 0, "unloaded by hand", True, vstate

    if load > 0:
        wanted = math.ceil(load / target_load)
        reason = f"{load} requests queued or running"
        if current == 0:
            wanted = max(wanted, loading.default_instances_per_model)
            reason = f"cold start: {load} requests waiting"
        if predicted > wanted:
            wanted, reason = predicted, predicted_reason
        target = min(max(wanted, low, 1), high)
    elif zero.mode is ScalingMode.FIXED:
        keep = _keep_reason(key, snapshot, config, started_at, current) if current == 0 else None
        return (1, keep, True, vstate) if keep else (current, "fixed mode", True, vstate)
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
        if predicted > target:
            return min(predicted, high), predicted_reason, True, vstate
        keep = _keep_reason(key, snapshot, config, started_at, current) if target == 0 else None
        if keep is None and target == 0 and (loading.enable_model_caching or current == 0):
            keep = _forecast_keep(forecast, now, config)
        if keep:
            return 1, keep, True, vstate
        return target, reason, immediate, vstate
    keep = _keep_reason(key, snapshot, config, started_at, current) if target == 0 else None
    if keep:
        target, reason = 1, keep
    failed_at = snapshot.failures.get(key)
    if failed_at is not None and now - failed_at < loading.failure_cooldown_seconds and target > 1:
        target, reason = 1, "load failed: one instance answers callers until the cooldown ends"
    return target, reason, False, vstate


def _keep_reason(
    key: ModelKey, snapshot: Snapshot, config: AutoscalerConfig, started_at: float, current: int
) -> str | None:
    """Why a version without requests has an instance: loaded by hand, served statically,
    loaded eagerly at start, or popular (prefetched when the scaler starts, kept loaded)."""
    if key in snapshot.loads:
        return "loaded by hand"
    if _static(config):
        return "enable_dynamic_loading off: every registered version stays loaded"
    if _eager_window(snapshot.now, config, started_at):
        return "loading_strategy eager: loaded at start"
    zero, loading = config.zero_scaling, config.model_loading
    score = snapshot.popularity.get(key, 0.0)
    eager = zero.cold_start_strategy in (ColdStartStrategy.EAGER, ColdStartStrategy.HYBRID)
    if not eager or score < zero.popularity_threshold:
        return None
    popular = f"popular (score {score:.1f} >= {zero.popularity_threshold:g})"
    if loading.prefetch_popular_models and snapshot.now - started_at < zero.scale_to_zero_delay:
        return f"{popular}: prefetched at start"
    if current > 0 and zero.preload_popular_models and loading.enable_model_caching:
        return f"{popular}: kept loaded"
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

    margin = int(config.model_loading.memory_margin_mb * 1024**2)

    def fits(name: str, key: ModelKey) -> bool:
        cap_bytes, cap_models = capacity.get(name, new_capacity)
        held = assign[name]
        return (
            len(held) < cap_models
            and sum(size.get(k, 0) for k in held) + size.get(key, 0) <= cap_bytes
            and fits_device(name, key)
        )

    def fits_device(name: str, key: ModelKey) -> bool:
        """The device's free memory, with the margin, takes the version and the others
        placed there this tick; what the worker holds but is no longer assigned is
        unloaded (its memory counts as free)."""
        worker = workers.get(name)
        if worker is None or worker.free_bytes is None or key in worker.loaded:
            return True
        held = assign[name]
        incoming = sum(size.get(k, 0) for k in held if k not in worker.loaded)
        reclaimed = sum(b for k, b in worker.model_bytes if k not in held)
        return size.get(key, 0) + incoming + margin <= worker.free_bytes + reclaimed

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
        if missing and snapshot.load(key) > 0:
            missing = _make_room(snapshot, key, missing, candidates, assign, fits, decisions)
        if missing:
            unplaced[key] = missing

    stop = [
        name
        for name, w in sorted(workers.items())
        if w.managed and not assign[name] and w.total_busy == 0 and not w.starting
    ]
    preload: dict[str, frozenset[ModelKey]] = {}
    if config.zero_scaling.cold_start_strategy is ColdStartStrategy.HYBRID and any(
        desired.values()
    ):
        # One empty managed worker is the warm standby while anything is served. A new one
        # starts only once the instances carry their load: started during a burst, it
        # would take CPU from the instances serving it.
        standby = None
        if stop:
            standby, stop = stop[0], stop[1:]
        elif not any(not keys for keys in assign.values()):
            if len(workers) + new_workers < config.max_workers and _absorbed(
                snapshot, config, desired
            ):
                assign[f"{NEW_WORKER_PREFIX}{new_workers}"] = set()
                new_workers += 1
        else:
            standby = next((n for n, k in sorted(assign.items()) if not k and n in workers), None)
        if standby is not None and not workers[standby].starting:
            # It holds the versions that may need another instance: a scale-up is then
            # a queue to consume, not a model to load.
            preload[standby] = _standby_models(snapshot, config, desired, standby)
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
        preload=preload,
    )


def _target_load(key: ModelKey, snapshot: Snapshot, config: AutoscalerConfig) -> float:
    override = snapshot.overrides.get(key, {})
    return float(override.get("target_load_per_instance", config.target_load_per_instance))


def _absorbed(snapshot: Snapshot, config: AutoscalerConfig, desired: dict[ModelKey, int]) -> bool:
    """Every served version's instances carry its requests (none waits for more)."""
    return all(
        snapshot.load(k) <= _target_load(k, snapshot, config) * snapshot.current(k)
        for k, n in desired.items()
        if n > 0
    )


def _make_room(
    snapshot: Snapshot,
    key: ModelKey,
    missing: int,
    candidates: list[str],
    assign: dict[str, set[ModelKey]],
    fits: Callable[[str, ModelKey], bool],
    decisions: list[Decision],
) -> int:
    """No worker has room and no new one may start: on a worker, the versions with nothing
    waiting or running give way to ``key`` (which has requests waiting), least recently
    used first, until it fits. Returns the instances still missing."""
    for name in candidates:
        if missing == 0:
            break
        worker = snapshot.workers[name]
        if worker.starting or key in assign[name]:
            continue
        idle = dict(worker.idle_s)
        evictable = sorted(
            (
                k
                for k in assign[name]
                # Nothing waiting or running, and not pinned by hand (scale_model).
                if snapshot.load(k) == 0 and worker.busy_on(k) == 0 and k not in snapshot.pins
            ),
            key=lambda k: (-idle.get(k, 0.0), k),
        )
        given_up = []
        for victim in evictable:
            if fits(name, key):
                break
            assign[name].discard(victim)
            given_up.append(victim)
        if fits(name, key):
            assign[name].add(key)
            missing -= 1
            for victim in given_up:
                reason = (
                    f"evicted from {name} (least recently used) for {key}, which has "
                    "requests waiting"
                )
                decisions.append(Decision(victim, 1, 0, reason))
        else:
            assign[name] |= set(given_up)  # no room even so: nothing moves
    return missing


def _standby_models(
    snapshot: Snapshot,
    config: AutoscalerConfig,
    desired: dict[ModelKey, int],
    standby: str,
) -> frozenset[ModelKey]:
    """The served versions below their maximum, busiest first, as many as fit."""
    held: set[ModelKey] = set()
    candidates = [k for k, n in desired.items() if 0 < n < _bound(k, snapshot, config)[1]]
    candidates.sort(key=lambda k: (-snapshot.load(k), -snapshot.popularity.get(k, 0.0), k))
    worker = snapshot.workers[standby]
    room = worker.capacity_bytes
    for key in candidates[: worker.max_models]:
        size = snapshot.models.get(key, 0)
        if size <= room:
            held.add(key)
            room -= size
    return frozenset(held)


def _watch_cold_starts(
    snapshot: Snapshot, config: AutoscalerConfig, state: PolicyState, plan: Plan
) -> tuple[dict[ModelKey, float], frozenset[ModelKey]]:
    """A version whose requests wait past ``cold_start_timeout`` with no loaded instance (a
    stuck load, no room for a worker) is a decision, once. A cold start ends at the tick
    that sees an instance serving or nothing left waiting (answered requests end it too: a
    fast load may finish between reports); its requests' waits are the workers' to record."""
    now, limit = snapshot.now, config.zero_scaling.cold_start_timeout
    since, reported = dict(state.cold_since), set(state.cold_reported)
    for key in set(snapshot.queued) | set(since):
        warm = any(key in w.loaded and key in w.serving for w in snapshot.workers.values())
        if warm or snapshot.load(key) == 0:
            started = since.pop(key, None)
            reported.discard(key)
            if started is not None:
                plan.cold_starts.append(key)
            continue
        started = since.setdefault(key, now)
        if key not in reported and now - started > limit:
            n = plan.desired.get(key, 0)
            plan.decisions.append(
                Decision(key, n, n, f"cold start exceeded cold_start_timeout ({limit:g} s)")
            )
            reported.add(key)  # once; again only after it turns warm
    return since, frozenset(reported)


def _watch_memory(
    snapshot: Snapshot, config: AutoscalerConfig, state: PolicyState, plan: Plan
) -> tuple[dict[str, tuple[int, dict[ModelKey, int]]], dict[str, tuple[float, int, int]]]:
    """A worker whose RSS did not fall by half of what it unloaded (of a large model, within
    three ticks) is replaced: the allocator kept the memory."""
    now = snapshot.now
    memory: dict[str, tuple[int, dict[ModelKey, int]]] = {}
    unloads = {n: u for n, u in state.unloads.items() if n in snapshot.workers}
    for name, worker in sorted(snapshot.workers.items()):
        if worker.starting:
            continue
        models = dict(worker.model_bytes)
        memory[name] = (worker.rss_bytes, models)
        before = state.memory.get(name)
        if before is not None and name not in unloads:
            gone = sum(n for k, n in before[1].items() if k not in models)
            if gone >= RECYCLE_MIN_BYTES:
                unloads[name] = (now, before[0], gone)
        watched = unloads.get(name)
        if watched is None or now - watched[0] < 3 * config.tick_interval_s:
            continue
        _, rss_before, size = unloads.pop(name)
        if worker.managed and worker.rss_bytes > rss_before - size // 2:
            plan.recycle.append(name)
            plan.decisions.append(
                Decision(ModelKey("*", "*"), 1, 0, f"worker {name} recycled: memory not returned")
            )
    return memory, unloads


def _reap(snapshot: Snapshot, config: AutoscalerConfig, plan: Plan) -> None:
    """Processes started here that never reported within ``worker_start_timeout_s``."""
    limit = config.worker_start_timeout_s
    for name, started_at in sorted(snapshot.silent.items()):
        if snapshot.now - started_at > limit:
            plan.reap.append(name)


def _served(
    snapshot: Snapshot, state: PolicyState
) -> tuple[dict[ModelKey, float], dict[tuple[str, ModelKey], int]]:
    """Requests answered since the last tick per version, from the workers' row counters
    (a worker gone drops out; a restarted counter counts from zero), and the counters."""
    counts: dict[ModelKey, float] = {}
    rows: dict[tuple[str, ModelKey], int] = {}
    for name, worker in snapshot.workers.items():
        for key, n in worker.rows:
            rows[(name, key)] = n
            before = state.rows.get((name, key))
            if before is not None and n > before:
                counts[key] = counts.get(key, 0.0) + n - before
    return counts, rows


def _count_popularity(
    snapshot: Snapshot,
    config: AutoscalerConfig,
    state: PolicyState,
    plan: Plan,
    served: dict[ModelKey, float],
) -> float:
    """Popularity grows by the requests answered and decays with a half life of an eighth
    of the learning window; returns when the scores last moved."""
    now = snapshot.now
    if state.popularity_at is None:
        return now
    half_life_s = config.zero_scaling.learning_window_hours * 3600 / 8
    decay = 0.5 ** ((now - state.popularity_at) / half_life_s)
    if served or decay < 0.999:
        plan.popularity = (served, decay)
        return now
    return state.popularity_at

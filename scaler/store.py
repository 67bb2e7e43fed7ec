"""The scaler's reads and writes in Redis: the snapshot, overrides, decisions, the lock.

A snapshot takes two round trips whatever the fleet's size: one pipeline for the registry
stamp, the worker list, overrides, popularity, load failures and every version's load
(the broker's script: requests queued, in shared and instance queues, and held by
workers, read in one atomic step, so none is counted twice or missed), and one for the
worker reports (and the registry itself when it changed).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from common import keys
from common.contracts import ModelKey, is_alive
from scaler.policy import Decision, Snapshot, WorkerInfo
from tasks import broker

# Reports older than this are not even read: far beyond any worker's silence limit.
REPORT_WINDOW_S = 120.0

# KEYS: leader key. ARGV: id, ttl ms. Take the lock, or renew it if it is ours.
_LEADER = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def instance_states(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per "name/version" of the scaler status: instances active (model loaded) and loading."""
    counts: dict[str, dict[str, int]] = {}
    for info in status.get("workers", {}).values():
        loaded = set(info.get("loaded", []))
        for text in info.get("serving", []):
            state = "active" if text in loaded else "loading"
            counts.setdefault(text, {"active": 0, "loading": 0})[state] += 1
    return counts


parse_key = ModelKey.parse


def queue_to_key(queue: str) -> ModelKey | None:
    """The version a shared queue serves."""
    if not queue.startswith(keys.QUEUE_PREFIX):
        return None
    label = keys.queue_label(queue)
    return ModelKey.parse(label) if label else None


@dataclass
class FleetRecord:
    """A worker process started by the local backend."""

    hostname: str
    pid: int
    host: str
    started_at: float
    queues: list[str] = field(default_factory=list)
    # Set once its first report was seen, and when the scaler asked it to stop: from then
    # on the launch queues no longer say what it serves.
    seen: bool = False
    stopping: bool = False
    gpu: int | None = None  # the GPU it is pinned to (CUDA_VISIBLE_DEVICES)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes | str) -> FleetRecord:
        return cls(**json.loads(raw))


@dataclass
class FleetView:
    """What a snapshot read: the policy's input plus what the actuators need."""

    snapshot: Snapshot
    reports: dict[str, dict[str, Any]]
    fleet: dict[str, FleetRecord]
    # Workers that hold messages or have instance queues (alive or not): a gone one is
    # failed over.
    consumers: set[str] = field(default_factory=set)


class ScalerStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._leader = client.register_script(_LEADER)
        self._registry_stamp: bytes | None = None
        self._registry: dict[str, dict[str, Any]] = {}
        self._sizes: dict[ModelKey, int] = {}
        self._measured: dict[ModelKey, int] = {}
        self._measured_read = False
        self._overrides: dict[ModelKey, dict[str, float]] = {}
        self.id = uuid.uuid4().hex

    # -- leadership -------------------------------------------------------------------------
    def lead(self, ttl_s: float) -> bool:
        return bool(self._leader(keys=[keys.SCALER_LEADER], args=[self.id, int(ttl_s * 1000)]))

    def resign(self) -> None:
        pipe = self.client.pipeline()
        pipe.watch(keys.SCALER_LEADER)
        if pipe.get(keys.SCALER_LEADER) == self.id.encode():
            pipe.multi()
            pipe.delete(keys.SCALER_LEADER)
            pipe.execute()
        pipe.reset()

    # -- snapshot ---------------------------------------------------------------------------
    def read(self, now: float) -> FleetView:
        (
            stamp, hostnames, overrides, popularity, failures, fleet_raw, instance_queues,
            leases, load,
        ) = broker.run(self.client, [
            ("GET", keys.REGISTRY_UPDATED),
            ("ZRANGEBYSCORE", keys.WORKERS, now - REPORT_WINDOW_S, "+inf"),
            ("HGETALL", keys.OVERRIDES),
            ("HGETALL", keys.POPULARITY),
            ("HGETALL", keys.LOAD_FAILURES),
            ("HGETALL", keys.FLEET),
            ("SMEMBERS", keys.INSTANCE_QUEUES),
            ("ZRANGE", keys.LEASES, 0, -1),
            broker.load_command(),
        ])  # fmt: skip

        second = self.client.pipeline(transaction=False)
        names = [h.decode() for h in hostnames]
        if names:
            second.mget([keys.worker_report_key(h) for h in names])
        registry_changed = stamp != self._registry_stamp or not self._registry
        if registry_changed:
            second.hgetall(keys.REGISTRY)
        results = second.execute() if (names or registry_changed) else []
        reports_raw = results.pop(0) if names else []
        if registry_changed:
            self._load_registry(results.pop(0) if results else {}, stamp)

        # A worker whose heartbeat stopped is gone: its instances leave routing and its
        # requests are failed over.
        reports = {
            name: report
            for name, raw in zip(names, reports_raw, strict=True)
            if raw is not None and is_alive(report := json.loads(raw), now)
        }
        fleet = {h.decode(): FleetRecord.from_json(raw) for h, raw in fleet_raw.items()}
        counts = broker.parse_load(load)
        self._learn_bytes(reports)
        snapshot = Snapshot(
            now=now,
            models={k: self._measured.get(k, n) for k, n in self._sizes.items()},
            queued={ModelKey.parse(k): n for k, n in counts.queued.items()},
            held={ModelKey.parse(k): n for k, n in counts.held.items()},
            workers=self._workers(reports, fleet, now),
            popularity={parse_key(k.decode()): float(v) for k, v in popularity.items()},
            failures={
                parse_key(k.decode()): float(json.loads(v)["time"]) for k, v in failures.items()
            },
            overrides=dict(self._overrides),
            silent={n: r.started_at for n, r in fleet.items() if n not in reports},
            **self._manual(overrides),
        )
        consumers = {keys.text(q).partition("@")[2] for q in instance_queues}
        consumers |= {keys.text(c) for c in leases}
        return FleetView(snapshot=snapshot, reports=reports, fleet=fleet, consumers=consumers)

    def live_reports(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """The reports of the workers alive at ``now``, by hostname."""
        now = time.time() if now is None else now
        found: list[bytes] = self.client.zrangebyscore(  # type: ignore[assignment]
            keys.WORKERS, now - REPORT_WINDOW_S, "+inf"
        )
        names = [keys.text(h) for h in found]
        if not names:
            return {}
        raws = self.client.mget([keys.worker_report_key(n) for n in names])
        return {
            n: report
            for n, r in zip(names, raws, strict=True)
            if r is not None and is_alive(report := json.loads(r), now)
        }

    def _learn_bytes(self, reports: dict[str, dict[str, Any]]) -> None:
        """Per version, the most memory a load was measured to take, kept in Redis (a new
        scaler starts from it)."""
        if self._measured_read is False:
            raw = self.client.hgetall(keys.MODEL_BYTES)
            self._measured = {parse_key(keys.text(k)): int(v) for k, v in raw.items()}
            self._measured_read = True
        learned: dict[str, int] = {}
        for report in reports.values():
            for model in report.get("models", []):
                key = ModelKey(model["name"], model["version"])
                measured = int(model.get("measured_bytes", 0))
                if measured > self._measured.get(key, 0):
                    self._measured[key] = measured
                    learned[keys.model_key_text(*key)] = measured
        if learned:
            pipe = self.client.pipeline(transaction=False)
            for text, measured in learned.items():
                pipe.hset(keys.MODEL_BYTES, text, measured)
            pipe.execute()

    def registered(self) -> list[ModelKey]:
        return list(self._sizes)

    def load(self) -> dict[str, dict[str, int]]:
        """Per registered version ("name/version"): requests queued and held by workers,
        zero included."""
        queues, raw = broker.run(
            self.client, [("SMEMBERS", keys.REGISTRY_QUEUES), broker.load_command()]
        )
        counts = broker.parse_load(raw)
        labels = {keys.queue_label(keys.text(q)) for q in queues} | set(counts.queued)
        return {
            label: {"queued": counts.queued.get(label, 0), "held": counts.held.get(label, 0)}
            for label in sorted(label for label in labels if label)
        }

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting or running per registered version, those with none included."""
        return {label: n["queued"] + n["held"] for label, n in self.load().items()}

    def _load_registry(self, raw: dict[bytes, bytes], stamp: bytes | None) -> None:
        registry = {k.decode(): json.loads(v) for k, v in raw.items()}
        sizes, overrides = {}, {}
        for name, entry in registry.items():
            for version, info in entry["versions"].items():
                key = ModelKey(name, version)
                sizes[key] = int(info.get("bytes", 0))
                if info.get("scaling"):
                    overrides[key] = dict(info["scaling"])
        self._registry, self._sizes, self._overrides = registry, sizes, overrides
        self._registry_stamp = stamp

    @staticmethod
    def _manual(raw: dict[bytes, bytes]) -> dict[str, Any]:
        pins, loads, unloads = {}, set(), {}
        for k, v in raw.items():
            key, record = parse_key(k.decode()), json.loads(v)
            if "instances" in record:
                pins[key] = int(record["instances"])
            if record.get("load"):
                loads.add(key)
            if "unload_at" in record:
                unloads[key] = float(record["unload_at"])
        return {"pins": pins, "loads": frozenset(loads), "unloads": unloads}

    def _workers(
        self, reports: dict[str, dict[str, Any]], fleet: dict[str, FleetRecord], now: float
    ) -> dict[str, WorkerInfo]:
        workers = {}
        for name, report in reports.items():
            serving = {queue_to_key(q) for q in report.get("queues", [])}
            workers[name] = WorkerInfo(
                hostname=name,
                serving=frozenset(k for k in serving if k is not None),
                loaded=frozenset(
                    ModelKey(m["name"], m["version"]) for m in report.get("models", [])
                ),
                busy=tuple((parse_key(k), int(n)) for k, n in report.get("busy", {}).items()),
                capacity_bytes=int(report.get("capacity_bytes", 10 * 1024**3)),
                max_models=int(report.get("max_models", 5)),
                managed=name in fleet,
                # Reporting, but not yet listening for commands (its consumer starts).
                starting=not report.get("ready", True),
                unhealthy=frozenset(
                    parse_key(text)
                    for text, check in report.get("instances_health", {}).items()
                    if check["state"] == "unhealthy"
                ),
                rss_bytes=int(report.get("resources", {}).get("rss_bytes", 0)),
                model_bytes=tuple(
                    (ModelKey(m["name"], m["version"]), int(m.get("bytes", 0)))
                    for m in report.get("models", [])
                ),
                rows=tuple(
                    (parse_key(text), int(stats.get("rows", 0)))
                    for text, stats in report.get("batching", {}).items()
                ),
                idle_s=tuple(
                    (ModelKey(m["name"], m["version"]), float(m.get("idle_s", 0.0)))
                    for m in report.get("models", [])
                ),
                free_bytes=(
                    int(report["device_free_bytes"]) if "device_free_bytes" in report else None
                ),
            )
        for name, record in fleet.items():
            if name not in workers and not record.seen and not record.stopping:
                serving = {queue_to_key(q) for q in record.queues}
                workers[name] = WorkerInfo(
                    hostname=name,
                    serving=frozenset(k for k in serving if k is not None),
                    managed=True,
                    starting=True,
                )
        return workers

    # -- writes -----------------------------------------------------------------------------
    def record(
        self,
        decisions: list[Decision],
        status: dict[str, Any],
        served: set[ModelKey],
        members: dict[str, list[str]] | None = None,
        default_strategy: str | None = None,
    ) -> None:
        # One transaction: producers never read a half-written set of instances.
        pipe = self.client.pipeline(transaction=True)
        now = status["time"]
        for d in decisions:
            pipe.lpush(keys.SCALER_DECISIONS, json.dumps({
                "time": now, "model": d.model.name, "version": d.model.version,
                "from": d.from_instances, "to": d.to_instances, "reason": d.reason,
            }))  # fmt: skip
        if decisions:
            pipe.ltrim(keys.SCALER_DECISIONS, 0, 999)
        pipe.set(keys.SCALER_STATUS, json.dumps(status), ex=30)
        pipe.delete(keys.SERVED)
        if served:
            pipe.sadd(keys.SERVED, *(keys.model_key_text(*k) for k in served))
        if members is not None:
            pipe.delete(keys.INSTANCES)
            if members:
                pipe.hset(keys.INSTANCES, mapping={k: json.dumps(v) for k, v in members.items()})
        if default_strategy is not None:
            pipe.set(keys.BALANCING_DEFAULT, default_strategy)
        pipe.execute()

    def add_popularity(self, counts: dict[ModelKey, float], decay: float) -> None:
        """Scores decay by ``decay`` per call and grow by the requests seen since."""
        current = self.client.hgetall(keys.POPULARITY)
        scores = {parse_key(k.decode()): float(v) * decay for k, v in current.items()}  # type: ignore[union-attr]
        for key, n in counts.items():
            scores[key] = scores.get(key, 0.0) + n
        pipe = self.client.pipeline()
        pipe.delete(keys.POPULARITY)
        kept: dict[Any, Any] = {
            keys.model_key_text(*k): round(v, 4) for k, v in scores.items() if v >= 0.01
        }
        if kept:
            pipe.hset(keys.POPULARITY, mapping=kept)
        pipe.execute()

    def set_override(self, key: ModelKey, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """Set (or with None, clear) a version's manual command; returns the one replaced.
        The latest command wins: a pin, a load and an unload replace each other."""
        field_name = keys.model_key_text(*key)
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(keys.OVERRIDES, field_name)
        if record is None:
            pipe.hdel(keys.OVERRIDES, field_name)
        else:
            pipe.hset(keys.OVERRIDES, field_name, json.dumps(record))
        pipe.publish(keys.SCALER_POKE, field_name)
        previous = pipe.execute()[0]
        return dict(json.loads(previous)) if previous else None

    def decisions(self, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(keys.SCALER_DECISIONS, 0, limit - 1)]

    def status(self) -> dict[str, Any] | None:
        raw = self.client.get(keys.SCALER_STATUS)
        return json.loads(raw) if raw else None

    def fleet_add(self, record: FleetRecord) -> None:
        self.client.hset(keys.FLEET, record.hostname, record.to_json())

    def fleet_remove(self, hostname: str) -> None:
        self.client.hdel(keys.FLEET, hostname)

"""Every Redis key and queue name the project uses, in one place.

Kombu's own keys (the queue lists and ``unacked``/``unacked_index``) belong to the Redis
transport; they are named here because the worker renews its leases on them and the scaler
reads queue depths from them.
"""

from __future__ import annotations

# A model version's shared queue: every instance of that version consumes it.
QUEUE_PREFIX = "model."
# Kombu's separator between a queue name and its priority step ("q\x06\x163").
PRIORITY_SEPARATOR = "\x06\x16"
# Kombu's priority steps for the Redis transport: one list per step, lowest value served first.
PRIORITY_STEPS = (0, 3, 6, 9)

# Kombu's index of delivered-but-unacknowledged messages (tag -> delivery time); a message
# whose time is older than the visibility timeout is restored to its queue, so live
# workers push their messages' times forward.
UNACKED_INDEX = "unacked_index"

_NS = "inference:"
# Hash: model name -> JSON registry entry (versions, default version, input schemas).
REGISTRY = _NS + "registry"
# Set: every registered version's queue name, so that the scaler's depth scan needs no
# arguments.
REGISTRY_QUEUES = _NS + "registry:queues"
# Set: queues that were ever sent a request with a priority: only their priority sub-queues
# are counted by the scaler (producers add to it once per queue and process).
PRIORITY_QUEUES = _NS + "priority_queues"
# String: when the registry was last published (epoch seconds).
REGISTRY_UPDATED = _NS + "registry:updated"
# String with a TTL: one worker's JSON report; it expires when the worker stops reporting.
WORKER_REPORT = _NS + "worker:{hostname}"
# Sorted set: worker hostname -> time of its last report (reports themselves expire).
WORKERS = _NS + "workers"
# Hash: "name/version" -> JSON record of the last failed load (error, worker, time).
LOAD_FAILURES = _NS + "load_failures"


def queue_name(name: str, version: str) -> str:
    """The shared queue of one model version."""
    return f"{QUEUE_PREFIX}{name}.{version}"


def worker_report_key(hostname: str) -> str:
    return WORKER_REPORT.format(hostname=hostname)


# --- scaler -----------------------------------------------------------------------------
# String (SET NX PX): the id of the scaler that may act; renewed every tick.
SCALER_LEADER = _NS + "scaler:leader"
# String with a TTL: the leader's last tick (desired instances, fleet, timings) as JSON.
SCALER_STATUS = _NS + "scaler:status"
# List, newest first, capped: every scaling decision (time, model, from, to, reason).
SCALER_DECISIONS = _NS + "scaler:decisions"
# Pub/sub channel: producers poke the scaler when they queue for a version nobody serves.
SCALER_POKE = _NS + "scaler:poke"
# Set: "name/version" of every version with at least one instance (read by producers).
SERVED = _NS + "served"
# Hash: "name/version" -> JSON manual override ({"instances": n} | {"load": true} |
# {"unload_at": t}); kept until changed, so a restarted scaler honours it.
OVERRIDES = _NS + "overrides"
# Hash: "name/version" -> decaying request count (popularity).
POPULARITY = _NS + "popularity"
# Hash: worker hostname -> JSON record of a worker process the local backend started.
FLEET = _NS + "fleet"


def model_key_text(name: str, version: str) -> str:
    return f"{name}/{version}"


# --- metrics and alerts ------------------------------------------------------------------
# Hash per second / per minute (epoch // 60): "<scope>|<subject>|<field>" -> number; they
# expire after METRICS_SECOND_RETENTION_S / METRICS_MINUTE_RETENTION_S.
METRICS_SECOND = _NS + "metrics:s:{t}"
METRICS_MINUTE = _NS + "metrics:m:{t}"
# Hash: the same fields summed since the start (Prometheus counters); bounded by the
# registered model versions and the workers.
METRICS_TOTAL = _NS + "metrics:total"
# Hash: alert key -> JSON state of a firing alert.
ALERTS_ACTIVE = _NS + "alerts:active"
# List, newest first, capped: every alert event (fired, repeated, resolved).
ALERTS_HISTORY = _NS + "alerts:history"
# Pub/sub channel: every alert event as JSON (Autoscaler callbacks listen to it).
ALERTS_CHANNEL = _NS + "alerts:events"


def metrics_second_key(t: int) -> str:
    return METRICS_SECOND.format(t=t)


def metrics_minute_key(t: int) -> str:
    return METRICS_MINUTE.format(t=t)


def text(value: bytes | str) -> str:
    """A Redis reply as text (clients here do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


# --- load balancing, health and failover --------------------------------------------------
# One worker's own queue ("instance queue"): strategies other than the shared queue route a
# request to the chosen instance's queue; every worker consumes its own.
INSTANCE_QUEUE_PREFIX = "instance."
# Set: every instance queue a worker announced (the scaler drains those of dead workers).
INSTANCE_QUEUES = _NS + "instance_queues"
# Set with a TTL: the delivery tags a worker holds (the scaler restores a dead worker's).
HELD = _NS + "held:{hostname}"
# Hash: "name/version" -> JSON list of the healthy instances (hostnames) routing may use.
INSTANCES = _NS + "instances"
# Hash: model name -> JSON {"strategy": ..., "weights": {hostname: weight}}.
BALANCING = _NS + "balancing"
# String: the strategy of models without an entry (the scaler's ModelLoaderConfig).
BALANCING_DEFAULT = _NS + "balancing:default"
# Hash per version: "inflight:<hostname>" (requests routed there and not answered) and
# "latency:<hostname>" (recent latency in ms).
ROUTING_STATE = _NS + "lb:{model}"
# Hash: model name -> JSON traffic split {version: weight} set through the API.
TRAFFIC = _NS + "traffic"
# Header of a request routed to an instance queue: the version's shared queue (failover).
SHARED_QUEUE_HEADER = "shared_queue"


def instance_queue(hostname: str) -> str:
    return f"{INSTANCE_QUEUE_PREFIX}{hostname}"


def held_key(hostname: str) -> str:
    return HELD.format(hostname=hostname)


def routing_state_key(name: str, version: str) -> str:
    return ROUTING_STATE.format(model=model_key_text(name, version))

"""Every Redis key and queue name the project uses, in one place.

The layout of the queues themselves (kombu's lists and priority sub-lists, Celery's
result keys) is the broker layer's (``tasks.broker``).
"""

from __future__ import annotations

from typing import Any

# A model version's shared queue: every instance of that version consumes it.
QUEUE_PREFIX = "model."

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


def queue_label(queue: str) -> str | None:
    """The "name/version" a shared or instance queue serves; None for any other queue."""
    if queue.startswith(QUEUE_PREFIX):
        rest = queue[len(QUEUE_PREFIX) :]
    elif queue.startswith(INSTANCE_QUEUE_PREFIX):
        rest = queue[len(INSTANCE_QUEUE_PREFIX) :].partition("@")[0]
    else:
        return None
    name, _, version = rest.partition(".")
    return f"{name}/{version}" if name and version else None


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
# A version whose queue a saturated worker left non-empty pokes the scaler at most once per
# this key's life (one per version, a second each).
SCALER_BACKLOG_PREFIX = _NS + "scaler:backlog:"
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
# Hash per minute, "<version>|<field>" -> number, of the few counters the forecasts read
# (FORECAST_FIELDS): a day of them is read in milliseconds, not by summing every field.
METRICS_FORECAST = _NS + "metrics:f:{t}"
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


def metrics_forecast_key(t: int) -> str:
    return METRICS_FORECAST.format(t=t)


def text(value: bytes | str) -> str:
    """A Redis reply as text (clients here do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def raw_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def as_dict(reply: Any) -> dict[Any, Any]:
    """A hash reply as a dict, whether raw (a flat list) or already parsed."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


# --- delivery (the broker layer's structures beside kombu's queues) -----------------------
# List per queue: at most one token, left by a producer beside its message; workers block
# on these, never on the queues. "<prefix>@<hostname>" wakes one worker (new queues, stop).
WAKE_PREFIX = _NS + "wake:"
# Hash per worker: the messages it took and has not acknowledged (tag -> entry).
HELD_PREFIX = _NS + "held:"
# Sorted set: worker -> deadline of its lease (Redis time); renewed with every report.
LEASES = _NS + "leases"
# Hash: "name/version" -> messages of that version held by any worker.
HELD_COUNTS = _NS + "held_counts"

# Per "name/version": the worker whose load of it ran out of memory last (a short TTL). The
# first such failure hands the requests to another worker; a second one fails them.
LOAD_OOM_PREFIX = _NS + "load_oom:"
LOAD_OOM_TTL_S = 60

# Pub/sub channel per producer process: the results of every request it published.
REPLY_PREFIX = _NS + "reply:"

# --- load balancing, health and failover --------------------------------------------------
# An instance queue: strategies other than the shared queue route a request to the chosen
# instance's queue for that version ("instance.<name>.<version>@<hostname>").
INSTANCE_QUEUE_PREFIX = "instance."
# Set: every instance queue a worker consumes (the scaler drains those of dead workers).
INSTANCE_QUEUES = _NS + "instance_queues"
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


def instance_queue(name: str, version: str, hostname: str) -> str:
    return f"{INSTANCE_QUEUE_PREFIX}{name}.{version}@{hostname}"


def own_wake(hostname: str) -> str:
    return f"{WAKE_PREFIX}@{hostname}"


def routing_state_key(name: str, version: str) -> str:
    return ROUTING_STATE.format(model=model_key_text(name, version))


# Per model version ("name/version"): the most memory a load of it was measured to take.
MODEL_BYTES = _NS + "model_bytes"

# Node agents (``celery -A workers node``), one per host: a sorted set of names by their
# last report, each report (capacity, workers) with a TTL, and a command list per node.
NODES = _NS + "nodes"
NODE_REPORT = _NS + "node:{name}"
NODE_COMMANDS = _NS + "node:{name}:commands"


def node_report_key(name: str) -> str:
    return NODE_REPORT.format(name=name)


def node_commands_key(name: str) -> str:
    return NODE_COMMANDS.format(name=name)

"""Sending requests back to their version's shared queue (failover).

A request routed to one instance's queue carries its version's shared queue in a header.
When that instance's worker dies, the scaler moves what waits in the worker's queue and
what the worker held unacknowledged to the head of the shared queues, at once instead of
after the visibility timeout; when an instance turns unhealthy, its worker forwards such
requests itself. Every move is a check-and-move script: a message is moved once or not at
all, also if kombu's own restore of an expired lease runs at the same moment.
"""

from __future__ import annotations

import json
import logging
from bisect import bisect
from typing import Any

import redis

from common import keys

logger = logging.getLogger(__name__)

# Move the newest message of KEYS[1] to the head of KEYS[2] if it is still ARGV[1].
_MOVE_NEWEST = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Restore one unacknowledged message (kombu's unacked hash entry ARGV[2] for tag ARGV[1])
# as ARGV[3] to the head of KEYS[3], if nobody restored it meanwhile.
_RESTORE_UNACKED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('RPUSH', KEYS[3], ARGV[3])
  return 1
end
return 0
"""

UNACKED = "unacked"


def destination(envelope: dict[str, Any], fallback: str | None = None) -> str | None:
    """The shared queue (with its priority sub-queue) a message belongs on."""
    shared = envelope.get("headers", {}).get(keys.SHARED_QUEUE_HEADER) or fallback
    if not shared:
        return None
    priority = int(envelope.get("properties", {}).get("priority") or 0)
    step = keys.PRIORITY_STEPS[bisect(keys.PRIORITY_STEPS, max(0, min(priority, 9))) - 1]
    return shared if step == 0 else f"{shared}{keys.PRIORITY_SEPARATOR}{step}"


def _sub_queues(queue: str) -> list[str]:
    return [queue] + [f"{queue}{keys.PRIORITY_SEPARATOR}{s}" for s in keys.PRIORITY_STEPS if s]


def drain_instance_queue(client: redis.Redis, hostname: str) -> int:
    """Move every request waiting in a worker's own queue to its shared queue."""
    move = client.register_script(_MOVE_NEWEST)
    moved = 0
    for source in _sub_queues(keys.instance_queue(hostname)):
        stuck = 0
        while (raw := client.lindex(source, 0)) is not None:
            target = destination(json.loads(raw))
            if target is None:
                # Not routed by this project: nowhere to send it; leave it for its sender.
                stuck += 1
                logger.warning("a message in %s names no shared queue; left there", source)
                if stuck > 3:
                    break
                client.lpop(source)
                client.rpush(source, raw)
                continue
            moved += int(move(keys=[source, target], args=[raw]))
    return moved


def restore_held(client: redis.Redis, hostname: str) -> int:
    """Move the messages a dead worker held unacknowledged to their shared queues."""
    restore = client.register_script(_RESTORE_UNACKED)
    # The tags its last report listed, and every message delivered from its own queue
    # (only it consumes that queue), also those it took after its last report.
    own = keys.instance_queue(hostname)
    found: dict[str, bytes | str] = {}
    for tag, raw in client.hscan_iter(UNACKED):
        if json.loads(raw)[2] == own:
            found[keys.text(tag)] = raw
    for tag in client.smembers(keys.held_key(hostname)):
        if keys.text(tag) not in found and (raw := client.hget(UNACKED, tag)) is not None:
            found[keys.text(tag)] = raw  # else acknowledged, or restored by kombu already
    moved = 0
    for tag, raw in found.items():
        envelope, _exchange, routing_key = json.loads(raw)
        target = destination(envelope, fallback=routing_key)
        if target is None:
            continue
        moved += int(
            restore(
                keys=[UNACKED, keys.UNACKED_INDEX, target],
                args=[tag, raw, json.dumps(envelope)],
            )
        )
    client.delete(keys.held_key(hostname))
    return moved


def failover(client: redis.Redis, hostname: str) -> int:
    """Everything a gone worker was given goes back to the shared queues; returns how many."""
    moved = restore_held(client, hostname) + drain_instance_queue(client, hostname)
    pipe = client.pipeline(transaction=False)
    pipe.srem(keys.INSTANCE_QUEUES, keys.instance_queue(hostname))
    pipe.execute()
    return moved

"""Load-balancing strategies, in the producer: which instance's queue gets a request.

``SHARED_QUEUE`` (the default) sends every request to the version's shared queue, from
which idle instances pull: least loaded by construction, nothing to decide here. The other
strategies pick one healthy instance (a worker serving the version, published by the
scaler every tick) and send the request to that worker's own queue:

- ``ROUND_ROBIN``: the instances in turn (per producer process);
- ``WEIGHTED_ROUND_ROBIN``: smooth weighted round robin over settable instance weights;
- ``LEAST_CONNECTIONS``: fewest requests in flight (routed there and not yet answered);
- ``LEAST_RESPONSE_TIME``: lowest expected wait: recent latency times (in flight + 1);
- ``CONSISTENT_HASH``: a hash ring (64 points per instance) of the caller's ``key`` or of
  the input bytes, so that a key stays on its instance and adding one moves about 1/n.

Membership, strategy and weights are cached for ``ttl_s``; the two "least" strategies read
the version's in-flight and latency counters in one round trip per request. A version with
no healthy instance (at zero, starting) goes to its shared queue, where a cold start begins.
Like the router, the balancer does no I/O itself: it yields the reads it needs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from bisect import bisect
from dataclasses import dataclass, field
from typing import Any

from common import keys
from scaler.config import LoadBalancingStrategy
from tasks.routing import Reads

RING_POINTS = 64


@dataclass
class VersionRouting:
    strategy: LoadBalancingStrategy
    members: list[str]
    weights: dict[str, float]
    fetched: float
    ring: list[tuple[int, str]] = field(default_factory=list)
    # smooth weighted round robin: current weight per member
    current: dict[str, float] = field(default_factory=dict)
    turn: int = 0


@dataclass(frozen=True)
class Route:
    queue: str  # where the request goes
    shared_queue: str  # the version's shared queue
    instance: str | None = None  # the chosen worker, None for the shared queue

    def in_flight_command(self, name: str, version: str) -> tuple[Any, ...] | None:
        """Counted in flight on its instance (the "least" strategies read it)."""
        if self.instance is None:
            return None
        return ("HINCRBY", keys.routing_state_key(name, version), f"inflight:{self.instance}", 1)


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def build_ring(members: list[str]) -> list[tuple[int, str]]:
    return sorted(
        (_hash(f"{member}#{i}".encode()), member) for member in members for i in range(RING_POINTS)
    )


def ring_lookup(ring: list[tuple[int, str]], key: bytes) -> str:
    index = bisect(ring, (_hash(key), "")) % len(ring)
    return ring[index][1]


def input_key(inputs: Any) -> bytes:
    """The bytes a request's input hashes by (arrays by their raw bytes)."""
    tobytes = getattr(inputs, "tobytes", None)
    if tobytes is None and hasattr(inputs, "numpy"):
        tobytes = inputs.detach().cpu().numpy().tobytes
    if tobytes is not None:
        return bytes(tobytes())
    return json.dumps(inputs, sort_keys=True, default=str).encode()


class Balancer:
    def __init__(self, *, ttl_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._versions: dict[str, VersionRouting] = {}

    def forget(self) -> None:
        with self._lock:
            self._versions.clear()

    def routing(self, name: str, version: str) -> Reads[VersionRouting]:
        text = keys.model_key_text(name, version)
        now = time.monotonic()
        with self._lock:
            cached = self._versions.get(text)
        if cached is not None and now - cached.fetched < self.ttl_s:
            return cached
        members_raw, balancing_raw, default_raw = yield [
            ("HGET", keys.INSTANCES, text),
            ("HGET", keys.BALANCING, name),
            ("GET", keys.BALANCING_DEFAULT),
        ]
        balancing = json.loads(balancing_raw) if balancing_raw else {}
        strategy_name = balancing.get("strategy") or keys.text(default_raw or b"shared_queue")
        try:
            strategy = LoadBalancingStrategy(strategy_name)
        except ValueError:
            strategy = LoadBalancingStrategy.SHARED_QUEUE
        members = sorted(json.loads(members_raw)) if members_raw else []
        weights = {m: float(balancing.get("weights", {}).get(m, 1.0)) for m in members}
        routing = VersionRouting(strategy, members, weights, now)
        if cached is not None and cached.members == members:
            routing.current, routing.turn, routing.ring = cached.current, cached.turn, cached.ring
        if strategy is LoadBalancingStrategy.CONSISTENT_HASH and not routing.ring and members:
            routing.ring = build_ring(members)
        with self._lock:
            self._versions[text] = routing
        return routing

    def route(self, name: str, version: str, inputs: Any, key: str | None = None) -> Reads[Route]:
        shared = keys.queue_name(name, version)
        routing = yield from self.routing(name, version)
        if routing.strategy is LoadBalancingStrategy.SHARED_QUEUE or not routing.members:
            return Route(shared, shared)
        instance = yield from self.choose(routing, name, version, inputs, key)
        return Route(keys.instance_queue(name, version, instance), shared, instance)

    def choose(
        self, routing: VersionRouting, name: str, version: str, inputs: Any, key: str | None
    ) -> Reads[str]:
        members = routing.members
        strategy = routing.strategy
        if strategy is LoadBalancingStrategy.ROUND_ROBIN:
            with self._lock:
                routing.turn += 1
                return members[routing.turn % len(members)]
        if strategy is LoadBalancingStrategy.WEIGHTED_ROUND_ROBIN:
            with self._lock:
                total = 0.0
                for member in members:
                    weight = routing.weights.get(member, 1.0)
                    routing.current[member] = routing.current.get(member, 0.0) + weight
                    total += weight
                chosen = max(members, key=lambda m: (routing.current[m], m))
                routing.current[chosen] -= total
                return chosen
        if strategy is LoadBalancingStrategy.CONSISTENT_HASH:
            return ring_lookup(routing.ring, key.encode() if key else input_key(inputs))
        (raw,) = yield [("HGETALL", keys.routing_state_key(name, version))]
        state = {keys.text(k): float(v) for k, v in keys.as_dict(raw).items()}
        with self._lock:
            routing.turn += 1
            turn = routing.turn

        def in_flight(m: str) -> float:
            return state.get(f"inflight:{m}", 0.0)

        def rotation(m: str) -> int:
            return (members.index(m) - turn) % len(members)  # ties go round

        if strategy is LoadBalancingStrategy.LEAST_CONNECTIONS:
            return min(members, key=lambda m: (in_flight(m), rotation(m)))
        # LEAST_RESPONSE_TIME: the expected wait, recent latency times (in flight + 1); an
        # instance with no latency yet counts as the average one.
        known = [state[f"latency:{m}"] for m in members if f"latency:{m}" in state]
        average = sum(known) / len(known) if known else 1.0

        def expected_ms(m: str) -> float:
            return state.get(f"latency:{m}", average) * (in_flight(m) + 1)

        return min(members, key=lambda m: (expected_ms(m), rotation(m)))

"""Publishing the model repository to the registry hash in Redis (read by producers)."""

from __future__ import annotations

import json
import time
from typing import Any

from common import keys


def publish_registry(client: Any, registry: dict[str, dict[str, Any]]) -> None:
    """Replace the registry hash with ``registry`` in one transaction."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.REGISTRY, keys.REGISTRY_QUEUES)
    if registry:
        pipe.hset(keys.REGISTRY, mapping={n: json.dumps(e) for n, e in registry.items()})
        queues = [keys.queue_name(n, v) for n, e in registry.items() for v in e["versions"]]
        pipe.sadd(keys.REGISTRY_QUEUES, *queues)
    pipe.set(keys.REGISTRY_UPDATED, time.time())
    pipe.execute()

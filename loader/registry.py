"""Publishing the model repository to the registry hash in Redis (read by producers)."""

from __future__ import annotations

import json
import time
from typing import Any

from common import keys
from loader.repository import ModelRepository


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


class RegistryPublisher:
    """Keeps the registry in Redis in step with a repository on disk: the repository is
    read at most every ``refresh_s``, and published when it changed or Redis lost it (a
    restart without persistence)."""

    def __init__(self, repository: ModelRepository, *, refresh_s: float = 5.0) -> None:
        self.repository = repository
        self.refresh_s = refresh_s
        self._read_at = -1e18
        self._published: dict[str, Any] | None = None

    def due(self) -> bool:
        return time.monotonic() - self._read_at >= self.refresh_s

    def publish_if_changed(self, client: Any, *, exists: bool) -> None:
        self._read_at = time.monotonic()
        registry = self.repository.registry()
        if registry != self._published or not exists:
            publish_registry(client, registry)
            self._published = registry

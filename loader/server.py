"""The model server of one worker process: repository, cache and batcher together."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from common.contracts import ModelKey
from common.settings import ServingSettings, WorkerSettings
from loader.batching import Batcher, Item, Outcome
from loader.cache import ModelCache, resolve_device
from loader.factories import import_factory_modules
from loader.repository import ModelRepository
from loader.spec import check_name, check_version

logger = logging.getLogger(__name__)

RESOLVE_TTL_S = 2.0


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(*, mmap_above: int = 64 * 1024**2, trim_above: int = 256 * 1024**2) -> bool:
    """Serve a forward pass's tensors from memory the process keeps: glibc otherwise maps
    and unmaps each large one, and the page faults of touching new pages cost a fifth of a
    CNN's forward pass here. Tensors above ``mmap_above`` (model weights) still get their
    own mapping, so an unloaded model's memory goes back to the system."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, mmap_above)
            and libc.mallopt(M_TRIM_THRESHOLD, trim_above)
        )
    except (OSError, AttributeError):  # not glibc: its allocator's own policy stays
        return False


class ModelServer:
    def __init__(
        self,
        serving: ServingSettings,
        worker: WorkerSettings,
        *,
        complete: Callable[[list[Outcome]], None] = lambda outcomes: None,
        admit: Callable[[list[Item]], tuple[list[Item], list[Outcome]]] = lambda items: (items, []),
    ) -> None:
        import_factory_modules(serving.model_factory_modules)
        self.device = resolve_device(worker.device)
        if self.device.type == "cpu" and worker.torch_threads:
            torch.set_num_threads(worker.torch_threads)
        self.repository = ModelRepository(serving.model_repository)
        self.cache = ModelCache(
            self.repository,
            device=self.device,
            max_loaded_models=worker.max_loaded_models,
            cache_size_bytes=worker.cache_size_bytes,
            load_timeout_s=worker.load_timeout_seconds,
            warmup_timeout_s=worker.warmup_timeout_seconds,
            concurrent_loads=worker.concurrent_loads,
            failure_cooldown_s=worker.failure_cooldown_seconds,
            on_change=self._wake,
            threads=worker.torch_threads if self.device.type == "cpu" else 0,
        )
        self._resolved: dict[tuple[Any, Any], tuple[float, ModelKey]] = {}
        self.batcher = Batcher(
            self.cache,
            default_max_batch_size=worker.max_batch_size,
            default_max_batch_delay_ms=worker.max_batch_delay_ms,
            complete=complete,
            admit=admit,
        )

    def _wake(self) -> None:
        self.batcher.wake()

    def start(self, *, threads: bool = True) -> None:
        """``threads``: batches run on the batcher's own threads; otherwise the caller's
        serving loop drives the batcher."""
        if threads:
            self.batcher.start()
        logger.info("model server on %s, repository %s", self.device, self.repository.root)

    def stop(self) -> None:
        self.batcher.stop()
        self.cache.close()

    def resolve(self, model: Any, version: Any) -> ModelKey:
        """The model version a request runs on; raises for unknown or malformed names.

        Answers are kept for ``RESOLVE_TTL_S``: a version added to or removed from the disk
        is seen within that time, and a request costs no file-system calls.
        """
        now = time.monotonic()
        cached = self._resolved.get((model, version))
        if cached is not None and now < cached[0]:
            return cached[1]
        key = self._resolve(model, version)
        if len(self._resolved) > 10_000:
            self._resolved.clear()
        self._resolved[(model, version)] = (now + RESOLVE_TTL_S, key)
        return key

    def _resolve(self, model: Any, version: Any) -> ModelKey:
        name = check_name(model)
        if version is None:
            version = self.repository.default_version(name)
        check_version(version)
        self.repository.version_dir(name, version)
        return ModelKey(name, version)

    def submit(
        self,
        key: ModelKey,
        inputs: Any,
        *,
        single: bool,
        ticket: Any,
        queued_s: float = 0.0,
        expires_at: float | None = None,
        cold_start: bool = False,
        priority: int = 0,
    ) -> None:
        item = Item(
            key, inputs, single, ticket, queued_s=queued_s, expires_at=expires_at,
            cold_start=cold_start, priority=priority,
        )  # fmt: skip
        self.batcher.submit(item)

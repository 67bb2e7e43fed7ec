"""The worker's in-memory model cache.

Bounded by ``max_loaded_models`` and ``cache_size_bytes`` (parameter and buffer bytes),
evicting the least recently used model that is not running. Loads run on a small thread
pool (``concurrent_loads``) so that one model's cold start never stalls the others; a load
that outlives ``load_timeout_s`` is declared failed. A failed load is remembered: callers
get its error at once until ``failure_cooldown_s`` has passed or the model file changes.
"""

from __future__ import annotations

import enum
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from common.contracts import ModelKey
from common.errors import (
    CacheCapacityError,
    InferenceError,
    InsufficientMemoryError,
    ModelLoadError,
    ModelLoadTimeoutError,
)
from loader.formats import load_module, module_bytes
from loader.repository import ModelRepository
from loader.spec import ModelSpec

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(eq=False)
class CachedModel:
    key: ModelKey
    state: ModelState
    started: float
    spec: ModelSpec | None = None
    module: nn.Module | None = None
    bytes: int = 0
    # What the load really took on its device: the CUDA allocator's delta, or on the CPU
    # the process's RSS delta (concurrent loads share it out roughly).
    measured_bytes: int = 0
    load_time_s: float = 0.0
    last_used: float = 0.0
    busy: int = 0
    error: InferenceError | None = None
    file_mtime_ns: int = 0
    unload_when_idle: bool = False
    # Phase deadline: loading, then warming up.
    deadline: float = 0.0
    phase: str = "load"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelCache:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        device: torch.device,
        max_loaded_models: int,
        cache_size_bytes: int,
        load_timeout_s: float,
        warmup_timeout_s: float,
        concurrent_loads: int,
        failure_cooldown_s: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        threads: int = 0,
    ) -> None:
        self.repository = repository
        self.threads = threads
        self.device = device
        self.max_loaded_models = max_loaded_models
        self.cache_size_bytes = cache_size_bytes
        self.load_timeout_s = load_timeout_s
        self.warmup_timeout_s = warmup_timeout_s
        self.failure_cooldown_s = failure_cooldown_s
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[ModelKey, CachedModel] = OrderedDict()
        self._pool = ThreadPoolExecutor(
            concurrent_loads, thread_name_prefix="model-load", initializer=self.pin_threads
        )
        # Called with (key, seconds) after a load, (key, None) after a failed one.
        self.on_loaded: Callable[[ModelKey, float | None], None] | None = None
        self.on_load_failed: Callable[[ModelKey, InferenceError], None] | None = None
        self.loads = 0
        self.load_failures = 0
        self.evictions = 0

    def pin_threads(self) -> None:
        """Called by every thread that runs models: OpenMP keeps its thread count per
        thread, so a new thread would fan small ops out over every core and spin there."""
        if self.threads:
            torch.set_num_threads(self.threads)

    # -- lookups ----------------------------------------------------------------------------
    def status(self, key: ModelKey) -> CachedModel:
        """The entry for ``key``, starting a load if there is none (or a failure expired)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.state is ModelState.LOADING and now > entry.deadline:
                what = "load" if entry.phase == "load" else "warm-up"
                limit = self.load_timeout_s if entry.phase == "load" else self.warmup_timeout_s
                self._fail(
                    entry, ModelLoadTimeoutError(f"model {key} {what} took longer than {limit:g} s")
                )
            if (
                entry is not None
                and entry.state is ModelState.FAILED
                and self._retry_due(entry, now)
            ):
                del self._entries[key]
                entry = None
            if entry is None:
                entry = self._start_load(key, now)
            return entry

    def _retry_due(self, entry: CachedModel, now: float) -> bool:
        if now - entry.started >= self.failure_cooldown_s:
            return True
        return self._file_mtime(entry.key) != entry.file_mtime_ns

    def _file_mtime(self, key: ModelKey) -> int:
        try:
            spec = self.repository.spec(*key)
            return self.repository.model_file(*key, spec).stat().st_mtime_ns
        except (InferenceError, OSError):
            return 0

    def acquire(self, key: ModelKey, *, touch: bool = True) -> CachedModel:
        """Mark a ready model busy (not evictable) while a batch runs on it; a health probe
        (``touch=False``) does not count as a use."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state is not ModelState.READY:
                raise ModelLoadError(f"model {key} is not loaded")
            entry.busy += 1
            if touch:
                entry.last_used = self._clock()
                self._entries.move_to_end(key)
            return entry

    def ready_keys(self) -> list[ModelKey]:
        with self._lock:
            return [k for k, e in self._entries.items() if e.state is ModelState.READY]

    def release(self, entry: CachedModel) -> None:
        with self._lock:
            entry.busy -= 1
            if entry.busy == 0 and entry.unload_when_idle:
                self._drop(entry)

    # -- loading ----------------------------------------------------------------------------
    def preload(self, key: ModelKey) -> ModelState:
        return self.status(key).state

    def _start_load(self, key: ModelKey, now: float) -> CachedModel:
        entry = CachedModel(
            key=key,
            state=ModelState.LOADING,
            started=now,
            deadline=now + self.load_timeout_s,
            file_mtime_ns=self._file_mtime(key),
        )
        self._entries[key] = entry
        logger.info("loading model %s on %s", key, self.device)
        self._pool.submit(self._load, entry)
        return entry

    def _load(self, entry: CachedModel) -> None:
        key = entry.key
        module: nn.Module | None = None
        try:
            spec = self.repository.spec(*key)
            started = time.perf_counter()
            before = memory_in_use(self.device)
            module = load_module(spec, self.repository.model_file(*key, spec), self.device)
            size = module_bytes(module)
            self._reserve(entry, size)
            if spec.warmup:
                with self._lock:
                    entry.phase = "warmup"
                    entry.deadline = self._clock() + self.warmup_timeout_s
                warm = torch.zeros(
                    (1, *spec.input.shape), dtype=_torch_dtype(spec), device=self.device
                )
                with torch.inference_mode():
                    module(warm)
            measured = max(memory_in_use(self.device) - before, 0)
            load_time = time.perf_counter() - started
        except Exception as exc:
            if isinstance(exc, InferenceError):
                error: InferenceError = exc
            elif isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                error = InsufficientMemoryError(
                    f"cannot load model {key}: out of memory on {self.device}: {exc}"
                )
            else:
                error = ModelLoadError(f"cannot load model {key}: {exc}")
            module = None  # a module built before a warm-up failure: its memory goes now
            if self.on_load_failed is not None:
                try:  # before the failure shows: what waits for the model is still here
                    self.on_load_failed(key, error)
                except Exception:
                    logger.exception("load failure hook failed for %s", key)
            with self._lock:
                if self._entries.get(key) is entry and entry.state is ModelState.LOADING:
                    self._fail(entry, error)
            logger.warning("model %s failed to load: %s", key, error)
            self._notify_loaded(key, None)
            self._on_change()
            return
        with self._lock:
            if self._entries.get(key) is not entry or entry.state is not ModelState.LOADING:
                # Timed out or unloaded meanwhile: this late module is not wanted.
                module = None
            else:
                entry.state = ModelState.READY
                entry.spec = spec
                entry.module = module
                entry.bytes = size
                entry.measured_bytes = measured
                entry.load_time_s = load_time
                entry.last_used = self._clock()
                self.loads += 1
        if module is None:
            _free_memory(self.device)
        else:
            logger.info("model %s ready in %.3f s (%d bytes)", key, load_time, size)
            self._notify_loaded(key, load_time)
        self._on_change()

    def _notify_loaded(self, key: ModelKey, load_s: float | None) -> None:
        if self.on_loaded is not None:
            try:
                self.on_loaded(key, load_s)
            except Exception:
                logger.exception("load hook failed for %s", key)

    def _reserve(self, entry: CachedModel, size: int) -> None:
        """Evict least recently used idle models until ``size`` more bytes fit."""
        if size > self.cache_size_bytes:
            raise CacheCapacityError(
                f"model {entry.key} needs {size} bytes; the cache holds {self.cache_size_bytes} "
                "(WORKER_CACHE_SIZE_GB)"
            )
        evicted = False
        with self._lock:
            while True:
                ready = [e for e in self._entries.values() if e.state is ModelState.READY]
                too_many = len(ready) + 1 > self.max_loaded_models
                too_big = sum(e.bytes for e in ready) + size > self.cache_size_bytes
                if not (too_many or too_big):
                    break
                victims = [e for e in ready if e.busy == 0]
                if not victims:
                    break  # Everything is running; allow a brief overshoot rather than wait.
                victim = victims[0]  # OrderedDict order is least recently used first.
                logger.info("evicting model %s to make room for %s", victim.key, entry.key)
                self._drop(victim)
                self.evictions += 1
                evicted = True
        if evicted:
            _free_memory(self.device)

    def _fail(self, entry: CachedModel, error: InferenceError) -> None:
        entry.state = ModelState.FAILED
        entry.error = error
        entry.module = None
        self.load_failures += 1

    # -- unloading --------------------------------------------------------------------------
    def unload(self, key: ModelKey) -> bool:
        """Drop a model now, or as soon as its running batch ends. False if not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.busy:
                entry.unload_when_idle = True
                return True
            self._drop(entry)
        _free_memory(self.device)
        return True

    def _drop(self, entry: CachedModel) -> None:
        self._entries.pop(entry.key, None)
        entry.module = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._entries.clear()

    # -- reporting --------------------------------------------------------------------------
    def describe(self) -> dict[str, list[dict[str, Any]]]:
        now = self._clock()
        loaded, loading, failed = [], [], []
        with self._lock:
            for entry in self._entries.values():
                row: dict[str, Any] = {"name": entry.key.name, "version": entry.key.version}
                if entry.state is ModelState.READY:
                    row.update(
                        bytes=entry.bytes,
                        measured_bytes=entry.measured_bytes,
                        load_time_s=round(entry.load_time_s, 4),
                        idle_s=round(now - entry.last_used, 3),
                        busy=entry.busy,
                    )
                    loaded.append(row)
                elif entry.state is ModelState.LOADING:
                    row.update(since_s=round(now - entry.started, 3), phase=entry.phase)
                    loading.append(row)
                else:
                    row.update(error=str(entry.error), error_type=type(entry.error).__name__)
                    failed.append(row)
        return {"loaded": loaded, "loading": loading, "failed": failed}

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values() if e.state is ModelState.READY)


def _torch_dtype(spec: ModelSpec) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=spec.input.np_dtype)).dtype


def memory_in_use(device: torch.device) -> int:
    """Bytes this process holds on ``device``: the CUDA allocator's, or its RSS."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

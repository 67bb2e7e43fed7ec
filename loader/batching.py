"""Dynamic batching: requests waiting on one model version run as one forward pass.

The batcher takes, for the model version whose oldest request has waited longest, up to
``max_batch_size`` rows. While a batch runs, new requests pile up and form the next one,
so batches grow with load and a lone request never waits for company unless the model asks
for it with ``max_batch_delay_ms``. A batch that raises is run again one request at a time,
so only the bad request fails.

Two ways to drive it: ``start()`` runs batches on a thread of its own and hands finished
ones to a completion thread (the in-process path); a worker's serving loop calls
``next_batch``/``run_batch``/``record`` itself, so that fetching, running and answering
share one thread and one round trip (``tasks.fetcher``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.contracts import ModelKey
from common.errors import InferenceError, ModelExecutionError, SchemaError
from loader.cache import CachedModel, ModelCache, ModelState
from loader.spec import NOT_FINITE, InputSchema

logger = logging.getLogger(__name__)


class OutputKind:
    LIST = "list"
    NDARRAY = "ndarray"
    TENSOR = "tensor"


def numeric_array(inputs: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """Nested lists of numbers as an array of ``dtype``; anything else (text, even "1.5",
    None, objects) raises ValueError instead of being converted."""
    array = np.asarray(inputs)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{array.dtype} is not numeric")
    with np.errstate(over="ignore"):  # too large for the dtype: inf, refused as not finite
        return array.astype(dtype, copy=False)


def as_rows(inputs: Any, schema: InputSchema, *, single: bool) -> tuple[np.ndarray, str]:
    """Validate one request's inputs against the schema: ``(rows, output kind)``.

    ``single`` inputs are one row of the schema's shape; otherwise a batch of rows.
    Arrays must have the schema's dtype exactly; lists are converted to it.
    """
    kind = OutputKind.LIST
    if isinstance(inputs, torch.Tensor):
        kind = OutputKind.TENSOR
        inputs = inputs.detach().cpu().numpy()
    if isinstance(inputs, np.ndarray):
        if kind == OutputKind.LIST:
            kind = OutputKind.NDARRAY
        if inputs.dtype != schema.np_dtype:
            raise SchemaError(
                f"input dtype {inputs.dtype} does not match the model's input {schema.describe()}"
            )
        array = inputs
    else:
        try:
            array = numeric_array(inputs, schema.np_dtype)
        except (TypeError, ValueError, OverflowError):
            raise SchemaError(
                f"input is not a numeric array of {schema.describe()}"
                f"{' rows' if not single else ''}: {_preview(inputs)}"
            ) from None
    expected = schema.shape if single else None
    if single and tuple(array.shape) != expected:
        raise SchemaError(
            f"input shape {list(array.shape)} does not match the model's input {schema.describe()}"
        )
    if not single and (
        array.ndim != len(schema.shape) + 1
        or tuple(array.shape[1:]) != schema.shape
        or array.shape[0] == 0
    ):
        raise SchemaError(
            f"batch shape {list(array.shape)} is not [n>=1, {', '.join(map(str, schema.shape))}] "
            f"for the model's input {schema.describe()}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise SchemaError(NOT_FINITE)
    return (array[None] if single else array), kind


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert(rows: np.ndarray, kind: str, single: bool) -> Any:
    value = rows[0] if single else rows
    if kind == OutputKind.LIST:
        return value.tolist()
    if kind == OutputKind.TENSOR:
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


@dataclass(eq=False)
class Item:
    """One request: a single input (``predict``) or a list of them (``predict_batch``)."""

    key: ModelKey
    inputs: Any
    single: bool
    ticket: Any  # the transport's handle (a Celery request); opaque here
    received: float = field(default_factory=time.monotonic)
    rows: np.ndarray | None = None
    kind: str = OutputKind.LIST
    # The model was not loaded when the request arrived (a cache miss, a cold start).
    cold: bool = False
    # Seconds the request waited in the broker before this worker received it.
    queued_s: float = 0.0
    # When the caller stops waiting (epoch seconds): not run after it.
    expires_at: float | None = None
    # Published while no instance served its version (the producer's mark).
    cold_start: bool = False
    # Celery's priority on Redis: 0 (the default) first, 9 last, here as in the queues.
    priority: int = 0

    @property
    def n_rows(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        if self.single or not hasattr(self.inputs, "__len__"):
            return 1
        return max(1, len(self.inputs))


@dataclass(eq=False)
class Outcome:
    item: Item
    value: Any = None
    error: BaseException | None = None
    batch_size: int = 0
    started: float = 0.0
    finished: float = 0.0


@dataclass
class BatcherStats:
    served: int = 0
    failed: int = 0
    batches: int = 0
    rows: int = 0
    max_batch_rows: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    # "name/version" -> {"batches", "rows", "max_batch_rows"}
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)

    def record_batch(self, key: ModelKey, rows: int) -> None:
        self.batches += 1
        self.rows += rows
        self.max_batch_rows = max(self.max_batch_rows, rows)
        model = self.per_model.setdefault(str(key), {"batches": 0, "rows": 0, "max_batch_rows": 0})
        model["batches"] += 1
        model["rows"] += rows
        model["max_batch_rows"] = max(model["max_batch_rows"], rows)

    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    # "name/version" -> recent latency (exponentially weighted, ms): least response time.
    latency_ewma_ms: dict[str, float] = field(default_factory=dict)

    def record_latency(self, key: ModelKey, seconds: float) -> None:
        self.latencies_s.append(seconds)
        text, ms = str(key), seconds * 1000
        before = self.latency_ewma_ms.get(text)
        self.latency_ewma_ms[text] = ms if before is None else 0.8 * before + 0.2 * ms

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        return round(float(np.quantile(np.fromiter(self.latencies_s, float), q)) * 1000, 3)


class Batcher:
    def __init__(
        self,
        cache: ModelCache,
        *,
        default_max_batch_size: int,
        default_max_batch_delay_ms: float,
        complete: Callable[[list[Outcome]], None],
        admit: Callable[[list[Item]], tuple[list[Item], list[Outcome]]] = lambda items: (items, []),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.default_max_batch_size = default_max_batch_size
        self.default_max_batch_delay_ms = default_max_batch_delay_ms
        self._complete = complete
        self._admit = admit
        self._clock = clock
        self._cond = threading.Condition()
        self._queues: dict[ModelKey, deque[Item]] = {}
        self._running_key: ModelKey | None = None
        self._running_items = 0
        self._stopping = False
        self._done: queue.SimpleQueue[list[Outcome] | None] = queue.SimpleQueue()
        # Called when a waiting request may have become runnable (a serving loop blocked on
        # Redis has to be woken there).
        self.on_wake: Callable[[], None] = lambda: None
        self.stats = BatcherStats()
        # Called with every completed batch of outcomes, after completion (metrics).
        self.observers: list[Callable[[list[Outcome]], None]] = []
        self._threads = [
            threading.Thread(target=self._run, name="batch-runner", daemon=True),
            threading.Thread(target=self._finish, name="batch-complete", daemon=True),
        ]

    # -- producer side ----------------------------------------------------------------------
    def start(self) -> None:
        """Run batches on threads of their own (without it, a serving loop drives them)."""
        for thread in self._threads:
            thread.start()

    def submit(self, item: Item) -> None:
        # Looking the model up here starts its load as soon as the first request arrives.
        item.cold = self.cache.status(item.key).state is not ModelState.READY
        with self._cond:
            waiting = self._queues.setdefault(item.key, deque())
            if waiting and item.priority < waiting[-1].priority:
                # Held behind less urgent ones (fetched earlier): it goes before them.
                at = next(i for i, w in enumerate(waiting) if w.priority > item.priority)
                waiting.insert(at, item)
            else:
                waiting.append(item)
            self._cond.notify()

    def finish_now(self, outcomes: list[Outcome]) -> None:
        """Complete requests that failed before reaching a model (bad names, bad calls)."""
        self._done.put(outcomes)
        self.on_wake()

    def wake(self) -> None:
        """Re-evaluate waiting models (a load finished or failed)."""
        with self._cond:
            self._cond.notify()
        self.on_wake()

    def take(self, key: ModelKey) -> list[Item]:
        """Remove and return the requests waiting on one model version (not the running)."""
        with self._cond:
            return list(self._queues.pop(key, ()))

    def busy(self) -> dict[ModelKey, int]:
        """Requests held per model version: waiting for a batch or running."""
        with self._cond:
            held = {key: len(items) for key, items in self._queues.items() if items}
            if self._running_key is not None:
                held[self._running_key] = held.get(self._running_key, 0) + self._running_items
            return held

    def drain(self, *, timeout_s: float = 60.0) -> list[Item]:
        """Stop taking new batches: return the waiting requests, finish the running ones."""
        with self._cond:
            waiting = [item for items in self._queues.values() for item in items]
            self._queues.clear()
            self._stopping = True
            self._cond.notify()
        self.stop(timeout_s=timeout_s)
        return waiting

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Finish what was submitted, then stop both threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if not self._threads[0].is_alive():
            return
        deadline = time.monotonic() + timeout_s
        self._threads[0].join(max(0.0, deadline - time.monotonic()))
        self._done.put(None)
        self._threads[1].join(max(0.0, deadline - time.monotonic()))

    # -- one step at a time -----------------------------------------------------------------
    def next_batch(self) -> tuple[tuple[ModelKey, list[Item]] | None, float | None]:
        """The next batch to run (now counted as running), or how long until one may be
        ready (None: not until something is submitted)."""
        with self._cond:
            picked, wait_s = self._pick()
            if picked is not None:
                self._running_key, self._running_items = picked[0], len(picked[1])
            return picked, wait_s

    def run_batch(self, key: ModelKey, items: list[Item]) -> list[Outcome]:
        try:
            return self._execute(key, items)
        except Exception as exc:  # a bug here must not stop serving or lose requests
            logger.exception("batch of model %s failed unexpectedly", key)
            return [Outcome(i, error=ModelExecutionError(f"internal error: {exc}")) for i in items]
        finally:
            with self._cond:
                self._running_key, self._running_items = None, 0

    def finished_early(self) -> list[Outcome]:
        """Outcomes handed to ``finish_now``, for a serving loop to answer."""
        outcomes: list[Outcome] = []
        while not self._done.empty():
            outcomes += self._done.get() or []
        return outcomes

    def record(self, outcomes: list[Outcome]) -> None:
        """Count answered requests and tell the observers (after they were answered)."""
        now = self._clock()
        for outcome in outcomes:
            if outcome.item.cold:
                self.stats.cache_misses += 1
            else:
                self.stats.cache_hits += 1
            if outcome.error is None:
                self.stats.served += 1
                self.stats.record_latency(outcome.item.key, now - outcome.item.received)
            else:
                self.stats.failed += 1
        for observer in self.observers:
            try:
                observer(outcomes)
            except Exception:
                logger.exception("batch observer %r failed", observer)

    # -- on threads of its own --------------------------------------------------------------
    def _run(self) -> None:
        self.cache.pin_threads()
        while True:
            with self._cond:
                while True:
                    picked, wait_s = self._pick()
                    if picked is not None:
                        self._running_key, self._running_items = picked[0], len(picked[1])
                        break
                    if self._stopping and not any(self._queues.values()):
                        return
                    self._cond.wait(wait_s)
            self._done.put(self.run_batch(*picked))

    def _finish(self) -> None:
        while True:
            outcomes = self._done.get()
            if outcomes is None:
                return
            if not outcomes:
                continue
            try:
                self._complete(outcomes)
            except Exception:
                logger.exception("could not complete %d requests", len(outcomes))
            self.record(outcomes)

    def _pick(self) -> tuple[tuple[ModelKey, list[Item]] | None, float | None]:
        """The next batch to run, or how long to wait before looking again (None: until woken)."""
        now = self._clock()
        wait_s: float | None = None
        ready_keys = sorted(
            (key for key, items in self._queues.items() if items),
            key=lambda k: (self._queues[k][0].priority, self._queues[k][0].received),
        )
        for key in ready_keys:
            waiting = self._queues[key]
            entry = self.cache.status(key)
            if entry.state is ModelState.LOADING:
                remaining = entry.deadline - now
                wait_s = remaining if wait_s is None else min(wait_s, remaining)
                continue
            if entry.state is ModelState.FAILED:
                items = list(waiting)
                waiting.clear()
                return (key, items), None
            spec = entry.spec
            assert spec is not None
            max_rows = spec.batching.max_batch_size or self.default_max_batch_size
            delay_ms = spec.batching.max_batch_delay_ms
            if delay_ms is None:
                delay_ms = self.default_max_batch_delay_ms
            rows = sum(i.n_rows for i in waiting)
            # The oldest waits no longer than the delay, wherever its priority put it.
            age = now - min(i.received for i in waiting) if rows < max_rows else 0.0
            if rows < max_rows and age * 1000 < delay_ms and not self._stopping:
                remaining = delay_ms / 1000 - age
                wait_s = remaining if wait_s is None else min(wait_s, remaining)
                continue
            taken = [waiting.popleft()]
            total = taken[0].n_rows
            while waiting and total + waiting[0].n_rows <= max_rows:
                total += waiting[0].n_rows
                taken.append(waiting.popleft())
            return (key, taken), None
        return None, (max(wait_s, 0.0005) if wait_s is not None else None)

    def _execute(self, key: ModelKey, items: list[Item]) -> list[Outcome]:
        started = self._clock()
        entry = self.cache.status(key)
        if entry.state is ModelState.FAILED:
            assert entry.error is not None
            return [Outcome(i, error=entry.error, started=started, finished=started) for i in items]
        # Requests revoked or expired while they waited are answered, not run.
        items, refused = self._admit(items)
        outcomes: list[Outcome] = list(refused)
        if not items:
            return outcomes
        good: list[Item] = []
        schema = entry.spec.input if entry.spec else None
        assert schema is not None
        for item in items:
            try:
                item.rows, item.kind = as_rows(item.inputs, schema, single=item.single)
                good.append(item)
            except InferenceError as exc:
                outcomes.append(Outcome(item, error=exc, started=started, finished=started))
        if good:
            model = self.cache.acquire(key)
            try:
                outcomes += self._forward_all(model, good, started)
            finally:
                self.cache.release(model)
        return outcomes

    def _forward_all(self, model: CachedModel, items: list[Item], started: float) -> list[Outcome]:
        try:
            outputs = self._forward(model, [i.rows for i in items])  # type: ignore[misc]
        except Exception as exc:
            if len(items) == 1:
                error = (
                    exc
                    if isinstance(exc, InferenceError)
                    else ModelExecutionError(
                        f"model {model.key} failed: {type(exc).__name__}: {exc}"
                    )
                )
                return [Outcome(items[0], error=error, started=started, finished=self._clock())]
            logger.info(
                "batch of %d on model %s failed (%s); retrying one by one",
                len(items),
                model.key,
                exc,
            )
            return [o for item in items for o in self._forward_all(model, [item], started)]
        finished = self._clock()
        size = sum(len(i.rows) for i in items if i.rows is not None)
        return [
            Outcome(
                item,
                value=_convert(out, item.kind, item.single),
                batch_size=size,
                started=started,
                finished=finished,
            )
            for item, out in zip(items, outputs, strict=True)
        ]

    def _forward(self, model: CachedModel, batches: list[np.ndarray]) -> list[np.ndarray]:
        array = batches[0] if len(batches) == 1 else np.concatenate(batches)
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array)  # decoded arrays are read-only views of the message
        inputs = torch.from_numpy(array).to(self.cache.device, non_blocking=True)
        with torch.inference_mode():
            output = model.module(inputs)  # type: ignore[misc]
        if (
            not isinstance(output, torch.Tensor)
            or output.ndim == 0
            or output.shape[0] != len(array)
        ):
            raise ModelExecutionError(
                f"model {model.key} returned {type(output).__name__} "
                f"{list(getattr(output, 'shape', []))} for {len(array)} rows; expected a tensor "
                "with one row per input"
            )
        result = output.detach().to("cpu").numpy()
        self.stats.record_batch(model.key, len(array))
        parts, at = [], 0
        for rows in batches:  # views, not copies (np.split costs more per piece)
            parts.append(result[at : at + len(rows)])
            at += len(rows)
        return parts

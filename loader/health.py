"""Health checks of the models a worker holds: a probe inference with the warm-up input
(zeros of the input schema) every ``interval_s``, within ``probe_timeout_s``.

``max_failures`` consecutive failures mark the instance unhealthy: the worker reports it,
the scaler takes it out of routing and replaces it. After ``cooldown_s`` it is tried again
(state ``retrying``): a passing probe makes it healthy, a failing one counts again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from common.contracts import ModelKey
from loader.cache import ModelCache, _torch_dtype

logger = logging.getLogger(__name__)

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
RETRYING = "retrying"


@dataclass
class InstanceHealth:
    state: str = HEALTHY
    failures: int = 0
    reason: str = ""
    last_probe: float = -1e18
    unhealthy_since: float = 0.0


class HealthChecker:
    def __init__(
        self,
        cache: ModelCache,
        *,
        interval_s: float,
        max_failures: int,
        probe_timeout_s: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.interval_s = interval_s
        self.max_failures = max_failures
        self.probe_timeout_s = probe_timeout_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._health: dict[ModelKey, InstanceHealth] = {}
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="health-probe", initializer=cache.pin_threads
        )
        self._running: Future[None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self.on_unhealthy: Callable[[ModelKey], None] | None = None
        # Read on every delivered request: a plain attribute, replaced, never mutated.
        self.unhealthy_now: frozenset[ModelKey] = frozenset()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.wait(min(self.interval_s, 0.5)):
            try:
                self.check_due()
            except Exception:
                logger.exception("health check failed unexpectedly")

    def check_due(self) -> None:
        now = self._clock()
        loaded = set(self.cache.ready_keys())
        with self._lock:
            for key in [k for k in self._health if k not in loaded]:
                if self._health[key].state != UNHEALTHY:
                    del self._health[key]  # unloaded: only a sick one is remembered
        for key in sorted(loaded):
            with self._lock:
                health = self._health.setdefault(key, InstanceHealth(last_probe=now))
                if health.state == UNHEALTHY and now - health.unhealthy_since >= self.cooldown_s:
                    health.state, health.failures = RETRYING, 0
                    self._refresh()
                # An unhealthy instance is left alone until its cooldown is over.
                due = health.state != UNHEALTHY and now - health.last_probe >= self.interval_s
            if due:
                self.record(key, self.probe(key))

    def probe(self, key: ModelKey) -> str | None:
        """None when the probe passes, else why it failed."""
        if self._running is not None and not self._running.done():
            return f"the previous probe is still running after {self.probe_timeout_s:g} s"
        self._running = self._pool.submit(self._forward, key)
        try:
            self._running.result(timeout=self.probe_timeout_s)
        except TimeoutError:
            return f"probe took longer than {self.probe_timeout_s:g} s"
        except Exception as exc:
            return f"probe failed: {type(exc).__name__}: {exc}"
        return None

    def _forward(self, key: ModelKey) -> None:
        model = self.cache.acquire(key, touch=False)
        try:
            spec = model.spec
            assert spec is not None
            x = torch.zeros(
                (1, *spec.input.shape), dtype=_torch_dtype(spec), device=self.cache.device
            )
            with torch.inference_mode():
                out = model.module(x)  # type: ignore[misc]
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 1:
                raise ValueError(f"returned {type(out).__name__} instead of one row")
            if out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise ValueError("returned non-finite values")
        finally:
            self.cache.release(model)

    def record(self, key: ModelKey, failure: str | None) -> None:
        now = self._clock()
        with self._lock:
            health = self._health.setdefault(key, InstanceHealth())
            health.last_probe = now
            if failure is None:
                if health.state != HEALTHY:
                    logger.info("model %s is healthy again", key)
                health.state, health.failures, health.reason = HEALTHY, 0, ""
                self._refresh()
                return
            health.failures += 1
            health.reason = failure
            turned = health.state != UNHEALTHY and health.failures >= self.max_failures
            if turned:
                health.state = UNHEALTHY
                health.unhealthy_since = now
                logger.warning(
                    "model %s is unhealthy after %d failed probes: %s",
                    key,
                    health.failures,
                    failure,
                )
            self._refresh()
        if turned and self.on_unhealthy is not None:
            try:
                self.on_unhealthy(key)
            except Exception:
                logger.exception("could not hand back the requests of unhealthy %s", key)

    def mark_unhealthy(self, key: ModelKey, reason: str) -> None:
        """Unhealthy now, without probes (its load failed here): the cooldown applies."""
        with self._lock:
            health = self._health.setdefault(key, InstanceHealth())
            health.state, health.failures, health.reason = UNHEALTHY, self.max_failures, reason
            health.unhealthy_since = self._clock()
            self._refresh()
        logger.warning("model %s is unhealthy here: %s", key, reason)
        if self.on_unhealthy is not None:
            self.on_unhealthy(key)

    def _refresh(self) -> None:
        self.unhealthy_now = frozenset(k for k, h in self._health.items() if h.state == UNHEALTHY)

    def describe(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        result = {}
        with self._lock:
            for key, health in self._health.items():
                if health.state == UNHEALTHY and now - health.unhealthy_since >= self.cooldown_s:
                    health.state, health.failures = RETRYING, 0
                    self._refresh()
                result[str(key)] = {
                    "state": health.state,
                    "failures": health.failures,
                    "reason": health.reason,
                    "last_probe_age_s": round(max(now - health.last_probe, 0.0), 3),
                }
        return result

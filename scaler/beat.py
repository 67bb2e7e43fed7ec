"""The scaler inside ``celery -A workers beat``: a beat scheduler whose tick is a scaler tick.

Beat keeps running with no worker up (it only needs Redis). Between ticks the scheduler
waits on the poke channel, so a producer that queues for a version nobody serves wakes it
at once instead of after the tick period. Periodic tasks in ``beat_schedule`` still run.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from celery import beat

from common.redis import redis_client
from common.settings import scaler_settings, serving_settings
from loader.repository import ModelRepository
from scaler.backends import LocalBackend
from scaler.config import AutoscalerConfig
from scaler.loop import ScalerLoop, Waiter
from scaler.node import NodeBackend

logger = logging.getLogger(__name__)


def config_from_settings() -> AutoscalerConfig:
    settings = scaler_settings()
    data: dict[str, Any] = {}
    if settings.config_file is not None:
        data = json.loads(settings.config_file.read_text())
    for name in ("tick_interval_s", "backend", "max_workers"):
        value = getattr(settings, name)
        if value is not None:
            data[name] = value
    zero = dict(data.get("zero_scaling", {}))
    if settings.scale_to_zero_delay is not None:
        zero["scale_to_zero_delay"] = settings.scale_to_zero_delay
    if settings.cold_start_strategy is not None:
        zero["cold_start_strategy"] = settings.cold_start_strategy
    data["zero_scaling"] = zero
    return AutoscalerConfig(**data)


def worker_env(config: AutoscalerConfig) -> dict[str, str]:
    """Settings of the workers the scaler starts (here or through node agents), from its
    config."""
    zero, loading = config.zero_scaling, config.model_loading
    return {
        "WORKER_MAX_LOADED_MODELS": str(zero.max_loaded_models),
        "WORKER_CACHE_SIZE_GB": str(loading.cache_size_gb),
        "WORKER_LOAD_TIMEOUT_SECONDS": str(loading.load_timeout_seconds),
        "WORKER_WARMUP_TIMEOUT_SECONDS": str(
            min(zero.warmup_timeout, loading.warmup_timeout_seconds)
        ),
        "WORKER_CONCURRENT_LOADS": str(loading.concurrent_loads),
        "WORKER_FAILURE_COOLDOWN_SECONDS": str(loading.failure_cooldown_seconds),
        "WORKER_HEALTH_CHECK_INTERVAL_S": str(loading.health_check_interval_seconds),
        "WORKER_HEALTH_MAX_FAILURES": str(loading.max_consecutive_failures),
        "WORKER_HEALTH_COOLDOWN_S": str(loading.failure_cooldown_seconds),
    }


def warn_if_evicting(client: Any) -> None:
    """A Redis that evicts when full drops queued requests and results without a word:
    only ``noeviction`` refuses producers instead (with an error at the caller)."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")
    except Exception:  # CONFIG disabled (a managed Redis) or Redis away: nothing to tell
        return
    if policy != "noeviction":
        logger.warning(
            "Redis maxmemory-policy is %s: once full it evicts queued requests and results "
            "silently; set maxmemory-policy noeviction",
            policy,
        )


def build_loop(app: Any, config: AutoscalerConfig | None = None) -> ScalerLoop:
    config = config or config_from_settings()
    serving = serving_settings()
    client = redis_client(serving.redis_url, socket_timeout=10)
    repository = (
        ModelRepository(serving.model_repository) if serving.model_repository.is_dir() else None
    )
    loop = ScalerLoop(config, client=client, app=app, repository=repository)
    warn_if_evicting(client)
    if isinstance(loop.backend, (LocalBackend, NodeBackend)):
        loop.backend.env.update(worker_env(config))
    if isinstance(loop.backend, LocalBackend):
        loop.backend.log_dir = scaler_settings().log_dir
        if loop.backend.gpus:
            # One worker per GPU: the fleet is as large as the GPUs are many.
            loop.config = config.model_copy(
                update={"max_workers": min(config.max_workers, loop.backend.gpus)}
            )
    return loop


class ScalerScheduler(beat.Scheduler):
    """``beat_scheduler``: every beat tick is a scaler tick."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop: ScalerLoop | None = None
        self._waiter: Waiter | None = None
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._loop is None:
            self._loop = build_loop(self.app)
            self._waiter = Waiter(self._loop.store.client)
            logger.info(
                "scaler started (tick %.2f s, backend %s)",
                self._loop.config.tick_interval_s,
                self._loop.config.backend,
            )
        assert self._waiter is not None
        # Periodic tasks of beat_schedule run between the tick and the wait.
        self._loop.run_once(
            self._waiter, between=lambda: super(ScalerScheduler, self).tick(*args, **kwargs)
        )
        return 0.0

    def close(self) -> None:
        """Beat is stopping. A stop the user asked (Ctrl-C, SIGTERM) drains and stops the
        workers this scaler started, if it led; a crash leaves them to the next scaler,
        which adopts them."""
        # Celery's SIGTERM/SIGINT handler calls this, then beat's exit does again.
        crashed = isinstance(sys.exc_info()[1], Exception)
        loop, self._loop = self._loop, None
        super().close()
        # A scaler that did not lead leaves the fleet to the one that does.
        if crashed or loop is None or loop.last is None or not loop.last.leader:
            return
        if hasattr(loop.backend, "stop_all"):
            logger.info("scaler stopping: draining the workers it started")
            try:
                loop.backend.stop_all()
                loop.store.resign()
            except Exception as exc:  # Redis away: the next scaler adopts what is left
                logger.warning("scaler stop: workers not drained: %s", exc)

    @property
    def info(self) -> str:
        return "scaler (model instances from queue depth)"

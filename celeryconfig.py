"""Celery settings, built from the project's settings objects (``common.settings``)."""

from __future__ import annotations

import ssl

from common.settings import serving_settings, worker_settings
from tasks import codec
from tasks.routing import ModelRouter

_serving = serving_settings()
_worker = worker_settings()


def _tls_options(url: str) -> dict[str, object] | None:
    # A rediss:// URL without ssl_cert_reqs would make Celery refuse to start; verify by default.
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


broker_url = _serving.redis_url
result_backend = _serving.backend_url
broker_use_ssl = _tls_options(broker_url)
redis_backend_use_ssl = _tls_options(result_backend)


def _sentinel_options() -> dict[str, object]:
    # sentinel:// URLs (kombu's sentinel transport, Celery's sentinel result backend).
    options: dict[str, object] = {"master_name": _serving.redis_sentinel_master}
    if _serving.redis_sentinel_password:
        options["sentinel_kwargs"] = {"password": _serving.redis_sentinel_password}
    return options


broker_connection_retry_on_startup = True
# Keep reconnecting for as long as Redis is away: a restart is routine, never a worker exit.
broker_connection_max_retries = None

# No pickle anywhere: JSON for small inputs, msgpack with raw array bytes for arrays.
task_serializer = "json"
result_serializer = codec.SERIALIZER
accept_content = ["json", codec.SERIALIZER]
result_accept_content = ["json", codec.SERIALIZER]
event_serializer = "json"

# Model queues are read by the worker's fetcher (``tasks.broker``: atomic fetch, results
# stored before the acknowledgement); Celery's consumer keeps remote control and events.
worker_consumer = "tasks.serving:ServingConsumer"
task_acks_late = True
task_reject_on_worker_lost = True
worker_pool = "threads"
worker_concurrency = 1
worker_prefetch_multiplier = _worker.prefetch_count
broker_transport_options = {
    "visibility_timeout": _serving.visibility_timeout_s,
    "queue_order_strategy": "priority",
    **(_sentinel_options() if broker_url.startswith("sentinel://") else {}),
}
if result_backend.startswith("sentinel://"):
    result_backend_transport_options = _sentinel_options()
result_expires = _serving.result_expires_s

# ``send_task("tasks.predict", ...)`` resolves and routes like ``predict.delay``.
task_routes = (ModelRouter(),)
task_create_missing_queues = True
task_default_queue = "celery"

# Task events for Flower; Flower also switches them on at run time (enable_events).
worker_send_task_events = _serving.task_events
task_send_sent_event = False
worker_enable_remote_control = True

# `celery -A workers beat` runs the scaler.
beat_scheduler = "scaler.beat:ScalerScheduler"
beat_max_loop_interval = 1.0

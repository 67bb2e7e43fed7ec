"""The ``predict`` and ``predict_batch`` tasks.

Producers call ``predict.delay("tiny_mlp", inputs)`` or ``predict.apply_async(args,
kwargs={"version": "v2"}, priority=..., expires=...)``. Arrays (numpy or torch) travel as
raw bytes (the ``tensor`` codec), lists and numbers as JSON; the result comes back as the
same kind of value. In a worker these tasks never run their body: the batching strategy
(``tasks.strategy``) hands their requests to the model server. The body below serves the
in-process path (``predict(...)`` called directly, ``apply()``).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from common import keys
from common.errors import PayloadTooLargeError
from common.settings import serving_settings
from tasks import codec
from tasks.balancing import Route
from tasks.publish import fast_path_allowed, publish
from tasks.routing import PREDICT, PREDICT_BATCH, ModelRouter, model_queue_named
from workers import app


class PredictTask(Task):
    Strategy = "tasks.strategy:batching_strategy"
    acks_late = True
    reject_on_worker_lost = True
    typing = True

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        kwargs = dict(kwargs or {})
        # The HTTP API awaits results on its own subscription: no Celery result consumer.
        subscribe = options.pop("subscribe", True)
        inputs = args[1] if args and len(args) > 1 else kwargs.get("inputs")
        limit = serving_settings().max_payload_bytes
        size = codec.payload_bytes(inputs)
        if size > limit:
            raise PayloadTooLargeError(
                f"inputs of {size} bytes exceed the limit of {limit} bytes (MAX_PAYLOAD_BYTES)"
            )
        options.setdefault("serializer", codec.choose_serializer(inputs))
        # Model queues take the default exchange: nothing to declare on the way out, and
        # kombu's per-publish declaration check costs more than the publish itself.
        options.setdefault("declare", [])
        # Celery's default argsrepr prints the whole array: most of a publish's CPU time.
        model = args[0] if args else kwargs.get("model")
        options.setdefault("argsrepr", f"({model!r}, {codec.describe(inputs)})")
        options.setdefault("kwargsrepr", repr({k: v for k, v in kwargs.items() if k != "inputs"}))
        # CONSISTENT_HASH routes by this key when given, else by the input's bytes.
        hash_key = kwargs.pop("key", None)
        router = self.app.conf.task_routes[0] if self.app.conf.task_routes else None
        route = None
        if isinstance(router, ModelRouter) and "queue" not in options:
            router(self.name, args, kwargs, options)  # resolves the version into kwargs
            route = router.balancer.route(model, kwargs["version"], inputs, hash_key)
        if not rest and route is not None and fast_path_allowed(self.app, options):
            result = publish(
                self, route.queue, args, kwargs, options, subscribe=subscribe,
                shared_queue=route.shared_queue if route.instance else None,
                inflight=_inflight(route, model, kwargs["version"]),
            )  # fmt: skip
        else:
            # For the queue-wait metric, as the fast path does.
            headers = {**(options.get("headers") or {}), "published_at": time.time()}
            if route is not None and route.instance:
                options["queue"] = model_queue_named(route.queue)
                headers[keys.SHARED_QUEUE_HEADER] = route.shared_queue
            options["headers"] = headers
            result = super().apply_async(args, kwargs, *rest, **options)
            if route is not None and isinstance(router, ModelRouter):
                router.balancer.count_in_flight(route, model, kwargs["version"])
        version = kwargs.get("version")
        if version and isinstance(router, ModelRouter):
            if options.get("priority"):
                router.registry.note_priority(keys.queue_name(model, version))
            # After the publish, so that the woken scaler finds the request in the queue.
            router.registry.poke_if_unserved(model, version)
        return result


def _inflight(route: Route, model: str, version: str | None) -> tuple[str, str] | None:
    if route.instance is None or version is None:
        return None
    return keys.routing_state_key(model, version), f"inflight:{route.instance}"


@app.task(base=PredictTask, name=PREDICT)
def predict(model: str, inputs: Any, version: str | None = None, key: str | None = None) -> Any:
    """Run one input through a model version; returns that input's output. ``key`` is the
    consistent-hash key (used by the producer's router only)."""
    from tasks.inline import run_inline

    return run_inline(model, inputs, version, single=True)


@app.task(base=PredictTask, name=PREDICT_BATCH)
def predict_batch(
    model: str, inputs: Any, version: str | None = None, key: str | None = None
) -> Any:
    """Run a list of inputs through a model version; returns one output per input."""
    from tasks.inline import run_inline

    return run_inline(model, inputs, version, single=False)

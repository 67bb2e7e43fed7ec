"""The ``predict`` and ``predict_batch`` tasks.

Producers call ``predict.delay("tiny_mlp", inputs)``, ``predict.apply_async(args,
kwargs={"version": "v2"}, priority=..., expires=...)`` or, in an event loop, ``await
predict.aio("tiny_mlp", inputs)``. Arrays (numpy or torch) travel as raw bytes (the
``tensor`` codec), lists and numbers as JSON; the result comes back as the same kind of
value. Publishing is the project's producer (``tasks.producer``), not Celery's: one round
trip per request, the result on the process's reply channel. In a worker these tasks never
run their body (the serving loop hands their requests to the model server); the body serves the
in-process path (``predict(...)`` called directly, ``apply()``).
"""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks.producer import Call, client_for_running_loop, shared_producer
from tasks.routing import PREDICT, PREDICT_BATCH
from workers import app

# Options with a meaning for a prediction; the others are refused, not silently dropped.
SUPPORTED_OPTIONS = frozenset(["task_id", "priority", "expires", "headers", "serializer"])
_KWARGS = frozenset(["model", "inputs", "version", "key"])
# Options Celery's own machinery passes along that change nothing here.
IGNORED_OPTIONS = frozenset(
    ["retry", "retry_policy", "declare", "argsrepr", "kwargsrepr", "add_to_parent", "ignore_result"]
)


class PredictTask(Task):
    acks_late = True
    reject_on_worker_lost = True
    typing = True

    def call_for(self, args: Any, kwargs: Any, options: dict[str, Any]) -> Call:
        for name, value in options.items():
            if value is not None and name not in SUPPORTED_OPTIONS and name not in IGNORED_OPTIONS:
                unknown = sorted(
                    k for k, v in options.items()
                    if v is not None and k not in SUPPORTED_OPTIONS | IGNORED_OPTIONS
                )  # fmt: skip
                raise TypeError(
                    f"{self.name} does not support {', '.join(unknown)}; "
                    f"options: {', '.join(sorted(SUPPORTED_OPTIONS))}"
                )
        kwargs = kwargs or {}
        n = len(args) if args else 0
        model = args[0] if n else kwargs.get("model")
        inputs = args[1] if n > 1 else kwargs.get("inputs")
        if n > 2 or any(k not in _KWARGS for k in kwargs):
            extra = [k for k in kwargs if k not in _KWARGS] or list(args[2:])
            raise TypeError(f"{self.name}(model, inputs, version=None, key=None): got {extra}")
        return Call(
            model=model,
            inputs=inputs,
            single=self.name == PREDICT,
            version=kwargs.get("version"),
            key=kwargs.get("key"),
            priority=int(options.get("priority") or 0),
            expires=options.get("expires"),
            task_id=options.get("task_id"),
            headers=options.get("headers"),
            serializer=options.get("serializer"),
        )

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        if producer is not None or link is not None or link_error is not None or shadow:
            raise TypeError(f"{self.name} does not support producer, link, link_error or shadow")
        if not options and not kwargs and args is not None and len(args) == 2:
            call = Call(args[0], args[1], single=self.name == PREDICT, task_id=task_id)
        else:
            call = self.call_for(args, kwargs, {**options, "task_id": task_id})
        return shared_producer().send(call, self.app)

    async def aio(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """``await predict.aio(model, inputs, version=None, key=None, timeout=None,
        priority=0)``: the outputs, from an event loop (one client per loop)."""
        if not kwargs and len(args) == 2:
            call = Call(args[0], args[1], single=self.name == PREDICT, expires=timeout)
        else:
            options: dict[str, Any] = {
                k: kwargs.pop(k) for k in ("priority", "task_id", "headers") if k in kwargs
            }
            call = self.call_for(args, kwargs, {**options, "expires": timeout})
        client = client_for_running_loop()
        return await client.result(await client.submit(call), timeout)


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

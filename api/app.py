"""The HTTP API: SEED.md's endpoints on the queue shape (``python -m api``).

``POST /predict`` and ``POST /predict/batch`` queue the request exactly as
``predict.delay`` does (the same producer, message and queue) through the asynchronous
client: publishes share one connection and results arrive on one reply channel, so no
request holds a thread while it waits. Inputs are checked
against the model's input schema from the registry before they are queued: a bad request
is answered at once with the field named, never after a timeout.

Status codes: 404 unknown model or version, 422 invalid input (the field is named), 413 a
body over ``MAX_PAYLOAD_BYTES``, 504 no answer within the request's ``timeout``, 503 no
instance of the version became ready within ``API_COLD_START_TIMEOUT_S`` (or its model
cannot be loaded). The management endpoints (scale, load, unload) need
``Authorization: Bearer <API_TOKEN>`` when a token is set, and answer only loopback
clients when none is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
import redis
from celery.exceptions import TaskRevokedError
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from api.dashboard import BEARER as _BEARER
from api.dashboard import add_dashboard, authorize
from api.prometheus import render_metrics
from common import keys
from common.errors import (
    BrokerUnavailableError,
    InferenceError,
    InvalidNameError,
    ModelExecutionError,
    ModelLoadError,
    PayloadTooLargeError,
    RegistryUnavailableError,
    RejectedMessageError,
    SchemaError,
    UnknownModelError,
)
from common.settings import ApiSettings, api_settings, metrics_settings, serving_settings
from loader.batching import numeric_array
from loader.spec import NOT_FINITE, InputSchema
from scaler.config import LoadBalancingStrategy
from tasks.producer import Call, Pending, decode_result

logger = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
# A scaler status older than this is a scaler that is gone: its wishes no longer count.
SCALER_STATUS_FRESH_S = 30.0


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    inputs: list[Any] = Field(
        ..., description="One input row (predict) or a list of rows (predict/batch)."
    )
    model: str | None = Field(
        None, pattern=NAME_PATTERN, description="Model name; default: API_DEFAULT_MODEL."
    )
    key: str | None = Field(
        None, max_length=256, description="Routing key of the consistent_hash strategy."
    )
    version: str | None = Field(
        None, pattern=NAME_PATTERN, description="Version; default: the traffic split or default."
    )
    priority: int = Field(
        0, ge=0, le=9, description="Celery's order on Redis: 0 (default) is served first, 9 last."
    )
    timeout: float | None = Field(
        None, gt=0, le=3600, description="Seconds to wait for the answer (API_DEFAULT_TIMEOUT_S)."
    )


Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


class TrafficSplit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Weight] | None = Field(
        None, description='Share per version, e.g. {"v1": 90, "v2": 10} (a canary at 10%).'
    )
    default_version: str | None = Field(None, pattern=NAME_PATTERN)


class InstanceWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[Annotated[str, Field(max_length=300)], Weight] | None = Field(
        None, description="Weight per instance (worker hostname) for weighted_round_robin."
    )


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    version: str
    outputs: Any
    latency_ms: float


class ErrorResponse(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (404, "Unknown model or version"),
        (413, "Request body over MAX_PAYLOAD_BYTES"),
        (503, "No instance could be had within the cold-start timeout"),
        (504, "No answer within the request's timeout"),
    )
}
MANAGEMENT_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
    403: {"model": ErrorResponse, "description": "No token configured: loopback clients only"},
    404: ERRORS[404],
}

_STATUS: list[tuple[type[BaseException], int]] = [
    (UnknownModelError, 404),
    (InvalidNameError, 404),
    (SchemaError, 422),
    (RejectedMessageError, 422),
    (PayloadTooLargeError, 413),
    (ModelLoadError, 503),
    (RegistryUnavailableError, 503),
    (BrokerUnavailableError, 503),
    (ModelExecutionError, 500),
]


def status_of(error: BaseException) -> int:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return 500


def _invalid(field: str, message: str, where: str = "body") -> HTTPException:
    return HTTPException(
        422, detail=[{"loc": [where, field], "msg": message, "type": "value_error"}]
    )


class PayloadLimit:
    """ASGI middleware: 413 for a body over the limit, before it is read whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.limit:
                return await self._refuse(send, int(length))
            return await self.app(scope, receive, send)
        # No length given (a chunked body): read it here, up to the limit, so that an
        # oversized one is refused with 413 before the app (whose body parser would turn
        # an error into a 400) sees any of it.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._refuse(send, seen)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps(
            {
                "detail": f"request body of {size} bytes exceeds the limit of {self.limit} "
                "bytes (MAX_PAYLOAD_BYTES)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or api_settings()
    serving = serving_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from scaler.autoscaler import Autoscaler
        from tasks.producer import AsyncInferenceClient
        from workers import app as celery_app

        app.state.celery = celery_app
        app.state.autoscaler = Autoscaler(run_scaler=False)
        app.state.client = AsyncInferenceClient()
        try:
            await app.state.client.start()
        except BrokerUnavailableError as exc:
            logger.warning("%s; the API answers 503 until Redis is reachable", exc)
        if not settings.token:
            logger.warning(
                "API_TOKEN is not set: the management endpoints answer loopback clients only"
            )
        try:
            yield
        finally:
            await app.state.client.aclose()

    app = FastAPI(
        title="Inference API",
        version="0.1.0",
        description=__doc__,
        lifespan=lifespan,
    )
    app.add_middleware(PayloadLimit, limit=serving.max_payload_bytes)

    @app.exception_handler(redis.RedisError)
    async def redis_unreachable(request: Request, exc: redis.RedisError) -> JSONResponse:
        # Redis restarting or away: the caller hears it now, and may retry.
        return JSONResponse(
            {"detail": f"Redis is unreachable: {type(exc).__name__}: {exc}"}, status_code=503
        )

    def manager(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        authorize(request, credentials.credentials if credentials else None, settings.token)

    Manage = Depends(manager)
    add_dashboard(app, settings, Manage)

    async def resolve(model: str, version: str | None) -> str:
        client = app.state.client
        try:
            return await client.lookup(client.producer.registry.resolve(model, version))
        except InferenceError as exc:
            raise HTTPException(status_of(exc), detail=str(exc)) from None

    # -- autoscaler endpoints ---------------------------------------------------------------
    @app.get("/autoscaler/stats", tags=["autoscaler"])
    def stats() -> dict[str, Any]:
        """Desired and active instances, queued requests of every version, workers, decisions."""
        return dict(app.state.autoscaler.get_stats())

    @app.get("/autoscaler/health", tags=["autoscaler"])
    def health() -> dict[str, Any]:
        """Redis, the scaler's last tick, each worker and each model instance."""
        return dict(app.state.autoscaler.get_health_status())

    @app.post(
        "/autoscaler/scale", tags=["autoscaler"], dependencies=[Manage], responses=MANAGEMENT_ERRORS
    )
    async def scale(
        model_name: Annotated[str, Query(max_length=128)],
        target_instances: Annotated[int, Query(ge=0, le=1000)],
        version: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """Pin a version's instances (kept until changed or released with ``DELETE``;
        ``target_instances`` 0 is zero). ``replaced``: the manual command this replaced."""
        resolved = await resolve(model_name, version)
        replaced = await app.state.autoscaler.scale_model(
            model_name, target_instances, version=resolved
        )
        return {
            "model": model_name, "version": resolved, "target_instances": target_instances,
            "replaced": replaced,
        }  # fmt: skip

    @app.delete(
        "/autoscaler/scale", tags=["autoscaler"], dependencies=[Manage], responses=MANAGEMENT_ERRORS
    )
    async def release(
        model_name: Annotated[str, Query(max_length=128)],
        version: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """Give a version back to the automatic policy (drops a pin, a load or an unload)."""
        resolved = await resolve(model_name, version)
        replaced = await app.state.autoscaler.scale_model(model_name, None, version=resolved)
        return {
            "model": model_name, "version": resolved, "state": "automatic", "replaced": replaced,
        }  # fmt: skip

    @app.post(
        "/autoscaler/load", tags=["autoscaler"], dependencies=[Manage], responses=MANAGEMENT_ERRORS
    )
    async def load(
        model_name: Annotated[str, Query(max_length=128)],
        version: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """Load a version now and keep it loaded until it is unloaded."""
        resolved = await resolve(model_name, version)
        replaced = await app.state.autoscaler.load_model(model_name, resolved)
        return {"model": model_name, "version": resolved, "state": "loading", "replaced": replaced}

    @app.delete(
        "/autoscaler/unload",
        tags=["autoscaler"],
        dependencies=[Manage],
        responses=MANAGEMENT_ERRORS,
    )
    async def unload(
        model_name: Annotated[str, Query(max_length=128)],
        version: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """Take a version to zero now; a later request brings it back."""
        resolved = await resolve(model_name, version)
        replaced = await app.state.autoscaler.unload_model(model_name, resolved)
        return {
            "model": model_name, "version": resolved, "state": "unloading", "replaced": replaced,
        }  # fmt: skip

    @app.post(
        "/autoscaler/traffic", tags=["autoscaler"], dependencies=[Manage],
        responses={**MANAGEMENT_ERRORS, 422: {"model": ErrorResponse}},
    )  # fmt: skip
    async def traffic(
        model_name: Annotated[str, Query(max_length=128)], split: TrafficSplit
    ) -> dict[str, Any]:
        """Split the requests that name no version by weight, or set the default version."""
        if not split.weights and not split.default_version:
            raise _invalid("weights", "give weights with a positive sum or a default_version")
        try:
            return dict(
                await app.state.autoscaler.set_traffic_split(
                    model_name, split.weights or None, default_version=split.default_version
                )
            )
        except InferenceError as exc:
            raise HTTPException(status_of(exc), detail=str(exc)) from None
        except ValueError as exc:
            raise _invalid("weights", str(exc)) from None

    @app.delete(
        "/autoscaler/traffic", tags=["autoscaler"], dependencies=[Manage],
        responses=MANAGEMENT_ERRORS,
    )  # fmt: skip
    async def traffic_reset(model_name: Annotated[str, Query(max_length=128)]) -> dict[str, Any]:
        """Back to the model config's default version and split."""
        try:
            return dict(await app.state.autoscaler.set_traffic_split(model_name, None))
        except InferenceError as exc:
            raise HTTPException(status_of(exc), detail=str(exc)) from None

    @app.post(
        "/autoscaler/balancing", tags=["autoscaler"], dependencies=[Manage],
        responses=MANAGEMENT_ERRORS,
    )  # fmt: skip
    async def balancing(
        model_name: Annotated[str, Query(max_length=128)],
        strategy: LoadBalancingStrategy | None = None,
        body: InstanceWeights | None = None,
    ) -> dict[str, Any]:
        """A model's load-balancing strategy (none: the scaler config's default)."""
        await resolve(model_name, None)
        weights = body.weights if body is not None else None
        try:
            return dict(
                await app.state.autoscaler.set_load_balancing(model_name, strategy, weights=weights)
            )
        except ValueError as exc:
            raise _invalid("weights", str(exc)) from None

    @app.get("/autoscaler/metrics", tags=["autoscaler"])
    def metrics(
        window_seconds: Annotated[
            int, Query(ge=1, le=metrics_settings().minute_retention_s)
        ] = 3600,
        model: Annotated[str | None, Query(max_length=300)] = None,
    ) -> dict[str, Any]:
        """SEED.md's key metrics over the window (``model``: one "name/version" only)."""
        return dict(app.state.autoscaler.get_metrics(window_seconds, model=model))

    @app.get("/autoscaler/metrics/series", tags=["autoscaler"])
    def series(
        window_seconds: Annotated[int, Query(ge=1, le=metrics_settings().minute_retention_s)] = 300,
        step_seconds: Annotated[int, Query(ge=1)] = 5,
        model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        version: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        metric: str | None = None,
    ) -> dict[str, Any]:
        """Per-step points of the history (``t``: each point's first second): per model
        version requests, latency percentiles, instances, queued and running requests, cold
        starts; for the fleet, instances and the scaler's tick time."""
        try:
            return dict(
                app.state.autoscaler.get_metrics_series(
                    window_seconds, step_seconds, model=model, version=version, metric=metric
                )
            )
        except ValueError as exc:
            name = str(exc).split("=")[0].split()[0]  # the parameter the message starts with
            raise _invalid(name, str(exc), "query") from None

    @app.get("/autoscaler/alerts", tags=["autoscaler"])
    def alerts() -> dict[str, Any]:
        """Alerts firing now, and the latest events (fired, repeated, resolved)."""
        return dict(app.state.autoscaler.get_alerts())

    @app.get("/autoscaler/workers", tags=["autoscaler"])
    def workers() -> dict[str, Any]:
        """Each live worker: host, device, loaded models and their bytes, CPU, RSS, GPU."""
        return dict(app.state.autoscaler.get_workers())

    @app.get("/models", tags=["models"])
    def models() -> dict[str, Any]:
        """Every registered model: versions, default, traffic split, input schema, queues."""
        registry = {
            keys.text(k): json.loads(v)
            for k, v in app.state.autoscaler.store.client.hgetall(keys.REGISTRY).items()
        }
        depths = app.state.autoscaler.store.queue_depths()
        status = app.state.autoscaler.store.status() or {}
        result = {}
        for name, entry in sorted(registry.items()):
            versions = {}
            for version, info in entry["versions"].items():
                text = keys.model_key_text(name, version)
                versions[version] = {
                    "input": info["input"],
                    "format": info["format"],
                    "bytes": info["bytes"],
                    "queued": depths.get(text, 0),
                    "instances": status.get("instances", {}).get(text, 0),
                }
            result[name] = {
                "default_version": entry["default_version"],
                "traffic": entry.get("traffic", {}),
                "versions": versions,
            }
        return {"models": result}

    @app.get("/metrics", tags=["monitoring"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text exposition (counters since the metrics began, gauges of now)."""
        body, content_type = render_metrics(app.state.autoscaler.store.client)
        return PlainTextResponse(body, media_type=content_type)

    # -- predictions ------------------------------------------------------------------------
    async def run_prediction(request: PredictRequest, *, single: bool) -> JSONResponse:
        model = request.model or settings.default_model
        timeout = min(request.timeout or settings.default_timeout_s, settings.max_timeout_s)
        started = time.perf_counter()
        client = app.state.client
        registry = client.producer.registry
        try:
            version = await client.lookup(registry.resolve(model, request.version))
            entry = await client.lookup(registry.entry(model))
        except InferenceError as exc:
            raise HTTPException(status_of(exc), detail=str(exc)) from None
        schema = InputSchema(**entry["versions"][version]["input"])
        array = _as_array(request.inputs, schema, single=single)
        call = Call(
            model, array, single=single, version=version, key=request.key,
            priority=request.priority, expires=timeout,
        )  # fmt: skip
        try:
            pending = await client.submit(call)
        except InferenceError as exc:
            raise HTTPException(status_of(exc), detail=str(exc)) from None
        raw = await _await_result(app, pending, timeout, settings.cold_start_timeout_s)
        try:
            outputs = decode_result(raw)
        except TaskRevokedError as exc:
            if str(exc) != "expired":
                raise HTTPException(409, detail=f"the request was revoked: {exc}") from None
            raise HTTPException(
                504,
                detail=f"no answer from {model}/{version} within the timeout of {timeout:g} s "
                "(the request expired before a worker ran it)",
            ) from None
        except Exception as exc:
            raise HTTPException(status_of(exc), detail=str(exc)) from None
        if isinstance(outputs, np.ndarray):
            outputs = outputs.tolist()
        body = PredictResponse(
            model=model,
            version=version,
            outputs=outputs,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return JSONResponse(body.model_dump())

    @app.post("/predict", tags=["predict"], response_model=PredictResponse, responses=ERRORS)
    async def predict(request: PredictRequest) -> JSONResponse:
        """One input through a model (queued like ``predict.delay``)."""
        return await run_prediction(request, single=True)

    @app.post("/predict/batch", tags=["predict"], response_model=PredictResponse, responses=ERRORS)
    async def predict_batch(request: PredictRequest) -> JSONResponse:
        """A list of inputs through a model in one request; one output per input."""
        return await run_prediction(request, single=False)

    return app


def _as_array(inputs: list[Any], schema: InputSchema, *, single: bool) -> np.ndarray:
    try:
        array = numeric_array(inputs, schema.np_dtype)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(
            "inputs", f"not a numeric array of {schema.describe()}{'' if single else ' rows'}"
        ) from None
    if single and tuple(array.shape) != schema.shape:
        raise _invalid(
            "inputs",
            f"shape {list(array.shape)} does not match the model's input {schema.describe()}",
        )
    if not single and (
        array.ndim != len(schema.shape) + 1 or tuple(array.shape[1:]) != schema.shape
    ):
        raise _invalid(
            "inputs",
            f"batch shape {list(array.shape)} is not [n>=1, "
            f"{', '.join(map(str, schema.shape))}] for the model's input {schema.describe()}",
        )
    if not single and array.shape[0] == 0:
        raise _invalid("inputs", "a batch needs at least one row")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _invalid("inputs", NOT_FINITE)
    return array


async def _await_result(
    app: FastAPI, pending: Pending, timeout: float, cold_start_timeout: float
) -> bytes:
    replies = app.state.client.replies
    deadline = time.monotonic() + timeout
    first = min(timeout, cold_start_timeout)
    try:
        raw: bytes = await asyncio.wait_for(asyncio.shield(pending.future), first)
        replies.discard(pending.task_id)
        return raw
    except asyncio.TimeoutError:
        pass
    model, version, task_id = pending.model, pending.version, pending.task_id
    stored = await replies.stored(task_id)
    if stored is not None:
        replies.discard(task_id)
        return stored
    ready = await asyncio.to_thread(_instance_ready, app, model, version)
    # A version being brought up (the scaler wants it, a worker is loading it) is waited
    # for up to the request's timeout: a load may take far longer than the cold-start
    # timeout, and predict.delay().get() would wait for it too.
    if not ready and not await asyncio.to_thread(_instance_coming, app, model, version):
        replies.discard(task_id)
        # The caller is answered now; no worker should run it later.
        await asyncio.to_thread(app.state.celery.control.revoke, task_id)
        raise HTTPException(
            503,
            detail=f"no instance of {model}/{version} became ready within "
            f"{cold_start_timeout:g} s (API_COLD_START_TIMEOUT_S) and none is being loaded; "
            "the request was withdrawn",
        )
    try:
        return await replies.wait(task_id, max(deadline - time.monotonic(), 0.001))
    except Exception as exc:
        detail = f"no answer from {model}/{version} within the timeout of {timeout:g} s"
        if isinstance(exc, InferenceError):  # Redis restarted and lost it
            detail = str(exc)
        raise HTTPException(504, detail=detail) from None


def _instance_coming(app: FastAPI, model: str, version: str) -> bool:
    """Whether the scaler wants an instance of this version or a worker is loading it."""
    label = keys.model_key_text(model, version)
    status = app.state.autoscaler.store.status() or {}
    fresh = time.time() - status.get("time", 0) < SCALER_STATUS_FRESH_S
    if fresh and status.get("desired", {}).get(label, 0) > 0:
        return True
    return any(
        (m["name"], m["version"]) == (model, version)
        for report in app.state.autoscaler.store.live_reports().values()
        for m in report.get("loading", [])
    )


def _instance_ready(app: FastAPI, model: str, version: str) -> bool:
    """Whether some worker reports this version loaded and its queue consumed."""
    queue = keys.queue_name(model, version)
    for report in app.state.autoscaler.store.live_reports().values():
        loaded = {(m["name"], m["version"]) for m in report.get("models", [])}
        if (model, version) in loaded and queue in report.get("queues", []):
            return True
    return False

"""One error hierarchy for the whole project.

Every error takes a single message argument so that Celery's JSON exception transport can
rebuild it in the producer (``cls(message)``): a task failure reaches the caller with the
same type and text that the worker raised.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError


class InferenceError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(InferenceError, ValueError):
    """A setting or a model config has a bad value; the message names the key and value."""


class InvalidNameError(InferenceError, ValueError):
    """A model name or version is malformed or points outside the repository."""


class UnknownModelError(InferenceError, LookupError):
    """No such model, or no such version of it; the message lists what exists."""


class RegistryUnavailableError(InferenceError):
    """No model registry in Redis: no worker or scaler has published the repository yet."""


class SchemaError(InferenceError, ValueError):
    """An input does not match the model's declared dtype and shape."""


class PayloadTooLargeError(InferenceError, ValueError):
    """A request body is larger than the configured limit."""


class ModelLoadError(InferenceError):
    """A model file could not be loaded (bad file, missing factory, warm-up failed)."""


class ModelLoadTimeoutError(ModelLoadError):
    """Loading took longer than ``load_timeout_seconds``."""


class InsufficientMemoryError(ModelLoadError):
    """A model did not fit in this worker's memory (its device ran out, or its cache is too
    small): another worker may hold it."""


class CacheCapacityError(InsufficientMemoryError):
    """A model does not fit the worker's cache even after evicting everything else."""


class ModelExecutionError(InferenceError):
    """The model raised while running a request, or returned something unusable."""


class RejectedMessageError(InferenceError):
    """A queued message was refused before decoding (disallowed content type)."""


class BrokerUnavailableError(InferenceError, ConnectionError):
    """A request was not queued: Redis could not be reached or refused it (out of memory,
    read-only). Raised by ``delay()``, or, for a request written before Redis answered, by
    ``get()``: Redis went away before acknowledging it and stayed away, so whether it was
    queued cannot be known; it was not sent twice."""


class RequestLostError(InferenceError, CeleryTimeoutError):
    """No answer within the caller's timeout, and Redis restarted after the request was
    queued: a Redis without persistence lost it."""


def describe_validation_error(exc: Any, *, prefix: str = "", upper: bool = False) -> str:
    """One line per bad field of a pydantic ``ValidationError``: ``key=value: problem``."""
    problems = []
    for err in exc.errors():
        key = ".".join(map(str, err["loc"])) or "config"
        key = prefix + (key.upper() if upper else key)
        problems.append(f"{key}={err.get('input')!r}: {err['msg']}")
    return "; ".join(problems)

"""Settings of every component, read from the environment here and nowhere else.

Units are in the names (``_s``, ``_ms``, ``_bytes``) except where SEED.md fixed a name
(``cache_size_gb``, ``load_timeout_seconds``). A bad value fails at start with the
environment variable and the value named.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.errors import ConfigError, describe_validation_error

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServingSettings(BaseSettings):
    """What producers and workers share: where Redis and the models are, wire limits."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    redis_url: str = DEFAULT_REDIS_URL
    # With REDIS_URL=sentinel://host:port;sentinel://host:port;...: the name the sentinels
    # monitor the primary under, and their own password if they have one.
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str | None = None
    # How long a producer's call tries again while no Redis answers before it refuses
    # (BrokerUnavailableError); none: 10 s with sentinels (a failover takes a few
    # seconds), 0 without (a lone Redis that is away is refused at once).
    publish_wait_s: float | None = Field(None, ge=0)
    # Results may live elsewhere; by default they share the broker's server.
    result_backend_url: str | None = None
    model_repository: Path = Path("model_repository")
    # Modules imported by workers so that they can register state-dict model factories.
    model_factory_modules: CommaList = Field(default_factory=list)
    max_payload_bytes: int = Field(16 * 1024 * 1024, gt=0)
    result_expires_s: int = Field(3600, gt=0)
    # A delivered message not acknowledged (and not renewed by a live worker) for this long
    # goes back to its queue: the time a dead worker's requests wait before redelivery.
    visibility_timeout_s: float = Field(30.0, gt=0)
    unacked_restore_interval_s: float = Field(2.0, gt=0)
    # How long a producer trusts its copy of the model registry.
    registry_cache_s: float = Field(2.0, ge=0)
    # Celery task events (task-received/-started/-succeeded) for Flower.
    task_events: bool = False

    _split = field_validator("model_factory_modules", mode="before")(_split_commas)

    @property
    def publish_wait(self) -> float:
        if self.publish_wait_s is not None:
            return self.publish_wait_s
        return 10.0 if self.redis_url.startswith("sentinel://") else 0.0

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url


class WorkerSettings(BaseSettings):
    """One worker process: its device, model cache and batching defaults."""

    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="ignore")

    # "auto" takes the GPU this process was given (CUDA_VISIBLE_DEVICES) or the CPU.
    device: str = "auto"
    # NVML's index of this worker's GPU, when CUDA_VISIBLE_DEVICES renumbers it.
    nvml_index: int | None = None
    # Intra-op threads per worker on CPU; 0 keeps torch's default (all cores).
    torch_threads: int = Field(0, ge=0)
    max_loaded_models: int = Field(5, ge=1)
    cache_size_gb: float = Field(10.0, gt=0)
    load_timeout_seconds: float = Field(300.0, gt=0)
    warmup_timeout_seconds: float = Field(60.0, gt=0)
    concurrent_loads: int = Field(2, ge=1)
    # A model whose load failed is not tried again on this worker for this long.
    failure_cooldown_seconds: float = Field(300.0, ge=0)
    report_interval_s: float = Field(1.0, gt=0)
    # Messages a worker holds at once (being batched, running, awaiting their ack):
    # room for one batch running and the next one filling.
    prefetch_count: int = Field(64, ge=1)
    # Batching defaults for models whose config says nothing.
    max_batch_size: int = Field(32, ge=1)
    max_batch_delay_ms: float = Field(0.0, ge=0)
    # Exit (warm shutdown) after Redis has been unreachable this long; 0 never. Workers the
    # scaler's local backend starts set it, so none outlives its stack.
    orphan_exit_s: float = Field(0.0, ge=0)
    # Health checks of every loaded model (ModelLoaderConfig's health_check_interval_seconds,
    # max_consecutive_failures, failure_cooldown_seconds; the scaler passes them on to the
    # workers it starts): a probe inference with the warm-up input within the timeout.
    health_check_interval_s: float = Field(30.0, gt=0)
    health_max_failures: int = Field(3, ge=1)
    health_probe_timeout_s: float = Field(10.0, gt=0)
    health_cooldown_s: float = Field(300.0, ge=0)
    # Models to serve from the start: "name" (every version) or "name:version".
    models: CommaList = Field(default_factory=list)

    _split = field_validator("models", mode="before")(_split_commas)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value == "auto" or value == "cpu" or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @property
    def cache_size_bytes(self) -> int:
        return int(self.cache_size_gb * 1024**3)


class ScalerSettings(BaseSettings):
    """The scaler process (``celery -A workers beat``): where its full config lives, and the
    settings most often changed without one."""

    model_config = SettingsConfigDict(env_prefix="SCALER_", extra="ignore")

    # A JSON file with AutoscalerConfig's fields (SEED.md's names, nested sections).
    config_file: Path | None = None
    tick_interval_s: float | None = Field(None, gt=0)
    backend: str | None = Field(None, pattern="^(local|static|nodes)$")
    scale_to_zero_delay: float | None = Field(None, ge=0)
    max_workers: int | None = Field(None, ge=1)
    cold_start_strategy: str | None = None
    # Where the local backend writes its workers' logs; none: discarded.
    log_dir: Path | None = None


class NodeSettings(BaseSettings):
    """A host's node agent (``celery -A workers node``): the workers it may run there."""

    model_config = SettingsConfigDict(env_prefix="NODE_", extra="ignore")

    # Its name in the scaler's placement and its workers' names; none: the hostname.
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    # Worker processes it runs at most; none: one per GPU, or on a host without one, 2.
    max_workers: int | None = Field(None, ge=1)
    report_interval_s: float = Field(1.0, gt=0)
    # Its workers exit (warm shutdown) after Redis has been unreachable this long.
    orphan_exit_s: float = Field(30.0, ge=0)
    log_dir: Path | None = None


class FlowerSettings(BaseSettings):
    """``celery -A workers flower`` (read by ``flowerconfig.py``): loopback unless configured."""

    model_config = SettingsConfigDict(env_prefix="FLOWER_", extra="ignore")

    address: str = "127.0.0.1"
    port: int = Field(5555, ge=1, le=65535)
    # "user:password" pairs, comma-separated; none means no authentication.
    basic_auth: CommaList = Field(default_factory=list)

    _split = field_validator("basic_auth", mode="before")(_split_commas)


class MetricsSettings(BaseSettings):
    """Metrics history in Redis: per-second buckets, rolled up into per-minute buckets."""

    model_config = SettingsConfigDict(env_prefix="METRICS_", extra="ignore")

    enabled: bool = True
    # How long each resolution is kept; the predictive policy's learning_window_hours needs
    # minute buckets at least that long.
    second_retention_s: int = Field(3600, ge=60)
    minute_retention_s: int = Field(90000, ge=3600)


class ApiSettings(BaseSettings):
    """The HTTP API (``python -m api``)."""

    model_config = SettingsConfigDict(env_prefix="API_", extra="ignore", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Bearer token of the management endpoints (scale, load, unload). Without one they
    # answer loopback clients only.
    token: str | None = None
    # The model of a POST /predict that names none (SEED.md's body has no model field).
    default_model: str = "example"
    default_timeout_s: float = Field(30.0, gt=0)
    max_timeout_s: float = Field(600.0, gt=0)
    # A request to a version with no loaded instance after this long answers 503, unless
    # the scaler wants one or a worker is loading it (then it waits up to its timeout).
    cold_start_timeout_s: float = Field(30.0, gt=0)


S = TypeVar("S", bound=BaseSettings)


def _build(cls: type[S]) -> S:
    try:
        return cls()
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = describe_validation_error(exc, prefix=prefix, upper=True)
        raise ConfigError(f"invalid configuration: {problems}") from None


@lru_cache(maxsize=1)
def serving_settings() -> ServingSettings:
    return _build(ServingSettings)


@lru_cache(maxsize=1)
def worker_settings() -> WorkerSettings:
    return _build(WorkerSettings)


@lru_cache(maxsize=1)
def scaler_settings() -> ScalerSettings:
    return _build(ScalerSettings)


@lru_cache(maxsize=1)
def node_settings() -> NodeSettings:
    return _build(NodeSettings)


@lru_cache(maxsize=1)
def flower_settings() -> FlowerSettings:
    return _build(FlowerSettings)


@lru_cache(maxsize=1)
def metrics_settings() -> MetricsSettings:
    return _build(MetricsSettings)


@lru_cache(maxsize=1)
def api_settings() -> ApiSettings:
    return _build(ApiSettings)

"""Configuration of the scaler: SEED.md's classes, field names and defaults.

On this queue-based shape an *instance* of a model version is one worker process that
consumes that version's queue with the model in its cache; ``min_instances_per_model`` and
``max_instances_per_model`` bound those, and ``scale_to_zero_delay`` of idleness takes a
version to zero instances (and, with the local backend, the fleet to zero processes).
Invalid values fail when the config is built, naming the field and the value.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError, describe_validation_error


class ScalingMode(str, enum.Enum):
    ZERO = "zero"  # idle model versions go to zero instances
    MIN = "min"  # idle model versions keep min_instances_per_model
    FIXED = "fixed"  # instances change only by hand (scale_model)


class ColdStartStrategy(str, enum.Enum):
    EAGER = "eager"  # load popular models when the scaler starts
    LAZY = "lazy"  # load a model on its first request
    HYBRID = "hybrid"  # a warm standby worker (torch imported) plus popular models preloaded


class ModelLoadingStrategy(str, enum.Enum):
    LAZY = "lazy"
    EAGER = "eager"


class LoadBalancingStrategy(str, enum.Enum):
    SHARED_QUEUE = "shared_queue"  # every instance pulls from the version's queue
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"
    LEAST_RESPONSE_TIME = "least_response_time"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    CONSISTENT_HASH = "consistent_hash"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            name = type(self).__name__
            raise ConfigError(f"{name}: {describe_validation_error(exc)}") from None


class ZeroScalingConfig(_Config):
    enabled: bool = True
    mode: ScalingMode = ScalingMode.ZERO
    cold_start_strategy: ColdStartStrategy = ColdStartStrategy.HYBRID
    scale_to_zero_delay: float = Field(300.0, ge=0)
    cold_start_timeout: float = Field(30.0, gt=0)
    warmup_timeout: float = Field(60.0, gt=0)
    max_loaded_models: int = Field(5, ge=1)
    model_ttl_seconds: float = Field(1800.0, gt=0)
    preload_popular_models: bool = True
    popularity_threshold: float = Field(10, ge=0)
    enable_predictive_scaling: bool = True
    learning_window_hours: float = Field(24, gt=0)
    prediction_horizon_minutes: float = Field(30, gt=0)

    @model_validator(mode="after")
    def _season(self) -> ZeroScalingConfig:
        if self.enable_predictive_scaling and self.learning_window_hours < 24:
            raise ValueError(
                f"learning_window_hours={self.learning_window_hours:g} is below the 24 hours "
                "a daily forecast learns from (or set enable_predictive_scaling=false)"
            )
        return self


class ModelLoaderConfig(_Config):
    loading_strategy: ModelLoadingStrategy = ModelLoadingStrategy.LAZY
    load_balancing_strategy: LoadBalancingStrategy = LoadBalancingStrategy.SHARED_QUEUE
    max_instances_per_model: int = Field(3, ge=1)
    min_instances_per_model: int = Field(1, ge=0)
    default_instances_per_model: int = Field(1, ge=1)
    concurrent_loads: int = Field(2, ge=1)
    # Memory kept free on a device when placing a version there, beyond what its loads
    # were measured to take.
    memory_margin_mb: float = Field(256.0, ge=0)
    load_timeout_seconds: float = Field(300.0, gt=0)
    warmup_timeout_seconds: float = Field(60.0, gt=0)
    enable_model_caching: bool = True
    cache_size_gb: float = Field(10.0, gt=0)
    prefetch_popular_models: bool = True
    health_check_interval_seconds: float = Field(30.0, gt=0)
    max_consecutive_failures: int = Field(3, ge=1)
    failure_cooldown_seconds: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> ModelLoaderConfig:
        if self.min_instances_per_model > self.max_instances_per_model:
            raise ValueError(
                f"min_instances_per_model={self.min_instances_per_model} is above "
                f"max_instances_per_model={self.max_instances_per_model}"
            )
        if self.default_instances_per_model > self.max_instances_per_model:
            raise ValueError(
                f"default_instances_per_model={self.default_instances_per_model} is above "
                f"max_instances_per_model={self.max_instances_per_model}"
            )
        return self


DEFAULT_ALERT_THRESHOLDS = {
    "memory_usage_percent": 85.0,
    "cpu_usage_percent": 80.0,
    "error_rate_percent": 5.0,
    "average_response_time_ms": 1000.0,
    # Not in SEED.md's example; the same rules cover them.
    "queue_depth": 1000.0,
    "cold_start_time_ms": 30000.0,
}


class AutoscalerConfig(_Config):
    enable_zero_scaling: bool = True
    enable_dynamic_loading: bool = True
    enable_metrics: bool = True
    zero_scaling: ZeroScalingConfig = Field(default_factory=ZeroScalingConfig)
    model_loading: ModelLoaderConfig = Field(default_factory=ModelLoaderConfig)
    alert_thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_ALERT_THRESHOLDS)
    )

    # Queue-shape settings (not in SEED.md): how often the scaler looks, how much queued
    # work one instance should carry, how long a lower recommendation must hold before
    # instances are taken away, and the fleet's size limits.
    tick_interval_s: float = Field(1.0, gt=0)
    target_load_per_instance: float = Field(32.0, gt=0)
    scale_down_stabilization_s: float = Field(30.0, ge=0)
    # local: worker processes on this host; nodes: on the hosts whose node agents report
    # (``celery -A workers node``); static: a fixed fleet, retargeted only.
    backend: str = Field("local", pattern="^(local|static|nodes)$")
    max_workers: int = Field(4, ge=1)
    # Seconds a worker may take from its process start to its first report.
    worker_start_timeout_s: float = Field(120.0, gt=0)
    leader_ttl_s: float = Field(5.0, gt=0)
    # Alerts: the window their values are taken over, how long a firing alert stays quiet
    # before it is sent again, and an optional webhook that receives every event as JSON.
    alert_window_seconds: int = Field(60, ge=1)
    # An alert fires once its condition has held this long (Prometheus's ``for:``), and the
    # rules computed from requests judge a version over this many requests at least.
    alert_for_seconds: float = Field(30.0, ge=0)
    alert_min_samples: int = Field(10, ge=1)
    alert_cooldown_seconds: float = Field(300.0, ge=0)
    alert_webhook_url: str | None = Field(None, pattern="^https?://")
    alert_webhook_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _alert_keys(self) -> AutoscalerConfig:
        from monitoring.alerts import check_thresholds

        check_thresholds(self.alert_thresholds)
        if self.zero_scaling.enable_predictive_scaling and not self.enable_metrics:
            raise ValueError(
                "enable_predictive_scaling needs enable_metrics (the forecasts read the "
                "metrics history); set zero_scaling.enable_predictive_scaling=false"
            )
        return self

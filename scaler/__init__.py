"""The scaler: configuration, the pure policy, actuators and the beat glue.

SEED.md's public names live here: ``Autoscaler``, ``ZeroScaler``, ``DynamicModelLoader``,
the config classes and the enums.
"""

from typing import Any

from scaler.config import (
    AutoscalerConfig,
    ColdStartStrategy,
    LoadBalancingStrategy,
    ModelLoaderConfig,
    ModelLoadingStrategy,
    ScalingMode,
    ZeroScalingConfig,
)

__all__ = [
    "Autoscaler",
    "AutoscalerConfig",
    "ColdStartStrategy",
    "DynamicModelLoader",
    "LoadBalancingStrategy",
    "ModelLoaderConfig",
    "ModelLoadingStrategy",
    "ScalingMode",
    "ZeroScaler",
    "ZeroScalingConfig",
]


def __getattr__(name: str) -> Any:
    # The API classes import the Celery app; load them on first use only.
    if name in ("Autoscaler", "ZeroScaler", "DynamicModelLoader"):
        from scaler import autoscaler

        return getattr(autoscaler, name)
    raise AttributeError(f"module 'scaler' has no attribute {name!r}")

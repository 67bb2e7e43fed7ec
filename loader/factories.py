"""Named module builders for the state-dict format.

A state dict holds tensors only; the class that receives them is chosen by the operator,
never by the file. Operators register their own with ``register_factory`` in a module
listed in ``MODEL_FACTORY_MODULES``, which workers import at start.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from common.errors import ConfigError, ModelLoadError
from loader import example_models

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_lock = threading.Lock()
_factories: dict[str, Factory] = {
    "tiny_mlp": example_models.TinyMLP,
    "small_cnn": example_models.SmallCNN,
    "linear": example_models.Linear,
    "flaky": example_models.Flaky,
}


def register_factory(name: str) -> Callable[[F], F]:
    """Decorator: ``@register_factory("resnet18")`` on a function or class returning a module."""

    def decorate(factory: F) -> F:
        with _lock:
            _factories[name] = factory
        return factory

    return decorate


def get_factory(name: str) -> Factory:
    with _lock:
        factory = _factories.get(name)
        known = sorted(_factories)
    if factory is None:
        raise ModelLoadError(
            f"no model factory named {name!r} is registered; registered: {', '.join(known)} "
            "(register one with loader.factories.register_factory in a module listed in "
            "MODEL_FACTORY_MODULES)"
        )
    return factory


def import_factory_modules(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"MODEL_FACTORY_MODULES={module!r}: cannot import it: {exc}") from exc

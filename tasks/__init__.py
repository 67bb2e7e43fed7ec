"""Celery tasks: ``predict`` and ``predict_batch``, their routing, codec and worker glue.

``from tasks import predict`` gives the task; the module that defines it is imported on
first use so that ``celeryconfig`` can import the codec without a circular import.
"""

from typing import Any

__all__ = ["predict", "predict_batch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tasks import prediction

        return getattr(prediction, name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")

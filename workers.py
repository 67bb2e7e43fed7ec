"""The Celery app: ``celery -A workers worker``, ``celery -A workers beat``, ``... flower``.

A worker started from here serves the model queues it consumes (``-Q model.<name>.<version>``
or ``WORKER_MODELS``) through the model-serving bootstep in ``tasks.serving``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.utils.objects import cached_property


class InferenceApp(Celery):
    @cached_property
    def AsyncResult(self) -> Any:
        # Results of this project's requests arrive on the process's reply channel.
        return self.subclass_with_self("tasks.broker:InferenceResult")


def create_app(main: str = "workers") -> Celery:
    app = InferenceApp(main, include=["tasks.prediction"])
    app.config_from_object("celeryconfig")
    app.steps["worker"].add("tasks.serving:ModelServing")
    return app


app = create_app()

"""The Celery app: ``celery -A workers worker``, ``celery -A workers beat``, ``... flower``.

A worker started from here serves the model queues it consumes (``-Q model.<name>.<version>``
or ``WORKER_MODELS``) through the model-serving bootstep in ``tasks.serving``.
"""

from __future__ import annotations

from celery import Celery


def create_app(main: str = "workers") -> Celery:
    app = Celery(main, include=["tasks.prediction"])
    app.config_from_object("celeryconfig")
    app.steps["worker"].add("tasks.serving:ModelServing")
    return app


app = create_app()

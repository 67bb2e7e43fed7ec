"""Running a prediction inside the calling process (``predict(...)``, ``predict.apply()``)."""

from __future__ import annotations

import queue
import threading
from typing import Any

from common.settings import serving_settings, worker_settings
from loader.batching import Outcome
from loader.server import ModelServer

_lock = threading.Lock()
_server: ModelServer | None = None
_results: dict[int, queue.SimpleQueue[Outcome]] = {}


def _complete(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        _results.pop(id(outcome.item.ticket)).put(outcome)


def _local_server() -> ModelServer:
    global _server
    with _lock:
        if _server is None:
            _server = ModelServer(serving_settings(), worker_settings(), complete=_complete)
            _server.start()
        return _server


def run_inline(model: str, inputs: Any, version: str | None, *, single: bool) -> Any:
    server = _local_server()
    key = server.resolve(model, version)
    ticket = object()
    box: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    _results[id(ticket)] = box
    server.submit(key, inputs, single=single, ticket=ticket)
    outcome = box.get()
    if outcome.error is not None:
        raise outcome.error
    return outcome.value

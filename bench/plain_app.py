"""The baseline a user writes first: a plain Celery task, the model in a module global,
one task per input, inputs and outputs as JSON lists, Celery's default worker settings."""

from __future__ import annotations

from typing import Any

from celery import Celery

from common.settings import serving_settings

app = Celery("plain", broker=serving_settings().redis_url, backend=serving_settings().redis_url)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

_models: dict[str, Any] = {}


def _model(name: str) -> Any:
    if name not in _models:
        import torch

        from loader.formats import load_module
        from loader.repository import ModelRepository

        torch.set_num_threads(1)
        repo = ModelRepository(serving_settings().model_repository)
        spec = repo.spec(name, "v1")
        _models[name] = load_module(spec, repo.model_file(name, "v1", spec), torch.device("cpu"))
    return _models[name]


@app.task(name="plain.predict")
def plain_predict(model: str, inputs: list[Any]) -> list[float]:
    import torch

    with torch.inference_mode():
        return _model(model)(torch.tensor([inputs], dtype=torch.float32))[0].tolist()  # type: ignore[no-any-return]

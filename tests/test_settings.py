"""Settings fail at start with the variable and the value named."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.settings import ServingSettings, WorkerSettings, _build

pytestmark = pytest.mark.timeout(30)


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MAX_LOADED_MODELS", "0")
    monkeypatch.setenv("WORKER_DEVICE", "tpu")
    with pytest.raises(ConfigError) as info:
        _build(WorkerSettings)
    message = str(info.value)
    assert "WORKER_MAX_LOADED_MODELS='0'" in message
    assert "WORKER_DEVICE='tpu'" in message


def test_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MODELS", "tiny_mlp, linear:v2")
    monkeypatch.setenv("MODEL_FACTORY_MODULES", "a.b,c")
    assert _build(WorkerSettings).models == ["tiny_mlp", "linear:v2"]  # type: ignore[attr-defined]
    assert _build(ServingSettings).model_factory_modules == ["a.b", "c"]  # type: ignore[attr-defined]


def test_negative_timeouts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIBILITY_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError, match=r"VISIBILITY_TIMEOUT_S='-1'"):
        _build(ServingSettings)

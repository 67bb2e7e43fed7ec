"""Model factories used by the tests' repositories (imported by workers via
MODEL_FACTORY_MODULES=tests.factories)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from loader.factories import register_factory


@register_factory("recorder")
class Recorder(nn.Module):
    """Returns its inputs doubled; sleeps per batch and records each row's first value.

    The record (one line per executed row, appended to ``log_path``) lets a test count
    executions across worker processes: lost requests and duplicates.
    """

    def __init__(self, features: int = 4, delay_s: float = 0.0, log_path: str = "") -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((features,), 2.0))
        self.delay_s = delay_s
        self.log_path = log_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.log_path:
            rows = "".join(f"{int(v)} {x.shape[0]} {os.getpid()}\n" for v in x[:, 0].tolist())
            with open(self.log_path, "a") as log:
                log.write(rows)
        return x * self.scale


@register_factory("picky")
class Picky(nn.Module):
    """Fails on any batch that holds a negative first feature: a model that raises."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < 0).any()):
            raise ValueError("negative first feature")
        return x * self.weight


@register_factory("slowed")
class Slowed(Recorder):
    """A recorder that sleeps ``RECORDER_EXTRA_DELAY_S`` more per batch in the worker whose
    environment says so: one instance slowed on purpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = float(os.environ.get("RECORDER_EXTRA_DELAY_S", "0") or 0)
        if extra:
            time.sleep(extra)
        return super().forward(x)


@register_factory("slow_loading")
class SlowLoading(Recorder):
    """A recorder whose construction takes ``SLOW_LOAD_S`` seconds in the worker whose
    environment says so: a load that outlasts a cold-start timeout."""

    def __init__(self, features: int = 4, **kwargs: Any) -> None:
        time.sleep(float(os.environ.get("SLOW_LOAD_S", "0") or 0))
        super().__init__(features, **kwargs)

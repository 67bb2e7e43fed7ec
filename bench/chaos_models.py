"""Models of the fault suite (``MODEL_FACTORY_MODULES=bench.chaos_models``).

``echo_mlp`` is tiny_mlp's network whose first output is the request's id (its first input):
a caller can tell its own answer from anyone else's. Every row it answers is appended to
``log_path`` as ``<id> <pid>``, after the forward pass, so that a row counted twice ran twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from loader.example_models import TinyMLP
from loader.factories import register_factory

FEATURES = 64


@register_factory("echo_mlp")
class EchoMLP(TinyMLP):
    """With ``raises``, a batch holding a row whose second input is negative raises: a model
    that fails on some inputs."""

    def __init__(self, features: int = FEATURES, log_path: str = "", raises: bool = False) -> None:
        super().__init__(features)
        self.log_path = log_path
        self.raises = raises

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raises and bool((x[:, 1] < 0).any()):
            raise ValueError("negative second input")
        out = self.net(x)
        out = torch.cat([x[:, :1], out[:, 1:]], dim=1)
        if self.log_path:
            pid = os.getpid()
            rows = "".join(f"{int(v)} {pid}\n" for v in x[:, 0].tolist())
            with open(self.log_path, "a") as log:
                log.write(rows)
        return out


@register_factory("oom_once")
class OomOnce(EchoMLP):
    """Its first construction, in whichever worker comes first, runs out of memory (a
    device too full on that worker only); every later one loads."""

    def __init__(self, features: int = FEATURES, marker: str = "", **kwargs: Any) -> None:
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise torch.OutOfMemoryError("out of memory on this worker (injected)")
        super().__init__(features, **kwargs)


def write_model(root: Path, name: str, factory: str, **kwargs: Any) -> None:
    """``name/v1`` for ``factory``: float32[64] -> 10, batches of up to 64."""
    folder = root / name / "v1"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = EchoMLP(FEATURES)
    torch.save(module.state_dict(), folder / "model.pt")
    spec = {
        "format": "state_dict",
        "file": "model.pt",
        "factory": factory,
        "factory_kwargs": {"features": FEATURES, **kwargs},
        "input": {"dtype": "float32", "shape": [FEATURES]},
        "batching": {"max_batch_size": 64, "max_batch_delay_ms": 2},
    }
    (folder / "model.json").write_text(json.dumps(spec, indent=2) + "\n")

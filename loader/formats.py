"""Loading a model version's file without running code from it.

- state_dict: ``torch.load(weights_only=True)`` into a module built by a registered factory.
- export: a ``torch.export`` archive, refused if it holds any pickled payload; torch's own
  fallbacks to unrestricted unpickling are disabled for the process.
- torchscript: TorchScript archives hold TorchScript code and tensors, not Python pickles.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import InsufficientMemoryError, ModelLoadError
from loader.factories import get_factory
from loader.spec import ModelFormat, ModelSpec

logger = logging.getLogger(__name__)


def harden_torch_load() -> None:
    """Make every ``torch.load`` in this process weights-only, whatever its caller asked."""
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def prewarm(formats: set[ModelFormat]) -> None:
    """Pay a format's first-use cost now: torch.export's first load imports its
    serialisation (seconds, against a quarter of a second for the next), so a worker that
    may load such a model does it once, at start, on a tiny program of its own."""
    if ModelFormat.EXPORT not in formats:
        return
    with _EXPORT_LOCK:
        try:
            program = torch.export.export(nn.Linear(1, 1), (torch.zeros(1, 1),))
            archive = io.BytesIO()
            torch.export.save(program, archive)
            archive.seek(0)
            torch.export.load(archive).module()
        except Exception as exc:  # only a warm-up: the real loads report their own errors
            logger.warning("torch.export warm-up failed: %s", exc)


# torch.export imports its modules lazily, and two threads importing them at once can see
# them half made ("KeyError: 'torch._dynamo'"): its loads go one at a time.
_EXPORT_LOCK = threading.Lock()


def _check_export_archive(path: Path) -> None:
    """Refuse a torch.export archive that would unpickle anything while loading."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{path.name} is not a torch.export archive: {exc}") from None
    with archive:
        for member in archive.namelist():
            if not member.endswith("_config.json") or "/data/" not in member:
                continue
            config = json.loads(archive.read(member)).get("config", {})
            for fqn, payload in config.items():
                name = str(payload.get("path_name", ""))
                if payload.get("use_pickle") or not name.startswith(("weight_", "tensor_")):
                    raise ModelLoadError(
                        f"{path.name}: entry {fqn!r} ({name}) is a pickled object; only "
                        "plain tensors are accepted"
                    )


def load_module(spec: ModelSpec, path: Path, device: torch.device) -> nn.Module:
    """Build the module of one model version on ``device``, in eval mode."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path.name} is missing")
    harden_torch_load()
    try:
        module: Any
        if spec.format is ModelFormat.STATE_DICT:
            assert spec.factory is not None
            module = get_factory(spec.factory)(**spec.factory_kwargs)
            state = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(state, dict):
                raise ModelLoadError(
                    f"{path.name} holds a {type(state).__name__}, not a state dict"
                )
            module.load_state_dict(state, strict=True)
            module.to(device)
        elif spec.format is ModelFormat.EXPORT:
            _check_export_archive(path)
            # An exported program is traced in inference mode already; it has no eval().
            with _EXPORT_LOCK:
                module = torch.export.load(str(path)).module()
            module.to(device)
            return module
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=device)
    except ModelLoadError:
        raise
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise InsufficientMemoryError(
            f"cannot load {path.name} ({spec.format.value}): out of memory on {device}: {exc}"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path.name} ({spec.format.value}): {exc}") from exc
    if hasattr(module, "eval"):
        module.eval()
    return module


def module_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers: what the model holds in memory while cached."""
    seen: set[int] = set()
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    if hasattr(module, "state_dict"):
        tensors += [t for t in module.state_dict().values() if isinstance(t, torch.Tensor)]
    for tensor in tensors:
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total

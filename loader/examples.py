"""Write the example models into a repository: ``python -m loader.examples <root>``.

- ``tiny_mlp/v1``: TorchScript, float32[64] -> 10.
- ``small_cnn/v1``: torch.export, float32[3, 64, 64] -> 10, any batch size.
- ``linear/v1`` and ``linear/v2``: state dicts for the ``linear`` factory, float32[8] -> 4,
  with different weights (v1 is the default version).
- ``example/v1``: SEED.md's model name, float32[3] -> 2; the HTTP API's default model.

``write_flaky`` adds ``flaky/v1`` (float32[4] -> doubled), which fails while a given file
exists: the demo turns its health probe sick with it.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from loader.example_models import Flaky, Linear, SmallCNN, TinyMLP

EXAMPLE_MODELS = ("tiny_mlp", "small_cnn", "linear", "example")


def _write_spec(folder: Path, spec: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(spec, indent=2) + "\n")


def write_tiny_mlp(root: Path) -> None:
    torch.manual_seed(0)
    folder = root / "tiny_mlp" / "v1"
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyMLP().eval()).save(str(folder / "model.pt"))
    _write_spec(
        folder,
        {
            "format": "torchscript",
            "file": "model.pt",
            "input": {"dtype": "float32", "shape": [64]},
            "batching": {"max_batch_size": 64, "max_batch_delay_ms": 0},
            "description": "MLP 64 -> 256 -> 256 -> 10",
        },
    )


def write_small_cnn(root: Path) -> None:
    torch.manual_seed(1)
    folder = root / "small_cnn" / "v1"
    folder.mkdir(parents=True, exist_ok=True)
    model = SmallCNN().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.zeros(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    _write_spec(
        folder,
        {
            "format": "export",
            "file": "model.pt2",
            "input": {"dtype": "float32", "shape": [3, 64, 64]},
            "batching": {"max_batch_size": 32, "max_batch_delay_ms": 0},
            "description": "ResNet-style CNN, stages of 32/64/128 channels",
        },
    )


def _write_affine(
    root: Path, name: str, version: str, *, seed: int, features: tuple[int, int], about: str
) -> None:
    torch.manual_seed(seed)
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(Linear(*features).state_dict(), folder / "model.pt")
    _write_spec(
        folder,
        {
            "format": "state_dict",
            "file": "model.pt",
            "factory": "linear",
            "factory_kwargs": {"in_features": features[0], "out_features": features[1]},
            "input": {"dtype": "float32", "shape": [features[0]]},
            "batching": {"max_batch_size": 32, "max_batch_delay_ms": 0},
            "description": about,
        },
    )


def write_linear(root: Path) -> None:
    for seed, version in ((2, "v1"), (3, "v2")):
        _write_affine(
            root, "linear", version, seed=seed, features=(8, 4),
            about=f"affine 8 -> 4, weights of seed {seed}",
        )  # fmt: skip
    (root / "linear" / "model.json").write_text(json.dumps({"default_version": "v1"}) + "\n")


def write_example(root: Path) -> None:
    """SEED.md's ``example`` model: the HTTP API's default, float32[3] -> 2."""
    _write_affine(
        root, "example", "v1", seed=1, features=(3, 2),
        about="affine 3 -> 2 (the API's default model)",
    )  # fmt: skip


def write_flaky(root: Path | str, fail_path: Path | str) -> None:
    folder = Path(root) / "flaky" / "v1"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(Flaky(4).state_dict(), folder / "model.pt")
    _write_spec(
        folder,
        {
            "format": "state_dict",
            "file": "model.pt",
            "factory": "flaky",
            "factory_kwargs": {"features": 4, "fail_path": str(fail_path)},
            "input": {"dtype": "float32", "shape": [4]},
            "description": f"doubles its input; fails while {fail_path} exists",
        },
    )


def write_examples(root: Path | str) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_mlp(root)
    write_small_cnn(root)
    write_linear(root)
    write_example(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="model_repository")
    args = parser.parse_args()
    root = write_examples(args.root)
    print(f"wrote {', '.join(EXAMPLE_MODELS)} into {root}")


if __name__ == "__main__":
    main()

"""The example models' module classes (also the built-in state-dict factories)."""

from __future__ import annotations

import os

import torch
from torch import nn


class TinyMLP(nn.Module):
    """64 -> 256 -> 256 -> 10."""

    def __init__(self, in_features: int = 64, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SmallCNN(nn.Module):
    """3x64x64 -> three stride-2 stages (32, 64, 128 channels, one residual block each)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            layers.append(ResidualBlock(width))
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Linear(nn.Module):
    """A single affine layer: small enough that versions are easy to tell apart."""

    def __init__(self, in_features: int = 8, out_features: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Flaky(nn.Module):
    """Doubles its input; raises while the file ``fail_path`` (or ``FLAKY_FAIL_PATH`` in this
    worker's environment) exists: a model turning sick on demand, in every worker or in one
    (the demo's failing health probe)."""

    def __init__(self, features: int = 4, fail_path: str = "") -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((features,), 2.0))
        self.fail_path = fail_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.fail_path or os.environ.get("FLAKY_FAIL_PATH", "")
        if path and os.path.exists(path):
            raise RuntimeError(f"{path} exists: failing on purpose")
        return x * self.scale

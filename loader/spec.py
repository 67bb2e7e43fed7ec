"""What a model version declares about itself: ``<root>/<name>/<version>/model.json``.

A model may also have ``<root>/<name>/model.json`` with its default version (and, later,
traffic weights and scaling overrides).
"""

from __future__ import annotations

import enum
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.errors import InvalidNameError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Numeric dtypes only: an object dtype could never travel safely.
ALLOWED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
)


# One rule for every path (the HTTP API, predict.delay): NaN or inf in only comes out as NaN.
NOT_FINITE = "inputs must be finite numbers (NaN or inf found)"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidNameError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: object) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.match(version) or ".." in version:
        raise InvalidNameError(
            f"invalid model version {version!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return version


class ModelFormat(str, enum.Enum):
    TORCHSCRIPT = "torchscript"
    EXPORT = "export"
    STATE_DICT = "state_dict"


class InputSchema(BaseModel):
    """One input row: dtype and shape without the batch dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = "float32"
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {sorted(ALLOWED_DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim <= 0 for dim in value):
            raise ValueError(f"shape {list(value)} has a dimension below 1")
        return value

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1)
    max_batch_delay_ms: float | None = Field(None, ge=0)


class ModelSpec(BaseModel):
    """The config of one model version."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format: ModelFormat
    file: str = "model.pt"
    input: InputSchema
    # state_dict format: the registered factory that builds the module, and its arguments.
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    batching: BatchingConfig = BatchingConfig()
    # Run one zero-filled row through the model after loading (first-request latency and a
    # check that the model runs at all).
    warmup: bool = True
    # Per-model scaling overrides, read by the scaler.
    scaling: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in ("", ".", ".."):
            raise ValueError(f"file {value!r} must be a plain file name inside the version folder")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.format is ModelFormat.STATE_DICT and not self.factory:
            raise ValueError("format 'state_dict' needs 'factory', the registered module builder")


class ModelConfig(BaseModel):
    """Model-wide settings shared by its versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_version: str | None = None
    # Version -> weight; used when a request names no version (traffic split).
    traffic: dict[str, float] = Field(default_factory=dict)
    description: str = ""

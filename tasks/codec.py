"""The wire codec: msgpack with raw array bytes, registered with kombu as ``tensor``.

An array travels as a msgpack extension whose payload is a small header (dtype and shape)
followed by the array's bytes, so encoding and decoding cost one copy and no text parsing.
Only numeric dtypes are accepted on decode; nothing on this path can construct arbitrary
objects (no pickle, no object dtype). Small JSON inputs use kombu's ``json`` serializer.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Any

import msgpack
import numpy as np
from kombu.serialization import register

from common.errors import SchemaError
from loader.spec import ALLOWED_DTYPES

SERIALIZER = "tensor"
CONTENT_TYPE = "application/x-inference-tensor"
EXT_NDARRAY = 1
EXT_TORCH = 2
_HEADER = struct.Struct("<H")
# The dtypes that may travel, by the wire name of their byte order and kind ("<f4").
_WIRE_DTYPES = {
    d.str: d for d in (np.dtype(name) for name in ALLOWED_DTYPES) for d in (d, d.newbyteorder())
}


_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _pack_array(code: int, array: np.ndarray) -> msgpack.ExtType:
    wire = array.dtype.str
    if wire not in _WIRE_DTYPES:
        raise SchemaError(
            f"array dtype {array.dtype} cannot travel; use one of {sorted(ALLOWED_DTYPES)}"
        )
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    shape = array.shape
    header = _headers.get((wire, shape))
    if header is None:
        packed = msgpack.packb([wire, list(shape)])
        header = _HEADER.pack(len(packed)) + packed
        if len(_headers) < 1024:  # the shapes a model sees are few
            _headers[(wire, shape)] = header
    return msgpack.ExtType(code, header + array.tobytes())


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(EXT_NDARRAY, obj)
    if isinstance(obj, np.generic):
        return obj.item()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _pack_array(EXT_TORCH, obj.detach().cpu().numpy())
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} (only JSON-like values and arrays)")


# Array headers seen, checked: header bytes -> (dtype, shape, byte count).
_read_headers: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int]] = {}


def _array_header(header: bytes) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    known = _read_headers.get(header)
    if known is not None:
        return known
    dtype_str, shape = msgpack.unpackb(header)
    dtype = _WIRE_DTYPES.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None:
        raise ValueError(f"array dtype {dtype_str!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"array shape {shape!r} is not a list of sizes")
    known = (dtype, tuple(shape), math.prod(shape) * dtype.itemsize)
    if len(_read_headers) < 1024:  # the shapes a model sees are few
        _read_headers[header] = known
    return known


def _ext_hook(code: int, data: bytes) -> Any:
    if code not in (EXT_NDARRAY, EXT_TORCH):
        raise ValueError(f"unknown msgpack extension {code}")
    (size,) = _HEADER.unpack_from(data)
    offset = _HEADER.size + size
    dtype, shape, nbytes = _array_header(data[_HEADER.size : offset])
    if nbytes != len(data) - offset:
        raise ValueError(
            f"array of {dtype} {list(shape)} does not match its {len(data) - offset} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
    array = array.reshape(shape)
    if code == EXT_TORCH:
        import torch

        return torch.from_numpy(array.copy())
    return array


def dumps(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def loads(data: bytes | str) -> Any:
    if isinstance(data, str):
        data = data.encode("latin-1")
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def is_array(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def choose_serializer(inputs: Any) -> str:
    """Arrays travel as raw bytes; plain lists and numbers as JSON."""
    if is_array(inputs):
        return SERIALIZER
    if isinstance(inputs, list | tuple) and inputs and is_array(inputs[0]):
        return SERIALIZER
    return "json"


def describe(inputs: Any) -> str:
    """A short text for logs and events: the kind, dtype and shape, never the values."""
    if is_array(inputs):
        dtype = str(inputs.dtype).replace("torch.", "")
        return f"<{type(inputs).__name__} {dtype}{list(inputs.shape)}>"
    if isinstance(inputs, list | tuple):
        return f"<list of {len(inputs)}>"
    return f"<{type(inputs).__name__}>"


def payload_bytes(inputs: Any) -> int:
    """A cheap lower bound of the encoded size, to refuse huge inputs before encoding them:
    the bytes of arrays, and for lists two bytes per number (a digit and a separator) of
    the shape their first elements describe."""
    if is_array(inputs):
        return (
            int(inputs.nbytes)
            if isinstance(inputs, np.ndarray)
            else int(inputs.numel() * inputs.element_size())
        )
    if isinstance(inputs, list | tuple) and inputs:
        if is_array(inputs[0]):
            return sum(payload_bytes(x) for x in inputs)
        count, first = 1, inputs
        while isinstance(first, list | tuple) and first:
            count *= len(first)
            first = first[0]
        return 2 * count
    return 0


def register_codec() -> None:
    register(SERIALIZER, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary")


register_codec()

"""The wire codec: arrays round-trip bit for bit; nothing but numbers can be decoded."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from loader.spec import ALLOWED_DTYPES
from tasks import codec

pytestmark = pytest.mark.timeout(60)

dtypes = st.sampled_from(sorted(ALLOWED_DTYPES)).map(np.dtype)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)))
def test_arrays_round_trip_exactly(array: np.ndarray) -> None:
    decoded = codec.loads(codec.dumps({"inputs": array, "n": [1, 2.5, "x", None]}))
    out = decoded["inputs"]
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes()
    assert decoded["n"] == [1, 2.5, "x", None]


def test_torch_tensors_come_back_as_tensors() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = codec.loads(codec.dumps([tensor]))[0]
    assert isinstance(out, torch.Tensor) and torch.equal(out, tensor)


def test_object_arrays_cannot_travel() -> None:
    with pytest.raises(Exception, match="cannot travel"):
        codec.dumps(np.array([object()], dtype=object))


def test_a_forged_extension_is_refused() -> None:
    header = msgpack.packb(["|O", [1]])
    forged = msgpack.ExtType(codec.EXT_NDARRAY, codec._HEADER.pack(len(header)) + header + b"x" * 8)
    with pytest.raises(ValueError, match="not allowed"):
        codec.loads(msgpack.packb(forged))
    header = msgpack.packb(["<f4", [100]])
    short = msgpack.ExtType(codec.EXT_NDARRAY, codec._HEADER.pack(len(header)) + header + b"x" * 8)
    with pytest.raises(ValueError, match="does not match"):
        codec.loads(msgpack.packb(short))
    with pytest.raises(ValueError, match="unknown msgpack extension"):
        codec.loads(msgpack.packb(msgpack.ExtType(9, b"")))


def test_the_producer_picks_the_codec_from_the_inputs() -> None:
    assert codec.choose_serializer([1.0, 2.0]) == "json"
    assert codec.choose_serializer(np.zeros(3, np.float32)) == codec.SERIALIZER
    assert codec.choose_serializer([np.zeros(3, np.float32)]) == codec.SERIALIZER
    assert codec.choose_serializer(torch.zeros(3)) == codec.SERIALIZER
    assert codec.payload_bytes(np.zeros(10, np.float32)) == 40
    assert codec.payload_bytes(torch.zeros(10, dtype=torch.float64)) == 80

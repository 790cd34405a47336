"""Job records through msgpack: arrays come back exactly as the local ``tensor.tolist()``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from pipeq.core import codec
from pipeq.core.codec import ArrayPayload
from pipeq.worker.model.wire import array_payload, to_wire


def round_trip(value: Any) -> Any:
    """What a producer reads back after the worker stored ``value`` as a result."""
    return codec.decode(codec.encode({"result": to_wire(value)}))["result"]


TENSORS = {
    "float32": torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)),
    "float32-special": torch.tensor([0.1, -0.0, 1e-45, 3.4e38, math.inf, -math.inf]),
    "float64": torch.tensor([[0.1, 1 / 3], [2.5e-300, -7.0]], dtype=torch.float64),
    "int64": torch.tensor([[0, -1, 2**62], [-(2**63), 2**63 - 1, 7]], dtype=torch.int64),
    "int32": torch.tensor([1, -2, 3], dtype=torch.int32),
    "uint8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([[True, False], [False, True]]),
    "0-d float": torch.tensor(3.25),
    "0-d int": torch.tensor(-9, dtype=torch.int64),
    "0-d bool": torch.tensor(True),
    "empty": torch.zeros(0),
    "empty 2-d": torch.zeros(0, 384),
    "empty inner": torch.zeros(3, 0, dtype=torch.int64),
    "token embeddings": torch.randn(1, 7, 384, generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("name", list(TENSORS))
def test_tensor_round_trip_equals_tolist(name: str) -> None:
    tensor = TENSORS[name]
    got = round_trip(tensor)
    expected = tensor.tolist()
    assert got == expected
    # Same Python types too (bool stays bool, int stays int): == alone would let 1 == True.
    assert _types(got) == _types(expected)


def test_nan_round_trips() -> None:
    got = round_trip(torch.tensor([math.nan, 1.0]))
    assert math.isnan(got[0]) and got[1] == 1.0


def test_half_precision_becomes_float32_values() -> None:
    tensor = torch.tensor([0.1, 2.5, -3.0], dtype=torch.float16)
    assert round_trip(tensor) == tensor.float().tolist()


def test_numpy_arrays_and_scalars() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert round_trip(array) == array.tolist()
    assert round_trip({"score": np.float32(0.5), "index": np.int64(3)}) == {
        "score": 0.5, "index": 3}
    non_contiguous = np.arange(20, dtype=np.int64).reshape(4, 5).T
    assert round_trip(non_contiguous) == non_contiguous.tolist()
    big_endian = np.array([1.5, -2.0], dtype=">f8")
    assert round_trip(big_endian) == [1.5, -2.0]


@pytest.mark.parametrize("name", ["float32", "int64", "bool", "0-d float", "empty 2-d"])
def test_numpy_return_when_not_as_list(name: str) -> None:
    tensor = TENSORS[name]
    got = codec.decode(codec.encode(to_wire(tensor, tensors_as_list=False)))
    assert isinstance(got, np.ndarray)
    assert got.shape == tuple(tensor.shape)
    assert got.dtype == tensor.numpy().dtype
    np.testing.assert_array_equal(got, tensor.numpy())


def test_nested_results_keep_their_structure() -> None:
    result = [{"label": "positive", "score": 0.75, "ids": torch.tensor([1, 2])},
              {"label": "negative", "score": 0.25, "span": (0, 4), "extra": None}]
    assert round_trip(result) == [
        {"label": "positive", "score": 0.75, "ids": [1, 2]},
        {"label": "negative", "score": 0.25, "span": [0, 4], "extra": None}]


def test_payload_is_compact_and_short_in_reprs() -> None:
    tensor = TENSORS["token embeddings"]
    payload = array_payload(tensor)
    assert repr(payload) == "ArrayPayload(float32, shape=(1, 7, 384))"
    size = len(codec.encode(payload))
    assert size < tensor.numel() * 4 + 64  # raw bytes plus a small header, not JSON text


def test_payload_decodes_without_numpy_for_lists() -> None:
    payload = ArrayPayload("int64", (2, 2), np.array([[1, 2], [3, 4]], "<i8").tobytes())
    assert payload.to_python() == [[1, 2], [3, 4]]


def test_unencodable_value_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="cannot encode set in a pipeq result"):
        codec.encode({"result": {1, 2}})
    with pytest.raises(TypeError, match="pipeline returned a set, which pipeq cannot carry"):
        to_wire({1, 2})


def _types(value: Any) -> Any:
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__

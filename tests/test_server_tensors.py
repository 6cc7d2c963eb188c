"""Open Inference Protocol tensor conversion: round trips, the typed path, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.api import grpc_predict_v2_pb2 as pb
from gateway.server.tensors import DATATYPES, input_array, inputs_from_request, output_tensor, require_finite
from models.errors import InvalidArgumentError

InputTensor = pb.ModelInferRequest.InferInputTensor


def _raw_request(**arrays: tuple[str, np.ndarray]) -> pb.ModelInferRequest:
    """A request the way tritonclient sends it: metadata in `inputs`, data in `raw_input_contents`."""
    request = pb.ModelInferRequest(model_name="m")
    for name, (datatype, array) in arrays.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def _refused(match: str, tensor: InputTensor, raw: bytes | None = None) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        input_array(tensor, raw)


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("FP32", np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype("<f4")),
        ("INT64", np.array([[-(2**62), 0, 7], [1, 2**62, -3]], dtype="<i8")),
        ("UINT8", np.arange(256, dtype=np.uint8).reshape(4, 64)),
    ],
)
def test_raw_round_trip(datatype: str, array: np.ndarray) -> None:
    arrays = inputs_from_request(_raw_request(x=(datatype, array)))
    decoded = arrays["x"]
    assert decoded.dtype == array.dtype.newbyteorder("=")
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable

    tensor, raw = output_tensor("y", decoded)
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("y", datatype, list(array.shape))
    assert raw == array.astype(array.dtype.newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(input_array(InputTensor(name="y", datatype=datatype, shape=tensor.shape), raw), array)


def test_big_endian_output_is_sent_little_endian() -> None:
    array = np.array([1.5, -2.0], dtype=">f4")
    tensor, raw = output_tensor("y", array)
    assert tensor.datatype == "FP32"
    assert raw == np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_every_numeric_datatype_round_trips_through_raw_bytes() -> None:
    for name, spec in DATATYPES.items():
        if name == "BYTES":
            continue
        array = np.arange(6).reshape(2, 3).astype(spec.dtype)
        tensor, raw = output_tensor("t", array)
        assert tensor.datatype == name
        np.testing.assert_array_equal(input_array(InputTensor(name="t", datatype=name, shape=[2, 3]), raw), array)


def test_bool_raw_bytes_are_canonicalised() -> None:
    tensor = InputTensor(name="b", datatype="BOOL", shape=[3])
    decoded = input_array(tensor, bytes([0, 1, 7]))
    assert decoded.tolist() == [False, True, True]


def test_output_with_unknown_dtype_is_a_server_bug() -> None:
    with pytest.raises(TypeError, match="output 'y'"):
        output_tensor("y", np.array(["a"], dtype=object))


# -- typed contents ----------------------------------------------------------------------------


def test_typed_contents_fp32() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([0.5, 1.0, -2.0, 3.25])
    decoded = inputs_from_request(request)["x"]
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, [[0.5, 1.0], [-2.0, 3.25]])


def test_typed_contents_narrow_ints_use_the_wide_field() -> None:
    tensor = InputTensor(name="x", datatype="INT8", shape=[3])
    tensor.contents.int_contents.extend([-128, 0, 127])
    decoded = input_array(tensor, None)
    assert decoded.dtype == np.int8
    assert decoded.tolist() == [-128, 0, 127]

    tensor = InputTensor(name="u", datatype="UINT16", shape=[2])
    tensor.contents.uint_contents.extend([0, 65535])
    assert input_array(tensor, None).tolist() == [0, 65535]


def test_typed_contents_int64_and_bool() -> None:
    tensor = InputTensor(name="i", datatype="INT64", shape=[2])
    tensor.contents.int64_contents.extend([-(2**63), 2**63 - 1])
    assert input_array(tensor, None).tolist() == [-(2**63), 2**63 - 1]

    tensor = InputTensor(name="b", datatype="BOOL", shape=[1, 2])
    tensor.contents.bool_contents.extend([True, False])
    assert input_array(tensor, None).tolist() == [[True, False]]


def test_empty_tensor_needs_no_data() -> None:
    decoded = input_array(InputTensor(name="e", datatype="FP32", shape=[0, 4]), None)
    assert decoded.shape == (0, 4)


# -- refusals: one input -----------------------------------------------------------------------


def test_unknown_datatype() -> None:
    _refused(r"input 'x': unknown datatype 'FP8'; expected one of BOOL, .*BYTES", InputTensor(name="x", datatype="FP8"))
    _refused("unknown datatype 'fp32'", InputTensor(name="x", datatype="fp32", shape=[1]), b"\0" * 4)


def test_bytes_datatype_is_refused_for_numeric_models() -> None:
    tensor = InputTensor(name="s", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"hello")
    _refused("input 's': datatype BYTES is not supported; hegate models take numeric tensors", tensor)


def test_negative_dimension() -> None:
    _refused(
        r"input 'x': shape \[1, -1\] has a negative dimension",
        InputTensor(name="x", datatype="FP32", shape=[1, -1]),
        b"",
    )


@pytest.mark.parametrize("size", [3135, 3137, 0, 784])
def test_raw_length_must_match_shape_exactly(size: int) -> None:
    tensor = InputTensor(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    _refused(rf"input 'input': {size} bytes for shape \[1, 1, 28, 28\] FP32 needs 3136$", tensor, b"\0" * size)


def test_raw_length_is_checked_before_any_allocation_for_huge_shapes() -> None:
    tensor = InputTensor(name="x", datatype="INT64", shape=[2**20, 2**10])  # within the element bound
    _refused(rf"input 'x': 8 bytes for shape \[{2**20}, {2**10}\] INT64 needs {2**33}$", tensor, b"\0" * 8)


def test_typed_values_must_match_the_element_count() -> None:
    tensor = InputTensor(name="x", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend([1.0] * 5)
    _refused(r"input 'x': 5 values in fp32_contents for shape \[2, 3\] FP32 needs 6$", tensor)


def test_typed_contents_must_use_the_datatype_field() -> None:
    tensor = InputTensor(name="x", datatype="FP32", shape=[2])
    tensor.contents.int64_contents.extend([1, 2])
    _refused("input 'x': FP32 data goes in fp32_contents, got int64_contents$", tensor)

    tensor.contents.fp32_contents.extend([1.0, 2.0])
    _refused("input 'x': FP32 data goes in fp32_contents, got int64_contents, fp32_contents$", tensor)


def test_typed_values_out_of_range_for_a_narrow_type() -> None:
    tensor = InputTensor(name="x", datatype="INT8", shape=[2])
    tensor.contents.int_contents.extend([5, 300])
    _refused(r"input 'x': value 300 in int_contents is out of range for INT8 \[-128, 127\]", tensor)

    tensor = InputTensor(name="u", datatype="UINT8", shape=[1])
    tensor.contents.uint_contents.append(256)
    _refused(r"input 'u': value 256 in uint_contents is out of range for UINT8 \[0, 255\]", tensor)


def test_fp16_has_no_typed_field() -> None:
    tensor = InputTensor(name="h", datatype="FP16", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    _refused("input 'h': FP16 has no typed contents field; send it in raw_input_contents", tensor)


def test_no_data_at_all() -> None:
    _refused("input 'x': no data", InputTensor(name="x", datatype="FP32", shape=[3]))


def test_raw_and_typed_contents_together() -> None:
    tensor = InputTensor(name="x", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    _refused("input 'x': has both raw_input_contents and typed contents", tensor, b"\0" * 4)


# -- refusals: whole request -------------------------------------------------------------------


def test_raw_entries_must_match_the_number_of_inputs() -> None:
    request = _raw_request(a=("FP32", np.zeros(2, np.float32)), b=("FP32", np.zeros(2, np.float32)))
    del request.raw_input_contents[1]
    with pytest.raises(InvalidArgumentError, match="request has 1 raw_input_contents for 2 inputs"):
        inputs_from_request(request)


def test_mixing_raw_for_one_input_and_typed_for_another_is_refused() -> None:
    request = _raw_request(a=("FP32", np.zeros(2, np.float32)))
    typed = request.inputs.add(name="b", datatype="FP32", shape=[1])
    typed.contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgumentError, match="request has 1 raw_input_contents for 2 inputs"):
        inputs_from_request(request)


def test_duplicate_input_names() -> None:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(2):
        request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgumentError, match="input 'x' appears more than once"):
        inputs_from_request(request)


def test_unnamed_input() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgumentError, match="input at position 0 has no name"):
        inputs_from_request(request)


@pytest.mark.parametrize(
    "shape",
    [[0, 2**63 - 1, 28, 28], [2**31, 1], [4097, 1, 28, 28], [1, 2**40, 0]],
)
def test_shapes_beyond_the_element_bound_are_refused_before_numpy_sees_them(shape: list[int]) -> None:
    """Issue 14: [0, 2**63 - 1, 28, 28] holds no element, matched its empty raw bytes, and made
    numpy raise (INTERNAL and a traceback). Every dimension and the count are bounded now."""
    with pytest.raises(InvalidArgumentError, match="exceeds the 3211264 elements"):
        inputs_from_request(_raw_request_with_shape(shape), max_elements=4096 * 784)


def _raw_request_with_shape(shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")
    return request


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(value: float) -> None:
    array = np.zeros((2, 3), np.float32)
    array[1, 2] = value
    with pytest.raises(InvalidArgumentError, match=r"at \[1, 2\]; inputs must be finite"):
        require_finite("x", array)
    require_finite("x", np.zeros((2, 3), np.float32))
    require_finite("x", np.full((2,), 7, np.int64))  # integers are always finite

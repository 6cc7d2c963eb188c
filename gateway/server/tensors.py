"""Open Inference Protocol tensors <-> numpy arrays, with every check a hostile request needs.

A ``ModelInferRequest`` can carry each input either as raw little-endian bytes (in
``raw_input_contents``, at the input's index) or as typed values in the one
``InferTensorContents`` field that matches its datatype. Both arrive from the network, so
nothing here trusts a length, a shape or a value range: each mismatch becomes an
:class:`~models.errors.InvalidArgumentError` whose message names the input, what was expected
and what came, and numpy only ever sees data whose size has already been checked.

Sizes are checked before anything is allocated: every dimension and the element count must be at
most ``max_elements`` (the servicer passes ``max_batch`` times the model's input size), so a shape
such as ``[0, 2**63 - 1, 28, 28]``, which holds no element but cannot be represented, is an
INVALID_ARGUMENT like any other, never an exception from numpy. NaN and infinite values are refused
by :func:`require_finite` (the servicer calls it unless ``allow_non_finite_inputs`` is set): a
quantized model would map them to an arbitrary grid value and answer something meaningless.

Responses always use ``raw_output_contents``: it is what tritonclient reads, and it is the
cheapest encoding for the server to produce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.api import grpc_predict_v2_pb2 as pb
from models.errors import InvalidArgumentError

InputTensor = pb.ModelInferRequest.InferInputTensor
OutputTensor = pb.ModelInferResponse.InferOutputTensor


@dataclass(frozen=True)
class Datatype:
    """One Open Inference Protocol datatype.

    ``dtype`` is the little-endian numpy dtype of its raw bytes; ``contents_field`` is the
    ``InferTensorContents`` field that carries it in typed form (several narrow types share a
    wider field), or ``None`` when the protocol has no typed form for it (FP16: raw only).
    """

    name: str
    dtype: np.dtype
    contents_field: str | None


# The element type protobuf uses for each typed field, to read it without loss.
_FIELD_DTYPES: Mapping[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
    "bytes_contents": np.dtype(object),
}


DATATYPES: Mapping[str, Datatype] = {
    spec.name: spec
    for spec in (
        Datatype("BOOL", np.dtype(np.bool_), "bool_contents"),
        Datatype("UINT8", np.dtype("<u1"), "uint_contents"),
        Datatype("UINT16", np.dtype("<u2"), "uint_contents"),
        Datatype("UINT32", np.dtype("<u4"), "uint_contents"),
        Datatype("UINT64", np.dtype("<u8"), "uint64_contents"),
        Datatype("INT8", np.dtype("<i1"), "int_contents"),
        Datatype("INT16", np.dtype("<i2"), "int_contents"),
        Datatype("INT32", np.dtype("<i4"), "int_contents"),
        Datatype("INT64", np.dtype("<i8"), "int64_contents"),
        Datatype("FP16", np.dtype("<f2"), None),
        Datatype("FP32", np.dtype("<f4"), "fp32_contents"),
        Datatype("FP64", np.dtype("<f8"), "fp64_contents"),
        # Variable-length byte strings: part of the protocol, but no hegate model takes them.
        Datatype("BYTES", np.dtype(object), "bytes_contents"),
    )
}

# Outputs: (numpy kind, item size) -> datatype name, so byte order never matters for the lookup.
_NAME_BY_KIND: Mapping[tuple[str, int], str] = {
    (spec.dtype.kind, spec.dtype.itemsize): name for name, spec in DATATYPES.items() if spec.name != "BYTES"
}


DEFAULT_MAX_ELEMENTS = (1 << 31) - 1  # what any numpy index holds; servicers pass their own, smaller bound


def _shape(tensor: InputTensor, max_elements: int) -> list[int]:
    """The declared shape, refused if any dimension is negative (-1 only means "any" in metadata),
    or if a dimension or the element count exceeds ``max_elements``."""
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgumentError(f"input {tensor.name!r}: shape {shape} has a negative dimension")
    if any(dim > max_elements for dim in shape) or math.prod(shape) > max_elements:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: shape {shape} exceeds the {max_elements} elements a request may carry"
        )
    return shape


def _lookup(tensor: InputTensor) -> Datatype:
    """The input's datatype, refused when unknown or not numeric."""
    spec = DATATYPES.get(tensor.datatype)
    if spec is None:
        known = ", ".join(DATATYPES)
        raise InvalidArgumentError(
            f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}; expected one of {known}"
        )
    if spec.name == "BYTES":
        raise InvalidArgumentError(
            f"input {tensor.name!r}: datatype BYTES is not supported; hegate models take numeric tensors"
        )
    return spec


def _from_raw(tensor: InputTensor, spec: Datatype, shape: list[int], raw: bytes) -> np.ndarray:
    count = math.prod(shape)
    needed = count * spec.dtype.itemsize
    if len(raw) != needed:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: {len(raw)} bytes for shape {shape} {spec.name} needs {needed}"
        )
    if spec.name == "BOOL":
        # Any non-zero byte is true; never let bytes other than 0/1 masquerade as numpy bools.
        return (np.frombuffer(raw, dtype=np.uint8) != 0).reshape(shape)
    # astype copies into native byte order: the result is writable and no longer borrows `raw`.
    return np.frombuffer(raw, dtype=spec.dtype).astype(spec.dtype.newbyteorder("=")).reshape(shape)


def _from_contents(tensor: InputTensor, spec: Datatype, shape: list[int]) -> np.ndarray:
    count = math.prod(shape)
    present = [field.name for field, _ in tensor.contents.ListFields()]
    if not present:
        if count == 0:
            return np.zeros(shape, dtype=spec.dtype.newbyteorder("="))
        raise InvalidArgumentError(
            f"input {tensor.name!r}: no data; send it in raw_input_contents or in typed contents"
        )
    if spec.contents_field is None:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: {spec.name} has no typed contents field; send it in raw_input_contents"
        )
    if present != [spec.contents_field]:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: {spec.name} data goes in {spec.contents_field}, got {', '.join(present)}"
        )
    values = getattr(tensor.contents, spec.contents_field)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: {len(values)} values in {spec.contents_field} "
            f"for shape {shape} {spec.name} needs {count}"
        )
    wide = np.array(values, dtype=_FIELD_DTYPES[spec.contents_field])
    target = spec.dtype.newbyteorder("=")
    if target.kind in "iu" and target.itemsize < wide.dtype.itemsize and wide.size:
        info = np.iinfo(target)
        low, high = int(wide.min()), int(wide.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidArgumentError(
                f"input {tensor.name!r}: value {bad} in {spec.contents_field} is out of range "
                f"for {spec.name} [{info.min}, {info.max}]"
            )
    return wide.astype(target).reshape(shape)


def input_array(tensor: InputTensor, raw: bytes | None, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Decode one input tensor into a writable, native-byte-order array of its declared shape.

    ``raw`` is the input's entry of ``raw_input_contents`` (``None`` when the request sends typed
    contents instead). Any inconsistency raises :class:`InvalidArgumentError`.
    """
    spec = _lookup(tensor)
    shape = _shape(tensor, max_elements)
    if raw is None:
        return _from_contents(tensor, spec, shape)
    if tensor.contents.ListFields():
        raise InvalidArgumentError(
            f"input {tensor.name!r}: has both raw_input_contents and typed contents; send one of them"
        )
    return _from_raw(tensor, spec, shape, raw)


def inputs_from_request(
    request: pb.ModelInferRequest, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """Decode every input of a request, keyed by name, in request order; each input may hold at
    most ``max_elements`` elements.

    Raw contents are all-or-nothing: when ``raw_input_contents`` is used it holds exactly one
    entry per input, since entries are matched to inputs by position only.
    """
    raw: Sequence[bytes] = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one raw entry per input, or none and typed contents"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise InvalidArgumentError(f"input at position {index} has no name")
        if tensor.name in arrays:
            raise InvalidArgumentError(f"input {tensor.name!r} appears more than once")
        arrays[tensor.name] = input_array(tensor, raw[index] if raw else None, max_elements=max_elements)
    return arrays


def require_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN and infinite values in a floating-point input.

    Raises:
        InvalidArgumentError: naming the input and the first offending position.
    """
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        position = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise InvalidArgumentError(
            f"input {name!r}: {array[position]} at {list(position)}; inputs must be finite numbers"
        )


def output_tensor(name: str, array: np.ndarray) -> tuple[OutputTensor, bytes]:
    """The response metadata for one output and its raw little-endian bytes, in C order.

    An array whose dtype has no Open Inference Protocol datatype is a server bug, not a bad
    request, so it raises :class:`TypeError` rather than a domain error.
    """
    datatype = _NAME_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if datatype is None:
        raise TypeError(f"output {name!r}: numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    little = DATATYPES[datatype].dtype
    data = np.ascontiguousarray(array, dtype=little).tobytes()
    return OutputTensor(name=name, datatype=datatype, shape=list(array.shape)), data

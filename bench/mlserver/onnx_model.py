"""What the MLServer runtime computes, without MLServer: an onnxruntime session, the input
tensor decoded from what MLServer hands a runtime, and the logits encoded as its output.

It runs in MLServer's environment (numpy and onnxruntime only, no hegate imports) and is tested in
hegate's. MLServer itself unpacks ``raw_input_contents`` (as tritonclient and hegate's SDK send
them) into each input's ``data`` as a flat list of numbers before a runtime sees the request, and
packs the outputs back into ``raw_output_contents`` when the request came raw; the runtime
therefore works on flat lists and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class TensorError(ValueError):
    """A request's tensor does not fit the model: wrong datatype, shape or element count."""


def session_options() -> ort.SessionOptions:
    """One thread, run sequentially, every graph optimization: as hegate's kernels run (one
    thread per call, inline); a second intra-op thread would only fight the load generator and
    the gRPC threads for the machine's two cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxClassifier:
    """A one-input, one-output ONNX model (``[batch, *shape]`` float32 in, logits out)."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        (model_input,) = self.session.get_inputs()
        self.input_name: str = model_input.name
        self.input_shape: list[int] = [int(d) for d in model_input.shape[1:]]  # after the batch dimension
        self.output_name: str = self.session.get_outputs()[0].name

    def decode(self, *, datatype: str, shape: Sequence[int], data: Sequence[Any]) -> np.ndarray:
        """The input as a float32 array ``[batch, *input_shape]``.

        Raises:
            TensorError: not FP32, a shape other than the model's, or a data length that does not fill it.
        """
        if datatype != "FP32":
            raise TensorError(f"input {self.input_name!r}: datatype must be FP32, got {datatype}")
        if len(shape) != 1 + len(self.input_shape) or list(shape[1:]) != self.input_shape:
            raise TensorError(f"input {self.input_name!r}: shape must be [batch, *{self.input_shape}], got {shape}")
        x = np.asarray(data, dtype=np.float32)
        if x.size != int(np.prod(shape)):
            raise TensorError(f"input {self.input_name!r}: {x.size} values do not fill shape {list(shape)}")
        return x.reshape(shape)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's output on a decoded batch."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def encode(self, logits: np.ndarray) -> dict[str, Any]:
        """The output as the fields of an Open Inference Protocol output tensor, named and typed as
        hegate names and types it (the graph's output name, FP32), data flat in row-major order."""
        logits = np.asarray(logits, dtype=np.float32)
        return {
            "name": self.output_name,
            "datatype": "FP32",
            "shape": list(logits.shape),
            "data": logits.ravel().tolist(),
        }

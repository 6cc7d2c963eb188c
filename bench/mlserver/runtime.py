"""The MLServer runtime of ``hegate bench peer``: onnxruntime on one thread behind ``mlserver.MLModel``.

Imported by MLServer, in its own environment (``.venv-mlserver``), through the model settings'
``implementation`` (``bench.mlserver.runtime.OnnxRuntimeModel``, with the repository root on
``PYTHONPATH``); hegate's environment has no MLServer and never imports it. The work is in
:mod:`bench.mlserver.onnx_model`; this adapts it to MLServer's types and errors.
"""

from __future__ import annotations

from pathlib import Path

from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.types import Datatype, InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri

from bench.mlserver.onnx_model import OnnxClassifier, TensorError


class OnnxRuntimeModel(MLModel):
    """One ONNX classifier: ``parameters.uri`` names its ``model.onnx``; one FP32 input, logits out."""

    async def load(self) -> bool:
        self._classifier = OnnxClassifier(Path(await get_model_uri(self.settings)))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Decode, run, encode. MLServer has already unpacked ``raw_input_contents`` into ``data``
        and will pack the output into ``raw_output_contents`` (it answers raw when asked raw).

        Raises:
            InferenceError: not exactly one input, or one that does not fit the model
                (MLServer answers INVALID_ARGUMENT).
        """
        if len(payload.inputs) != 1:
            raise InferenceError(f"{self.name} takes exactly one input, got {len(payload.inputs)}")
        (tensor,) = payload.inputs
        datatype = Datatype(tensor.datatype).value  # gRPC requests arrive unvalidated: a str, not the enum
        try:
            x = self._classifier.decode(datatype=datatype, shape=tensor.shape, data=tensor.data.root)
        except TensorError as exc:
            raise InferenceError(str(exc)) from exc
        output = self._classifier.encode(self._classifier.logits(x))
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=[ResponseOutput(**output)])

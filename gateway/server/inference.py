"""The Open Inference Protocol (KServe V2) servicer: the plaintext path that stock clients use.

It converts protobuf to arrays and back (:mod:`gateway.server.tensors`) and delegates to the
:class:`~gateway.server.serving.ModelStore`; no model logic lives here. A request may name its
plaintext backend in the request parameter ``backend`` (a string: ``numba`` or ``onnxruntime``);
without it the gateway's default serves it. A request that names one gets it echoed in the
response's parameters.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextlib import contextmanager

import grpc

from gateway.api import BACKEND_PARAMETER
from gateway.api import grpc_predict_v2_pb2 as pb
from gateway.api import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.server.metrics import GatewayMetrics
from gateway.server.rpc import rpc
from gateway.server.serving import ModelStore
from gateway.server.tensors import inputs_from_request, output_tensor, require_finite
from gateway.status import status_for
from models.errors import HegateError, InvalidArgumentError
from models.manifest import DPRecord

SERVER_NAME = "hegate"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["hegate.v1.EncryptedInference"]
PLATFORM = "hegate_int8"


def requested_backend(request: pb.ModelInferRequest) -> str:
    """The request's ``backend`` parameter, or "" (the default backend).

    Raises:
        InvalidArgumentError: the parameter is not a string.
    """
    if BACKEND_PARAMETER not in request.parameters:
        return ""
    parameter = request.parameters[BACKEND_PARAMETER]
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgumentError("the request parameter 'backend' is a string: 'numba' or 'onnxruntime'")
    return parameter.string_param


@contextmanager
def observed(metrics: GatewayMetrics, model: str, path: str):
    """Count the request under its final status and time its computation."""
    started = time.perf_counter()
    status = grpc.StatusCode.OK
    try:
        yield
    except HegateError as exc:
        status = status_for(exc)
        raise
    except asyncio.CancelledError:  # the caller went away (or its deadline passed) mid-call
        status = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        status = grpc.StatusCode.INTERNAL
        raise
    finally:
        metrics.requests.labels(model, path, status.name).inc()
        if status == grpc.StatusCode.OK:
            metrics.compute_seconds.labels(model, path).observe(time.perf_counter() - started)


def privacy_parameters(dp: DPRecord) -> dict[str, pb.InferParameter]:
    """The DP record as metadata parameters; ``epsilon`` is absent unless the record delivers it."""
    parameters = {
        "privacy": pb.InferParameter(string_param=dp.label),
        "secure_rng": pb.InferParameter(bool_param=dp.secure_rng),
    }
    if dp.claims_dp:
        parameters["epsilon"] = pb.InferParameter(double_param=dp.epsilon)
        parameters["delta"] = pb.InferParameter(double_param=dp.delta)
    return parameters


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        store: ModelStore,
        metrics: GatewayMetrics,
        *,
        max_batch: int,
        ready: Callable[[], bool],
        allow_non_finite: bool = False,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_batch = max_batch
        self.allow_non_finite = allow_non_finite
        self._ready = ready

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    @rpc
    async def ModelReady(self, request, context):
        """Ready if served and the gateway is ready; an unknown model or version is not ready (not
        an error), as Triton answers, so stock clients' ``is_model_ready`` returns False."""
        known = any(m.name == request.name and request.version in ("", m.version) for m in self.store.models())
        return pb.ModelReadyResponse(ready=known and self._ready())

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request, context):
        model = self.store.get(request.name, request.version)
        manifest = model.artifact.manifest
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[m.version for m in self.store.models() if m.name == model.name],
            platform=f"{PLATFORM}_{model.plaintext.backend}",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=manifest.input.name, datatype="FP32", shape=[-1, *manifest.input.shape]
                )
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=manifest.output.name, datatype="FP32", shape=[-1, len(manifest.output.labels)]
                )
            ],
            parameters=privacy_parameters(manifest.dp),
        )

    @rpc
    async def ModelInfer(self, request, context):
        model = self.store.get(request.model_name, request.model_version)
        with observed(self.metrics, model.name, "plaintext"):
            manifest = model.artifact.manifest
            inputs = inputs_from_request(request, max_elements=self.max_batch * math.prod(manifest.input.shape))
            if list(inputs) != [manifest.input.name]:
                raise InvalidArgumentError(
                    f"model {model.name!r} takes one input named {manifest.input.name!r}, got {sorted(inputs)}"
                )
            if not self.allow_non_finite:
                require_finite(manifest.input.name, inputs[manifest.input.name])
            wanted = [output.name for output in request.outputs]
            if any(name != manifest.output.name for name in wanted):
                raise InvalidArgumentError(f"model {model.name!r} has one output, {manifest.output.name!r}")
            backend = requested_backend(request)
            logits = model.predict(inputs[manifest.input.name], max_batch=self.max_batch, backend=backend)
            tensor, raw = output_tensor(manifest.output.name, logits)
            response = pb.ModelInferResponse(
                model_name=model.name,
                model_version=model.version,
                id=request.id,
                outputs=[tensor],
                raw_output_contents=[raw],
            )
            if backend:
                response.parameters[BACKEND_PARAMETER].string_param = backend
            return response

"""A gRPC proxy in the test process, in front of a real gateway: it forwards every call as bytes with
its metadata, records what each call carried, and can answer chosen calls itself.

The SDK's tests use it to see the headers a call reaches a server with (what an L7 balancer
sees) and to make the gateway's answers fail in ways a live gateway cannot be made to on cue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
STREAMING_REQUESTS = {"/hegate.v1.EncryptedInference/RegisterKeys"}
HOP_HEADERS = ("user-agent", "grpc-")  # set by each channel itself


@dataclass
class Call:
    method: str  # the full method, "/hegate.v1.EncryptedInference/Infer"
    metadata: dict[str, str]


@dataclass
class Faults:
    """Per method name (``"Infer"``): how many calls to answer with ``code`` without forwarding
    (None: all of them), and a rewrite of forwarded responses."""

    code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND
    refuse: dict[str, int | None] = field(default_factory=dict)
    rewrite: dict[str, Callable[[bytes], bytes]] = field(default_factory=dict)


class GrpcProxy(grpc.GenericRpcHandler):
    """``with GrpcProxy(target) as proxy:`` clients connect to ``proxy.target``."""

    def __init__(self, target: str) -> None:
        self.calls: list[Call] = []
        self.faults = Faults()
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(target, options=UNLIMITED)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8), handlers=[self], options=UNLIMITED)
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def of(self, name: str) -> list[Call]:
        """The recorded calls of one method (``"Infer"``), in order."""
        return [call for call in self.calls if call.method.rpartition("/")[2] == name]

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method in STREAMING_REQUESTS:
            upstream = self._channel.stream_unary(method)
            return grpc.stream_unary_rpc_method_handler(
                lambda chunks, context: self._forward(method, upstream, chunks, context)
            )
        upstream = self._channel.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._forward(method, upstream, request, context)
        )

    def _forward(self, method: str, upstream, request, context: grpc.ServicerContext) -> bytes:
        name = method.rpartition("/")[2]
        metadata = tuple((k, v) for k, v in context.invocation_metadata() if not k.startswith(HOP_HEADERS))
        with self._lock:
            self.calls.append(Call(method, dict(metadata)))
            left = self.faults.refuse.get(name, 0)
            refused = left is None or left > 0
            if left:
                self.faults.refuse[name] = left - 1
        if refused:
            context.abort(self.faults.code, f"refused by the test proxy ({name})")
        try:
            response = upstream(request, metadata=metadata, timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        rewrite = self.faults.rewrite.get(name)
        return rewrite(response) if rewrite else response

    def close(self) -> None:
        self._server.stop(None)
        self._channel.close()

    def __enter__(self) -> GrpcProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

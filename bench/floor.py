"""The cheapest Open Inference Protocol server Python's grpc.aio allows: the floor under the peer comparison.

    python -m bench.floor --port 8101 --response response.bin

It answers every ``ModelInfer`` with the same pre-serialized ``ModelInferResponse`` and does
nothing else: no request parsing, no model, no interceptors, no metrics, bytes in and bytes out
through a generic handler. Whatever it costs per call is what grpc.aio itself costs, so its
throughput and latency bound what any Python grpc.aio server (hegate and MLServer alike) can reach
on this machine; ``bench.peer`` loads it beside them to show how much of the gap between the two
is left to close by server code at all.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import subprocess
import sys
from pathlib import Path

import grpc

from bench.server import cpu_seconds, stop

SERVICE = "inference.GRPCInferenceService"
READY = "floor: serving"
START_TIMEOUT_SECONDS = 60.0


async def serve(port: int, response: bytes) -> None:
    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(model_infer)  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(READY, flush=True)
    await server.wait_for_termination()


class FloorProcess:
    """:func:`serve` in a subprocess on ``port``, answering with ``response``; stopped with SIGTERM."""

    def __init__(self, port: int, response: bytes, folder: Path) -> None:
        self.target = f"127.0.0.1:{port}"
        self.port = port
        self.response_file = folder / "floor-response.bin"
        self.response_file.write_bytes(response)

    def __enter__(self) -> FloorProcess:
        command = [sys.executable, "-m", "bench.floor", "--port", str(self.port), "--response", str(self.response_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        readable, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT_SECONDS)
        line = self.process.stdout.readline() if readable else ""
        if not line.startswith(READY):
            self.__exit__()
            raise RuntimeError(f"the floor server did not start (exit code {self.process.poll()})")
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.process)
        self.process.stdout.close()

    def cpu_seconds(self) -> tuple[float, float, float]:
        """As :meth:`bench.server.Server.cpu_seconds`: main thread, whole process, children (none)."""
        pid = self.process.pid
        return cpu_seconds(pid, pid), cpu_seconds(pid), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--response", type=Path, required=True, help="a serialized ModelInferResponse")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.response.read_bytes()))


if __name__ == "__main__":
    main()

"""The plaintext fast path: the Open Inference Protocol served by hegate's own asyncio HTTP/2 server."""

from gateway.fastpath.server import FastPathServer, routes

__all__ = ["FastPathServer", "routes"]

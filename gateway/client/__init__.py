"""The Python SDK: sync and asyncio clients for the plaintext and encrypted paths.

    from gateway.client import HegateClient

    with HegateClient("127.0.0.1:8001") as client:
        print(client.list_models())
        logits = client.predict("mnist-cnn-eps3", x)            # plaintext, Open Inference Protocol
        with client.encrypted_session("mnist-cnn-eps3") as session:
            result = session.predict(x)                          # encrypted here, decrypted here
        with client.encrypted_session("mnist-cnn-eps3", profile="circuit_private") as session:
            result = session.predict(x)                          # ... and the result hides the model

Errors are the domain classes of :mod:`models.errors` with the gRPC code in ``.status``.
"""

from gateway.client.aio import AsyncEncryptedSession, AsyncHegateClient
from gateway.client.protocol import ClientOptions, ModelInfo, Prediction, Timings
from gateway.client.sync import EncryptedSession, HegateClient

__all__ = [
    "AsyncEncryptedSession",
    "AsyncHegateClient",
    "ClientOptions",
    "EncryptedSession",
    "HegateClient",
    "ModelInfo",
    "Prediction",
    "Timings",
]

"""``make demo``: start a gateway, send one encrypted and one plaintext MNIST request through the
SDK, print both answers and their timings, stop the gateway.

    python -m gateway.demo [--model mnist-cnn-eps3]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from importlib import resources

import numpy as np

from gateway.cli import DEFAULT_MODEL
from gateway.client import HegateClient

READY_PREFIX = "hegate: serving"


def start_gateway() -> tuple[subprocess.Popen, str, str]:
    """A gateway on free loopback ports, bundled models; returns it, its address and its fast
    path's once it listens."""
    command = [sys.executable, "-m", "gateway.cli", "serve", "--address", "127.0.0.1:0", "--metrics-port", "0"]
    command += ["--fast-path-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith(READY_PREFIX):
            address = line.split(" on ")[1].split(",")[0].strip()
            fast_path = line.split("fast path on ")[1].split(",")[0].strip()
            return process, address, fast_path
    raise RuntimeError(f"the gateway exited with code {process.wait()} before it listened")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    samples = np.load(resources.files("gateway") / "samples" / "mnist-test-32.npz")
    raw, label = samples["images"][:1], int(samples["labels"][0])

    started = time.perf_counter()
    gateway, address, fast_path = start_gateway()
    print(f"gateway up on {address} (plaintext fast path on {fast_path}) in {time.perf_counter() - started:.1f} s")
    try:
        with HegateClient(address, fast_path_target=fast_path) as client:
            model = client.model(args.model)
            x = model.manifest.input.normalization.apply(raw)
            dp = model.manifest.dp
            print(f"model {model.name}: {dp.label}")
            print(f"true label of the test image: {label}")

            client.predict(model.name, x)  # the first request opens the fast path's connection
            started = time.perf_counter()
            logits = client.predict(model.name, x)
            plain_ms = 1000 * (time.perf_counter() - started)
            print(f"plaintext (fast path): label {logits.argmax()}, {plain_ms:.2f} ms round trip")

            with client.encrypted_session(model.name) as session:
                print(
                    f"encrypted: keys made here, {session.key_bytes / 2**20:.1f} MiB uploaded in "
                    f"{session.registration_seconds:.2f} s (the secret key never leaves this process)"
                )
                session.predict(x)  # the first request warms the connection and the worker
                result = session.predict(x)
                t = result.timings
                print(
                    f"encrypted: label {result.predicted[0]}, probability {result.probabilities[0].max():.3f}; "
                    f"encrypt {t.encrypt_ms:.1f} ms, call {t.call_ms:.1f} ms (server compute {t.server_compute_ms:.1f}"
                    f" ms), decrypt {t.decrypt_ms:.1f} ms"
                )
                difference = np.abs(result.logits[0] - logits[0]).max()
                print(f"largest logit difference, encrypted vs plaintext: {difference:.3f}")
    finally:
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(timeout=60)
        print(f"gateway stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

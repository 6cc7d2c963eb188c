"""``hegate bench load``: load a running gateway and report what perf_analyzer reports.

    hegate bench load --target 127.0.0.1:8001 --model mnist-cnn-eps3 --plaintext --concurrency 1 8 32
    hegate bench load --plaintext --fast-path 127.0.0.1:8003     # the plaintext fast path
    hegate bench load --target 127.0.0.1:8001 --model mnist-cnn-eps3 --rate 10 --duration 20
    hegate bench load --target ... --requests 500 --json out.json

Encrypted by default: the command makes keys for the model, registers them once, encrypts a
pool of inputs (so the load generator itself does no encryption), then sends those ciphertexts.
Each level (a concurrency, or a target rate) runs in fresh generator processes; every call's
outcome is counted by gRPC status, and latency percentiles are over the calls that succeeded.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bench.loadgen import LoadGenerators, LoadSpec
from gateway.client import HegateClient
from gateway.client.protocol import ClientOptions, encrypted_request, infer_request
from gateway.client.sync import EncryptedSession
from gateway.he.params import PROFILES
from models.errors import InvalidArgumentError

PLAINTEXT_METHOD = "/inference.GRPCInferenceService/ModelInfer"
ENCRYPTED_METHOD = "/hegate.v1.EncryptedInference/Infer"
POOL = 16  # distinct inputs, sent round-robin


def sample_inputs(shape: list[int], count: int) -> np.ndarray:
    """Raw inputs for ``shape``: the bundled MNIST samples when they fit, else seeded noise."""
    images = np.load(resources.files("gateway") / "samples" / "mnist-test-32.npz")["images"]
    if list(images.shape[1:]) == shape:
        return np.resize(images, (count, *shape)).astype(np.float64)
    return np.random.default_rng(0).uniform(0, 1, size=(count, *shape))


@dataclass
class Workload:
    """Serialized requests for one model and path, and what producing them cost."""

    method: str
    requests: list[bytes]
    path: str  # "plaintext", "plaintext (<backend>)", or "encrypted (<profile>), keys <id>"
    key_bytes: int = 0  # evaluation keys registered for the encrypted path
    session: EncryptedSession | None = None  # close it to delete the keys from the gateway

    def metadata(self, options: ClientOptions) -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the API key, and on the encrypted path the key id header, so that
        a balancer in front of replicas sends the calls to the replica holding the keys."""
        return options.keyed_metadata(self.session.key_id) if self.session else options.metadata


def workload(
    client: HegateClient,
    model: str,
    *,
    plaintext: bool,
    batch: int,
    inputs: np.ndarray | None = None,
    backend: str | None = None,
    profile: str | None = None,
) -> Workload:
    """``POOL`` requests of ``batch`` inputs each for ``model``; registers keys on the encrypted path.

    ``inputs`` are raw (unnormalized) samples to draw from; by default the bundled MNIST samples.
    ``backend`` names the plaintext backend (the request parameter), ``profile`` the CKKS profile;
    None: the gateway's defaults.
    """
    info = client.model(model)
    shape = info.manifest.input.shape
    raw = sample_inputs(shape, POOL * batch) if inputs is None else np.resize(inputs, (POOL * batch, *shape))
    x = info.manifest.input.normalization.apply(raw)
    groups = [x[i : i + batch] for i in range(0, len(x), batch)]
    if plaintext:
        requests = [infer_request(info, g, backend).SerializeToString() for g in groups]
        return Workload(PLAINTEXT_METHOD, requests, f"plaintext ({backend})" if backend else "plaintext")
    session = client.encrypted_session(model, profile=profile)
    if batch > session.lanes:
        session.close()
        raise InvalidArgumentError(f"{model} packs at most {session.lanes} inputs per ciphertext: --batch <= that")
    requests = [
        encrypted_request(info, session.key_id, session.keys.encrypt(g), len(g)).SerializeToString() for g in groups
    ]
    path = f"encrypted ({session.spec.precision}), keys {session.key_id[:12]}..."
    return Workload(ENCRYPTED_METHOD, requests, path, session.key_bytes, session)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| level | requests | OK/s | p50 | p90 | p99 | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        errors = ", ".join(f"{code} {n}" for code, n in r["errors"].items()) or "none"
        lines.append(
            f"| {r['level']} | {r['requests']} | {r['requests_per_second']:,} | {r.get('p50_ms', '-')} ms "
            f"| {r.get('p90_ms', '-')} ms | {r.get('p99_ms', '-')} ms | {errors} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.fast_path and not args.plaintext:
        raise InvalidArgumentError("--fast-path serves the plaintext path only: add --plaintext")
    target = args.fast_path or args.target
    with HegateClient(args.target, api_key=args.api_key) as client:
        work = workload(
            client, args.model, plaintext=args.plaintext, batch=args.batch, backend=args.backend, profile=args.profile
        )
        levels = [("rate", r) for r in args.rate] if args.rate else [("concurrency", c) for c in args.concurrency]
        rows = []
        for kind, value in levels:
            in_flight = args.max_in_flight if kind == "rate" else int(value)
            spec = LoadSpec(
                target=target,
                method=work.method,
                requests=work.requests,
                in_flight=in_flight,
                generators=min(args.generators, in_flight),
                rate=value if kind == "rate" else None,
                metadata=work.metadata(client.options),
                timeout_seconds=args.timeout,
            )
            with LoadGenerators(spec) as generators:
                result = generators.run(
                    warmup=args.warmup, seconds=None if args.requests else args.duration, count=args.requests
                )
            row = {"level": f"{kind} {value:g}", **result.summary()}
            rows.append(row)
            print(
                f"{row['level']}: {row['requests_per_second']:,} OK/s, p50 {row.get('p50_ms', '-')} ms, "
                f"errors {row['errors'] or 'none'}",
                flush=True,
            )
    header = f"# Load on {target}: {args.model}, {work.path}, batch {args.batch}"
    print(markdown(rows, header))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"target": target, "model": args.model, "path": work.path, "batch": args.batch, "levels": rows},
                indent=2,
            )
            + "\n"
        )
    return 0


def add_parser(commands) -> None:
    load = commands.add_parser("load", help="load a running gateway: throughput, latency, errors by status")
    load.add_argument("--target", default="127.0.0.1:8001")
    load.add_argument("--fast-path", metavar="HOST:PORT", help="with --plaintext: load the gateway's fast path")
    load.add_argument("--model", default="mnist-cnn-eps3")
    load.add_argument("--plaintext", action="store_true", help="the Open Inference Protocol path (default: encrypted)")
    load.add_argument("--backend", choices=["numba", "onnxruntime"], help="with --plaintext: the gateway's backend")
    load.add_argument("--profile", choices=PROFILES, help="the CKKS profile (default: the gateway's)")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="calls in flight, per level")
    load.add_argument("--rate", type=float, nargs="+", help="target requests/s per level (open loop) instead")
    load.add_argument("--max-in-flight", type=int, default=64, help="with --rate: the most outstanding calls")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    load.add_argument("--requests", type=int, help="requests per level instead of a duration")
    load.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measured window")
    load.add_argument("--generators", type=int, default=1, help="load generator processes")
    load.add_argument("--batch", type=int, default=1, help="inputs per request (encrypted: per ciphertext)")
    load.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds")
    load.add_argument("--api-key")
    load.add_argument("--json", help="write the results here")
    load.set_defaults(handler=run)

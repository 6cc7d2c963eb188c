"""``hegate bench privacy``: what privacy costs, model by model and path by path.

    hegate bench privacy                      # the bundled models, two gateways it starts (~20 min)
    hegate bench privacy --quick              # the same sweep with small samples (< 2 min)
    hegate bench privacy --repo my_repo --models mnist-cnn-eps1 mnist-cnn-epsinf
    hegate bench privacy --target 10.0.0.5:8001   # a running gateway: the paths it serves
    hegate bench privacy --target 10.0.0.5:8001 --fast-path 10.0.0.5:8003   # plaintext on its fast path

Every model of the repository (its DP budget, epsilon, is fixed at training) is measured on every
execution path:

* ``plaintext-onnxruntime``: the reference runtime, the server sees the input;
* ``plaintext-numba``: the int8 kernels (bit-identical to it for uint8 models, within a stated
  float32 bound for A16W8 ones), the server sees the input;
* ``encrypted-standard`` and ``encrypted-high``: CKKS at the engine's two parameter profiles;
  the server sees neither input nor result.

A gateway serves one plaintext backend and one CKKS profile, so the sweep starts two (``numba`` +
``standard``, then ``onnxruntime`` + ``high``); with ``--target`` it measures whichever paths that
gateway serves. Plaintext paths are measured on the gateway's fast path (the port trusted
plaintext callers use; ``--fast-path`` with ``--target``). Everything goes over real gRPC from
this process and from load generator processes (:mod:`bench.loadgen`):

* accuracy: the whole test set on plaintext paths; on encrypted paths a seeded sample of the test
  set (``--sample``), with a 95% Wilson interval;
* latency p50/p95/p99 with one call in flight, throughput with several (requests of one input);
* request and response bytes, evaluation-key bytes, the security level;
* the DP record beside each epsilon: delta, noise multiplier, clipping bound, sample rate, steps,
  as the accountant recorded them at training.

Output: a table on the terminal; ``privacy.{csv,json,md}`` and two plots in ``--out``
(``bench/results`` by default): accuracy against epsilon per path, and latency against accuracy
with the Pareto front of privacy, accuracy and speed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict

from bench.load import workload
from bench.loadgen import CHANNEL_OPTIONS, LoadGenerators, LoadSpec
from bench.report import RESULTS, provenance, write
from bench.server import Server
from bench.stats import wilson_interval
from gateway.client import HegateClient
from gateway.client.sync import EncryptedSession
from gateway.settings import BUNDLED_REPOSITORY
from models.data import Dataset, load_dataset
from models.extras import require_train_extra
from models.manifest import Manifest
from models.repository import ModelRepository

PATHS = ("plaintext-onnxruntime", "plaintext-numba", "encrypted-standard", "encrypted-high")
GATEWAYS = (  # (flags of hegate serve): between them, every path once
    (),
    ("--plaintext-backend", "onnxruntime", "--ckks-precision", "high"),
)
PLAINTEXT_BATCH = 1000  # test images per accuracy request
SAMPLE_SEED = 0


@dataclass(frozen=True)
class Budget:
    """How long each cell is measured; ``--quick`` shrinks everything to a smoke run."""

    warmup_seconds: float
    seconds: float  # each latency and throughput window
    sample: int  # test inputs per encrypted accuracy figure
    plaintext_in_flight: int
    encrypted_in_flight: int


FULL = Budget(warmup_seconds=1.0, seconds=5.0, sample=500, plaintext_in_flight=32, encrypted_in_flight=4)
QUICK = Budget(warmup_seconds=0.1, seconds=0.3, sample=8, plaintext_in_flight=8, encrypted_in_flight=2)


class Cell(BaseModel):
    """One model on one path: a row of the table, the CSV and the JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    dataset: str
    architecture: str
    path: str
    input_encrypted: bool
    security: str
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accuracy: float
    accuracy_low: float  # 95% Wilson interval; equal to ``accuracy`` for a whole test set
    accuracy_high: float
    accuracy_n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_second: float
    in_flight: int
    inputs_per_ciphertext: int
    request_bytes: int
    response_bytes: int
    key_bytes: int
    errors: int
    seconds: float  # this cell's whole measurement


def _architecture(manifest: Manifest) -> str:
    return manifest.training.architecture.split()[0]


def _dp_fields(manifest: Manifest) -> dict:
    dp = manifest.dp
    return {
        "epsilon": dp.epsilon,
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": dp.sample_rate,
        "steps": dp.steps,
    }


def paths_of(client: HegateClient, model: str) -> list[str]:
    """The paths a gateway serves ``model`` on: its plaintext backend and, if any, its CKKS profile."""
    paths = [f"plaintext-{client.platform(model).removeprefix('hegate_int8_')}"]
    if client.model(model).encrypted:
        paths.append(f"encrypted-{client.spec(model).precision}")
    return paths


def _response_bytes(target: str, method: str, request: bytes, metadata) -> int:
    """The size of one serialized response, read from a raw call (nothing deserialized)."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        return len(channel.unary_unary(method)(request, metadata=metadata, timeout=120))


def _accuracy(
    client: HegateClient, model: str, session: EncryptedSession | None, x: np.ndarray, y: np.ndarray, sample: int
) -> tuple[float, float, float, int]:
    """Accuracy, its 95% interval and n: every test input in plaintext, a seeded sample encrypted."""
    if session is None:
        logits = np.concatenate(
            [client.predict(model, x[i : i + PLAINTEXT_BATCH]) for i in range(0, len(x), PLAINTEXT_BATCH)]
        )
        correct = int(np.sum(logits.argmax(1) == y))
        return correct / len(y), correct / len(y), correct / len(y), len(y)
    chosen = np.random.default_rng(SAMPLE_SEED).permutation(len(y))[: min(sample, len(y))]
    lanes = session.lanes
    batches = [chosen[i : i + lanes] for i in range(0, len(chosen), lanes)]
    with ThreadPoolExecutor(2) as pool:  # two calls in flight keep both of the gateway's workers busy
        classes = np.concatenate(list(pool.map(lambda b: session.predict(x[b]).classes, batches)))
    correct = int(np.sum(classes == y[chosen]))  # taken before rounding: a tie of rounded logits is no tie
    low, high = wilson_interval(correct, len(chosen))
    return correct / len(chosen), low, high, len(chosen)


def measure(client: HegateClient, target: str, manifest: Manifest, path: str, data: Dataset, budget: Budget) -> Cell:
    """Accuracy, latency, throughput and bytes of one model on one path of the gateway at ``target``."""
    model = manifest.name
    started = time.perf_counter()
    x = manifest.input.normalization.apply(data.test.x)
    encrypted = path.startswith("encrypted")
    if not encrypted and client.options.fast_path_target:  # plaintext calls go where the client sends them
        target = client.options.fast_path_target
    work = workload(client, model, plaintext=not encrypted, batch=1, inputs=data.test.x[:16])
    try:
        accuracy, low, high, n = _accuracy(client, model, work.session, x, data.test.y, budget.sample)
        in_flight = budget.encrypted_in_flight if encrypted else budget.plaintext_in_flight
        spec = LoadSpec(
            target=target,
            method=work.method,
            requests=work.requests,
            in_flight=in_flight,
            metadata=client.options.metadata,
        )
        with LoadGenerators(spec) as generators:
            latency = generators.run(warmup=budget.warmup_seconds, seconds=budget.seconds, in_flight=1).summary()
            load = generators.run(warmup=budget.warmup_seconds, seconds=budget.seconds).summary()
        response_bytes = _response_bytes(target, work.method, work.requests[0], client.options.metadata)
    finally:
        if work.session is not None:
            work.session.close()
    if encrypted:
        parameters = client.spec(model).parameters
        security = f"128-bit CKKS, N={parameters.poly_modulus_degree}, {sum(parameters.coeff_modulus_bits)}-bit Q"
        lanes = client.model(model).lanes
    else:
        security, lanes = "none: the server sees the input", 0
    return Cell(
        model=model,
        dataset=manifest.dataset,
        architecture=_architecture(manifest),
        path=path,
        input_encrypted=encrypted,
        security=security,
        **_dp_fields(manifest),
        accuracy=accuracy,
        accuracy_low=low,
        accuracy_high=high,
        accuracy_n=n,
        p50_ms=latency.get("p50_ms", math.nan),
        p95_ms=latency.get("p95_ms", math.nan),
        p99_ms=latency.get("p99_ms", math.nan),
        requests_per_second=load["requests_per_second"],
        in_flight=in_flight,
        inputs_per_ciphertext=lanes,
        request_bytes=len(work.requests[0]),
        response_bytes=response_bytes,
        key_bytes=work.key_bytes,
        errors=sum(latency["errors"].values()) + sum(load["errors"].values()),
        seconds=round(time.perf_counter() - started, 1),
    )


# -- output --------------------------------------------------------------------------------------


def pareto_optimal(cells: list[Cell]) -> list[bool]:
    """Whether each cell is on the Pareto front of privacy (lower epsilon, encrypted input),
    accuracy and speed (lower p50) among the cells of its dataset: no other cell is at least as
    good on all four and better on one."""

    def key(c: Cell) -> tuple[float, ...]:  # smaller is better everywhere
        return (c.epsilon, -float(c.input_encrypted), -c.accuracy, c.p50_ms)

    optimal = []
    for cell in cells:
        mine = key(cell)
        dominated = any(
            other.dataset == cell.dataset
            and all(o <= m for o, m in zip(key(other), mine, strict=True))
            and key(other) != mine
            for other in cells
        )
        optimal.append(not dominated)
    return optimal


def _epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def markdown(cells: list[Cell], meta: dict) -> str:
    lines = [
        "# What privacy costs: accuracy, latency, throughput and bytes per DP budget and execution path",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']}  ",
        f"Gateway: {meta['gateway']}",
        "",
        "Accuracy: the whole test set on plaintext paths; on encrypted paths a seeded sample (n), with its 95% "
        "Wilson interval. Latency: one call in flight, one input per request. Throughput: requests/s with the "
        "stated calls in flight. Bytes: one request, one response, the evaluation keys. Pareto: on the front of "
        "privacy (epsilon, encrypted input), accuracy and p50 latency within the dataset.",
        "",
        "| model | epsilon | path | accuracy | p50 / p95 / p99 ms | req/s (in flight) | request | response "
        "| keys | security | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, optimal in zip(cells, pareto_optimal(cells), strict=True):
        accuracy = f"{100 * cell.accuracy:.2f}%"
        if cell.input_encrypted:
            accuracy += f" [{100 * cell.accuracy_low:.1f}, {100 * cell.accuracy_high:.1f}] n={cell.accuracy_n}"
        lines.append(
            f"| {cell.model} | {_epsilon(cell.epsilon)} | {cell.path} | {accuracy} "
            f"| {cell.p50_ms:.3g} / {cell.p95_ms:.3g} / {cell.p99_ms:.3g} "
            f"| {cell.requests_per_second:,.0f} ({cell.in_flight}) | {_size(cell.request_bytes)} "
            f"| {_size(cell.response_bytes)} | {_size(cell.key_bytes) if cell.key_bytes else '-'} "
            f"| {cell.security} | {'yes' if optimal else ''} |"
        )
    lines += [
        "",
        "## DP records (from the accountant at training)",
        "",
        "| model | epsilon | delta | noise multiplier | clipping bound | sample rate | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in {c.model: c for c in cells}.values():
        lines.append(
            f"| {cell.model} | {_epsilon(cell.epsilon)} | {cell.delta:g} | {cell.noise_multiplier:.3g} "
            f"| {cell.max_grad_norm:g} | {cell.sample_rate:.3g} | {cell.steps} |"
        )
    errors = sum(c.errors for c in cells)
    lines += ["", f"Failed calls over the whole sweep: {errors}.", "", "![](privacy-pareto.png)", ""]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def write_csv(cells: list[Cell], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(Cell.model_fields))
        writer.writeheader()
        writer.writerows(cell.model_dump() for cell in cells)


def plot(cells: list[Cell], directory: Path) -> list[Path]:
    """Accuracy against epsilon per path; latency against accuracy with the Pareto front marked."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plots need matplotlib: pip install -e '.[dev]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c.dataset for c in cells})
    finite = [c.epsilon for c in cells if math.isfinite(c.epsilon)]
    at_inf = (max(finite) if finite else 1.0) * 3  # where "no DP" sits on the log axis
    colors = {path: f"C{i}" for i, path in enumerate(PATHS)}
    markers = {"cnn": "o", "mlp": "s", "linear": "^"}

    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        mine = [c for c in cells if c.dataset == dataset]
        for path in PATHS:
            for arch in sorted({c.architecture for c in mine}):
                line = sorted((c for c in mine if c.path == path and c.architecture == arch), key=lambda c: c.epsilon)
                if not line:
                    continue
                xs = [c.epsilon if math.isfinite(c.epsilon) else at_inf for c in line]
                ys = [100 * c.accuracy for c in line]
                errors = [
                    [100 * (c.accuracy - c.accuracy_low) for c in line],
                    [100 * (c.accuracy_high - c.accuracy) for c in line],
                ]
                axis.errorbar(
                    xs,
                    ys,
                    yerr=errors,
                    marker=markers.get(arch, "x"),
                    color=colors[path],
                    capsize=2,
                    label=f"{arch}, {path}",
                    alpha=0.85,
                )
        axis.set_xscale("log")
        ticks = sorted({c.epsilon for c in mine if math.isfinite(c.epsilon)})
        axis.set_xticks([*ticks, at_inf], [*(f"{t:g}" for t in ticks), "no DP"])
        axis.minorticks_off()
        axis.set(title=dataset, xlabel="epsilon (DP budget; delta in the table)", ylabel="test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    accuracy_png = directory / "privacy-accuracy.png"
    figure.savefig(accuracy_png, dpi=110)
    plt.close(figure)

    optimal = pareto_optimal(cells)
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for path in PATHS:
            mine = [(c, o) for c, o in zip(cells, optimal, strict=True) if c.dataset == dataset and c.path == path]
            if not mine:
                continue
            axis.scatter(
                [c.p50_ms for c, _ in mine],
                [100 * c.accuracy for c, _ in mine],
                color=colors[path],
                label=path,
                s=[60 if o else 25 for _, o in mine],
                edgecolors=["black" if o else "none" for _, o in mine],
            )
            for c, o in mine:
                if o:
                    label = f"eps {_epsilon(c.epsilon)}, {c.architecture}"
                    point = (c.p50_ms, 100 * c.accuracy)
                    axis.annotate(label, point, fontsize=6, xytext=(4, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set(
            title=f"{dataset}: outlined = Pareto-optimal (epsilon, encryption, accuracy, latency)",
            xlabel="p50 latency, one request (ms, log)",
            ylabel="test accuracy (%)",
        )
        axis.title.set_fontsize(8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    pareto_png = directory / "privacy-pareto.png"
    figure.savefig(pareto_png, dpi=110)
    plt.close(figure)
    return [accuracy_png, pareto_png]


# -- the command ---------------------------------------------------------------------------------


def _order(cell: Cell) -> tuple:
    return (cell.dataset, cell.architecture, cell.epsilon, PATHS.index(cell.path) if cell.path in PATHS else 9)


@contextlib.contextmanager
def _gateway(args: argparse.Namespace, flags: tuple[str, ...] | None) -> Iterator[tuple[str, str | None]]:
    """The addresses to measure, the gateway's and its fast path's: ``--target`` and ``--fast-path``,
    or those of a gateway started here with ``flags``."""
    if flags is None:
        yield args.target, args.fast_path
        return
    with (
        tempfile.TemporaryDirectory() as scratch,
        Server(args.repo, args.workers, Path(scratch) / "log", *flags) as server,
    ):
        yield server.target, server.fast_path_target


def sweep(args: argparse.Namespace, budget: Budget) -> tuple[list[Cell], str]:
    """Every selected model on every path; returns the cells and a description of the gateway(s)."""
    tqdm = require_train_extra("tqdm").tqdm
    repository = ModelRepository(args.repo)
    names = args.models or sorted(repository.names())
    manifests = {name: repository.get(name).manifest for name in names}
    datasets = {m.dataset: load_dataset(m.dataset) for m in manifests.values()}
    cells: list[Cell] = []
    gateways = [None] if args.target else list(GATEWAYS)
    with tqdm(total=len(names) * (2 if args.target else len(PATHS)), unit="cell", disable=args.no_progress) as bar:
        for flags in gateways:
            with (
                _gateway(args, flags) as (target, fast_path),
                HegateClient(target, api_key=args.api_key, fast_path_target=fast_path) as client,
            ):
                for name in names:
                    manifest = manifests[name]
                    for path in paths_of(client, name):
                        bar.set_description(f"{name} {path}")
                        cells.append(measure(client, target, manifest, path, datasets[manifest.dataset], budget))
                        bar.update()
    where = args.target or f"started here, {args.workers} encrypted workers, from {args.repo}"
    if not args.target or args.fast_path:
        where += "; plaintext paths on the fast path"
    return sorted(cells, key=_order), where


def run(args: argparse.Namespace) -> int:
    budget = QUICK if args.quick else FULL
    if args.sample:
        budget = Budget(**{**budget.__dict__, "sample": args.sample})
    cells, where = sweep(args, budget)
    meta = {**provenance("gateway.cli"), "gateway": where, "budget": budget.__dict__}
    out = Path(args.out)
    write("privacy", {**meta, "cells": [c.model_dump() for c in cells]}, markdown(cells, meta), directory=out)
    write_csv(cells, out / "privacy.csv")
    for png in plot(cells, out):
        print(f"wrote {png}")
    return 0


def add_parser(commands) -> None:
    privacy = commands.add_parser("privacy", help="sweep models (DP budgets) x paths: accuracy, latency, bytes")
    privacy.add_argument("--repo", type=Path, default=BUNDLED_REPOSITORY, help="model repository (default: bundled)")
    privacy.add_argument("--models", nargs="+", help="only these models (default: every model of the repository)")
    privacy.add_argument("--target", help="host:port of a running gateway, instead of starting two")
    privacy.add_argument(
        "--fast-path", metavar="HOST:PORT", help="with --target: its fast path, for the plaintext paths"
    )
    privacy.add_argument("--workers", type=int, default=2, help="encrypted workers of the gateways started here")
    privacy.add_argument("--quick", action="store_true", help="small samples and short windows (< 2 min)")
    privacy.add_argument("--sample", type=int, help="encrypted test inputs per accuracy figure (default 500)")
    privacy.add_argument("--out", type=Path, default=RESULTS, help="directory for the CSV, JSON, table and plots")
    privacy.add_argument("--api-key")
    privacy.add_argument("--no-progress", action="store_true", help="no progress bar")
    privacy.set_defaults(handler=run)

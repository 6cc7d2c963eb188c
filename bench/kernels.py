"""numba int8 kernels vs onnxruntime (int8) vs PyTorch (fp32) on the same model, same process, same run.

    python -m bench.kernels                      # bundled mnist-cnn-eps3 and mnist-mlp-eps3, 1 and 2 threads
    python -m bench.kernels --models mnist-cnn-eps3 --threads 1

Targets (the kernels issue):
  * per-call latency at batch 1 on one thread: numba <= 0.5x onnxruntime's;
  * throughput at batch 8, 64 and 256: numba >= onnxruntime; at 1,024 and 4,096: numba >= 0.8x onnxruntime.
The throughput targets are checked at every thread count measured, each backend given the same count.

Every measurement alternates the three backends round by round on the same MNIST test images and
reports the median round, so that a background load drifting during the run hits all three alike
(with a short pause between backends, as their thread pools spin after each call); the machine's
load average is recorded beside the numbers. numba's logits are checked against onnxruntime's
before anything is timed: bit-identical for a uint8 model, and for an A16W8 model (whose 16-bit
layers onnxruntime runs in float32) the same classes and every logit within
:func:`kernels.testing.onnxruntime_deviation_bound`. The PyTorch model is rebuilt from the
ONNX file's dequantized weights and runs in float32 (its logits differ by the quantization error).

Compile times are measured in fresh processes with an empty numba cache (cold: compiles and
writes the cache) and then with that cache (warm). Results go to ``bench/results/kernels.{json,md,png}``.

The kernels run the code path :mod:`kernels.isa` picks for this CPU (VNNI ``vpdpbusd`` tiles where
it has AVX512-VNNI, else AVX2); ``HEGATE_KERNELS_ISA=avx2`` forces the AVX2 path, for comparing.
The path that ran is recorded in the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.report import RESULTS, provenance, write
from gateway.cli import BUNDLED_REPOSITORY
from kernels import NumbaModel
from kernels import isa as kernel_isa
from kernels.plan import AvgPool, Conv, Elementwise, Gemm, Plan, Relu, Square
from kernels.testing import onnxruntime_deviation_bound
from models import onnx_runtime
from models.repository import load_artifact

DEFAULT_MODELS = ["mnist-cnn-eps3", "mnist-mlp-eps3"]
BATCHES = [8, 64, 256, 1024, 4096]
LATENCY_RATIO = 0.5  # numba's batch-1 latency at most this fraction of onnxruntime's
THROUGHPUT_RATIO = {8: 1.0, 64: 1.0, 256: 1.0, 1024: 0.8, 4096: 0.8}  # numba / onnxruntime at least
BACKENDS = ("numba", "onnxruntime", "torch")
SETTLE_SECONDS = 0.05  # pause between backends: OpenMP and onnxruntime pool threads spin after a call


def torch_model(plan: Plan):
    """The plan as a float32 PyTorch module, with every weight and bias dequantized."""
    import torch

    nn = torch.nn

    class SquareModule(nn.Module):
        def forward(self, x):
            return x * x

    def activation(act) -> list:
        return [SquareModule()] if isinstance(act, Square) else [nn.ReLU()] if isinstance(act, Relu) else []

    layers: list = []
    for step in plan.steps:
        source = plan.tensors[step.source] if step.source >= 0 else None
        match step:
            case Conv():
                weight = step.weight.astype(np.float32) * step.weight_scale[:, None, None, None]
                bias = step.bias.astype(np.float32) * (np.float32(source.params.scale) * step.weight_scale)
                top, left, bottom, right = step.pads
                if any(step.pads):
                    layers.append(nn.ZeroPad2d((left, right, top, bottom)))
                conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=step.strides)
                conv.weight.data, conv.bias.data = torch.from_numpy(weight), torch.from_numpy(bias)
                layers += [conv, *activation(step.activation)]
            case Gemm():
                if len(source.shape) > 1:
                    layers.append(nn.Flatten())
                linear = nn.Linear(step.weight.shape[1], step.weight.shape[0])
                linear.weight.data = torch.from_numpy(step.weight.astype(np.float32) * step.weight_scale[:, None])
                bias = step.bias.astype(np.float32) * (np.float32(source.params.scale) * step.weight_scale)
                linear.bias.data = torch.from_numpy(bias)
                layers += [linear, *activation(step.activation)]
            case AvgPool():
                top, left, bottom, right = step.pads
                if (top, left) != (bottom, right):
                    raise NotImplementedError("asymmetric pooling pads have no nn.AvgPool2d equivalent")
                pool = nn.AvgPool2d(step.kernel, step.strides, (top, left), count_include_pad=step.count_include_pad)
                layers.append(pool)
            case Elementwise(activation=act):
                layers += activation(act)
    return nn.Sequential(*layers).eval()


def _timed(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call of ``fn``, over at least ``seconds`` (and at least two calls)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 2:
            return elapsed / calls


def _interleaved(runners: dict[str, Callable[[], object]], *, rounds: int, seconds: float) -> dict[str, float]:
    """Median seconds per call of each runner, the runners alternating round by round."""
    for fn in runners.values():
        fn()  # warm: first-call allocations, caches
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            time.sleep(SETTLE_SECONDS)  # let the previous backend's spinning pool threads go idle
            samples[name].append(_timed(fn, seconds))
    return {name: statistics.median(values) for name, values in samples.items()}


def _runners(numba_model, session, torch_module, x: np.ndarray) -> dict[str, Callable[[], object]]:
    import torch

    name = session.get_inputs()[0].name
    tensor = torch.from_numpy(x)

    def run_torch():
        with torch.inference_mode():
            return torch_module(tensor)

    return {
        "numba": lambda: numba_model.predict_logits(x),
        "onnxruntime": lambda: session.run(None, {name: x}),
        "torch": run_torch,
    }


def _latency(numba_model, session, torch_module, images: np.ndarray, *, rounds: int, seconds: float) -> dict:
    """Per-call latency at batch 1, one thread, cycling through different images."""
    import torch

    cycle = [images[i : i + 1] for i in range(min(len(images), 256))]
    state = {"i": 0}

    def one(runner_for):
        def call():
            state["i"] = (state["i"] + 1) % len(cycle)
            return runner_for(cycle[state["i"]])

        return call

    name = session.get_inputs()[0].name

    def torch_call(x):
        with torch.inference_mode():
            return torch_module(torch.from_numpy(x))

    runners = {
        "numba": one(numba_model.predict_logits),
        "onnxruntime": one(lambda x: session.run(None, {name: x})),
        "torch": one(torch_call),
    }
    per_call = _interleaved(runners, rounds=rounds, seconds=seconds)
    return {backend: round(value * 1e6, 2) for backend, value in per_call.items()}


def _compile_times(path: Path, threads: int) -> dict:
    """Cold (empty numba cache) and warm (populated cache) load of the kernels in fresh processes."""
    code = (
        "import sys, time; start = time.perf_counter(); from kernels import NumbaModel; "
        "imported = time.perf_counter(); "
        "NumbaModel.load(sys.argv[1], threads=int(sys.argv[2])); "
        "print(imported - start, time.perf_counter() - imported)"
    )
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, "-c", code, str(path), str(threads)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            result[label] = {"import_seconds": round(float(out[0]), 3), "load_seconds": round(float(out[1]), 3)}
    return result


def agreement(model: NumbaModel, x: np.ndarray, reference: np.ndarray) -> dict:
    """How the kernels' logits match onnxruntime's: bit for bit where onnxruntime runs integer
    kernels (uint8 models), within the stated float32 bound where it runs 16-bit layers in float."""
    logits = model.predict_logits(x)
    difference = np.abs(logits - reference)
    same_class = bool(np.array_equal(logits.argmax(1), reference.argmax(1)))
    if not model.plan.has_16_bit:
        return {"rule": "bit-identical", "max_abs_difference": float(difference.max()), "same_class": same_class,
                "met": bool(np.array_equal(logits, reference))}  # fmt: skip
    bound = onnxruntime_deviation_bound(model.plan, x)
    return {
        "rule": "within the float32 deviation bound",
        "max_abs_difference": float(difference.max()),
        "largest_difference_over_bound": round(float((difference / np.maximum(bound, 1e-30)).max()), 3),
        "same_class": same_class,
        "met": bool(same_class and (difference <= bound).all()),
    }


def bench_model(
    name: str, repo: Path, threads_list: list[int], *, rounds: int, seconds: float, images: np.ndarray
) -> dict:
    import torch

    artifact = load_artifact(repo / name / "1")
    x_all = artifact.manifest.input.normalization.apply(images)
    result: dict = {"model": name, "path": str(artifact.onnx_path)}
    check = NumbaModel.load(artifact.onnx_path, threads=1)
    result["plan"] = check.describe()
    result["isa"] = check.isa
    result["macs_per_sample"] = check.program.macs_per_sample
    reference = onnx_runtime.predict_logits(onnx_runtime.create_session(artifact.onnx_path), x_all)
    result["onnxruntime_agreement"] = agreement(check, x_all, reference)
    module = torch_model(check.plan)
    with torch.inference_mode():
        fp32 = module(torch.from_numpy(x_all)).numpy()
    result["torch_fp32_same_class"] = round(float((fp32.argmax(1) == reference.argmax(1)).mean()), 4)

    torch.set_num_threads(1)
    session = onnx_runtime.create_session(artifact.onnx_path, threads=1)
    result["latency_us"] = _latency(check, session, module, x_all, rounds=rounds, seconds=seconds)
    result["throughput"] = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        model = NumbaModel.load(artifact.onnx_path, threads=threads)
        session = onnx_runtime.create_session(artifact.onnx_path, threads=threads)
        per_batch = {}
        for batch in BATCHES:
            x = np.ascontiguousarray(np.resize(x_all, (batch, *x_all.shape[1:])))
            per_call = _interleaved(_runners(model, session, module, x), rounds=rounds, seconds=seconds)
            per_batch[str(batch)] = {backend: round(batch / value, 1) for backend, value in per_call.items()}
            print(f"  {name} threads={threads} batch={batch}: {per_batch[str(batch)]}", flush=True)
        result["throughput"][str(threads)] = per_batch
    return result


def checks(models: list[dict]) -> list[dict]:
    rows = []
    for m in models:
        lat = m["latency_us"]
        ratio = lat["numba"] / lat["onnxruntime"]
        required = f"<= {LATENCY_RATIO}x onnxruntime"
        rows.append(
            {"model": m["model"], "what": "batch 1 latency, 1 thread", "required": required, "ratio": round(ratio, 3)}
            | {"met": ratio <= LATENCY_RATIO}
        )
        for threads, per_batch in m["throughput"].items():
            for batch, values in per_batch.items():
                need = THROUGHPUT_RATIO[int(batch)]
                ratio = values["numba"] / values["onnxruntime"]
                rows.append(
                    {
                        "model": m["model"], "what": f"batch {batch} throughput, {threads} thread(s)",
                        "required": f">= {need}x onnxruntime", "ratio": round(ratio, 3), "met": ratio >= need,
                    }
                )  # fmt: skip
    return rows


def _agreement_text(a: dict) -> str:
    verdict = "yes" if a["met"] else "NO"
    if a["rule"] == "bit-identical":
        return f"bit-identical: {verdict}"
    return (
        f"A16W8 (onnxruntime runs the 16-bit layers in float32), same classes and every logit within the stated "
        f"bound: {verdict} (largest difference {a['max_abs_difference']:.2g}, "
        f"{a['largest_difference_over_bound']} of its bound)"
    )


def _markdown(result: dict) -> str:
    lines = [
        "# numba int8 kernels benchmark",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}.",
        f"Load average (1 min) {result['load_average']['start']} before the run "
        + (
            "(the machine was otherwise idle), "
            if result["load_average"]["start"] < 0.5
            else "(other processes were competing for this machine's two cores), "
        )
        + f"{result['load_average']['end']} after it (this benchmark's own load).",
        "",
        f"numba kernels' code path: {', '.join(result['isa']['ran'])} "
        f"(this CPU runs {', '.join(result['isa']['available'])}; vnni = AVX512-VNNI `vpdpbusd` tiles, "
        "avx2 = `vpmaddubsw` tiles; `HEGATE_KERNELS_ISA=avx2` forces the latter).",
        "",
        "Samples per second (median of interleaved rounds); batch 1 is per-call latency in microseconds on one thread.",
    ]
    for m in result["models"]:
        lat = m["latency_us"]
        lines += [
            "",
            f"## {m['model']}",
            "",
            f"Plan: {'; '.join(m['plan'])}. {m['macs_per_sample']:,} int8 MACs per sample. "
            f"numba logits against onnxruntime on {result['images']} MNIST test images, "
            f"{_agreement_text(m['onnxruntime_agreement'])}; PyTorch fp32 predicts the same class on "
            f"{m['torch_fp32_same_class']:.2%}.",
            "",
            "| batch | threads | numba | onnxruntime | PyTorch fp32 | numba / onnxruntime |",
            "|---|---|---|---|---|---|",
            f"| 1 (us/call) | 1 | {lat['numba']:.1f} us | {lat['onnxruntime']:.1f} us | {lat['torch']:.1f} us | "
            f"{lat['numba'] / lat['onnxruntime']:.2f}x the time |",
        ]
        for threads, per_batch in m["throughput"].items():
            for batch, v in per_batch.items():
                lines.append(
                    f"| {batch} | {threads} | {v['numba']:,.0f} | {v['onnxruntime']:,.0f} | {v['torch']:,.0f} | "
                    f"{v['numba'] / v['onnxruntime']:.2f}x |"
                )
    lines += ["", "## Targets", "", "| model | what | required | measured | met |", "|---|---|---|---|---|"]
    for c in result["checks"]:
        measured = f"{c['ratio']:.2f}x"
        lines.append(f"| {c['model']} | {c['what']} | {c['required']} | {measured} | {'yes' if c['met'] else 'NO'} |")
    if result.get("compile"):
        comp = result["compile"]
        lines += [
            "",
            "## Compilation (fresh processes, model " + comp["model"] + f", {comp['threads']} threads)",
            "",
            "| numba cache | import kernels | load (compile or cache load, warm-up) |",
            "|---|---|---|",
            *[
                f"| {label} | {comp[label]['import_seconds']:.2f} s | {comp[label]['load_seconds']:.2f} s |"
                for label in ("cold", "warm")
            ],
            "",
            "A second model loaded in the same process reuses the compiled code: "
            f"{comp['second_model_seconds'] * 1e3:.1f} ms.",
        ]
    lines += ["", "![samples per second against batch size](kernels.png)"]
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {"numba": "tab:blue", "onnxruntime": "tab:orange", "torch": "tab:green"}
    for ax, m in zip(axes[0], models, strict=True):
        for threads, per_batch in m["throughput"].items():
            batches = [1] + [int(b) for b in per_batch]
            for backend in BACKENDS:
                values = [1e6 / m["latency_us"][backend]] + [per_batch[b][backend] for b in per_batch]
                style = "-" if threads == max(m["throughput"]) else "--"
                ax.plot(
                    batches, values, style, marker="o", color=colors[backend], label=f"{backend}, {threads} thread(s)"
                )
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples / s", title=m["model"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['date']} — {result['machine']} (batch 1: one thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=BUNDLED_REPOSITORY, help="model repository (default: bundled)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--seconds", type=float, default=0.3, help="minimum time per backend per round")
    parser.add_argument("--no-compile-times", action="store_true", help="skip the fresh-process compile timing")
    args = parser.parse_args()

    from models.data import load_dataset

    images = load_dataset("mnist").test.x
    load_start = os.getloadavg()[0]
    models = []
    for name in args.models:
        if not (args.repo / name / "1" / "manifest.json").is_file():
            print(f"skipping {name}: not in {args.repo}", file=sys.stderr)
            continue
        print(f"benchmarking {name}", flush=True)
        models.append(
            bench_model(name, args.repo, args.threads, rounds=args.rounds, seconds=args.seconds, images=images)
        )
    if not models:
        print("no model to benchmark", file=sys.stderr)
        return 2
    result = {
        **provenance("bench.kernels"),
        "isa": {"ran": sorted({m["isa"] for m in models}), "available": list(kernel_isa.available())},
        "images": len(images),
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "models": models,
        "checks": checks(models),
    }
    if not args.no_compile_times:
        first = args.repo / models[0]["model"] / "1" / "model.onnx"
        threads = max(args.threads)
        result["compile"] = {"model": models[0]["model"], "threads": threads, **_compile_times(first, threads)}
        start = time.perf_counter()
        NumbaModel.load(args.repo / models[-1]["model"] / "1" / "model.onnx", threads=threads)
        result["compile"]["second_model_seconds"] = round(time.perf_counter() - start, 4)
    result["load_average"]["end"] = round(os.getloadavg()[0], 2)
    write("kernels", result, _markdown(result))
    _plot(result, RESULTS / "kernels.png")
    met = all(c["met"] for c in result["checks"]) and all(m["onnxruntime_agreement"]["met"] for m in models)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

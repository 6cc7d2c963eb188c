"""``hegate bench peer`` without MLServer: the settings it writes for MLServer, the environment it
rebuilds only when the pins change, the runtime's decoding and encoding against onnxruntime, and
the report's arithmetic. MLServer itself lives in ``.venv-mlserver`` and is exercised by the
benchmark run (which checks both servers' logits before measuring), not here: building that
environment takes minutes and PyPI."""

from __future__ import annotations

import ast
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from bench import peer
from bench.load import sample_inputs
from bench.loadgen import LoadResult
from bench.mlserver.onnx_model import OnnxClassifier, TensorError
from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.cli import build_parser
from gateway.client.protocol import ModelInfo, infer_request, logits_of
from gateway.settings import BUNDLED_REPOSITORY
from models.repository import ModelRepository


@pytest.fixture(scope="module")
def artifact():
    return ModelRepository(BUNDLED_REPOSITORY).get(peer.MODEL)


@pytest.fixture(scope="module")
def images(artifact) -> np.ndarray:
    manifest = artifact.manifest
    return manifest.input.normalization.apply(sample_inputs(manifest.input.shape, 3))


def test_mlserver_settings_name_our_runtime_the_model_file_and_its_version(tmp_path, artifact):
    ports = peer.Ports(http=18080, grpc=18081, metrics=18082)
    folder = peer.mlserver_folder(
        tmp_path, model="m", version="1", onnx_path=artifact.onnx_path, config=peer.MLServerConfig(), ports=ports
    )
    settings = json.loads((folder / "settings.json").read_text())
    assert settings == {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": 18080,
        "grpc_port": 18081,
        "metrics_port": 18082,
        "metrics_endpoint": None,
        "parallel_workers": 0,
        "load_models_at_startup": True,
    }
    model = json.loads((folder / "m" / "model-settings.json").read_text())
    assert model == {
        "name": "m",
        "implementation": "bench.mlserver.runtime.OnnxRuntimeModel",
        "parameters": {"uri": str(artifact.onnx_path), "version": "1"},
    }
    assert Path(model["parameters"]["uri"]).is_absolute()


def test_the_implementation_path_names_a_class_of_the_runtime_module():
    """MLServer imports it by name from the repository root; hegate's environment cannot import it."""
    module, _, name = peer.RUNTIME.rpartition(".")
    source = peer.REPOSITORY_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    classes = {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.ClassDef)}
    assert name in classes


def test_metrics_and_workers_reach_the_settings(tmp_path, artifact):
    config = peer.MLServerConfig(parallel_workers=2, metrics=True)
    folder = peer.mlserver_folder(
        tmp_path, model="m", version="3", onnx_path=artifact.onnx_path, config=config, ports=peer.Ports(1, 2, 3)
    )
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["metrics_endpoint"] == "/metrics" and settings["parallel_workers"] == 2
    with pytest.raises(ValidationError):
        peer.MLServerConfig(parallel_workers=-1)
    with pytest.raises(ValidationError):
        peer.ServerSettings(http_port=1, grpc_port=2, metrics_port=3, metrics_endpoint=None, parallel_workers=0, x=1)


def test_requirements_pin_every_package_exactly():
    pins = [line for line in peer.REQUIREMENTS.read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in pins)
    assert {"mlserver", "onnxruntime", "numpy"} <= {line.split("==")[0].lower() for line in pins}


def test_the_environment_is_rebuilt_only_when_the_requirements_change(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("mlserver==1.0\n")
    venv = tmp_path / "venv"
    calls: list[list[str]] = []

    def fake_run(command, check):
        calls.append(command)
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        (venv / "bin" / "mlserver").touch()

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert peer.ensure_environment(venv, requirements) == venv / "bin" / "mlserver"
    assert [c[1:4] for c in calls] == [["-m", "venv", "--clear"], ["-m", "pip", "install"]]
    assert calls[1][-2:] == ["-r", str(requirements)]
    peer.ensure_environment(venv, requirements)
    assert len(calls) == 2  # the stamp matches: nothing to do
    requirements.write_text("mlserver==2.0\n")
    peer.ensure_environment(venv, requirements)
    assert len(calls) == 4 and (venv / peer.STAMP_NAME).read_text().strip() == peer.requirements_digest(requirements)


def test_free_ports_are_distinct():
    ports = peer.free_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)


def test_the_runtime_decodes_what_mlserver_unpacks_and_matches_onnxruntime(artifact, images):
    """hegate's SDK builds the request; MLServer unpacks ``raw_input_contents`` into a flat list of
    floats (little-endian float32, as the protocol says); our runtime's logits must equal a plain
    onnxruntime session's, and its encoding must read back through hegate's SDK as the same numbers."""
    info = ModelInfo(name=peer.MODEL, version="1", manifest=artifact.manifest, encrypted=False, lanes=0)
    request = oip.ModelInferRequest.FromString(infer_request(info, images).SerializeToString())
    (tensor,) = request.inputs
    unpacked = np.frombuffer(request.raw_input_contents[0], dtype="<f4").tolist()

    classifier = OnnxClassifier(artifact.onnx_path)
    x = classifier.decode(datatype=tensor.datatype, shape=list(tensor.shape), data=unpacked)
    assert x.dtype == np.float32 and x.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(x, images)
    logits = classifier.logits(x)
    reference = ort.InferenceSession(str(artifact.onnx_path)).run(None, {"input": images})[0]
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)
    assert np.array_equal(logits.argmax(1), reference.argmax(1))

    output = classifier.encode(logits)
    assert {k: output[k] for k in ("name", "datatype", "shape")} == {
        "name": artifact.manifest.output.name,
        "datatype": "FP32",
        "shape": [3, len(artifact.manifest.output.labels)],
    }
    response = oip.ModelInferResponse(
        outputs=[oip.ModelInferResponse.InferOutputTensor(name=output["name"], datatype="FP32", shape=output["shape"])],
        raw_output_contents=[np.asarray(output["data"], dtype="<f4").tobytes()],
    )
    np.testing.assert_array_equal(logits_of(response), logits)


@pytest.mark.parametrize(
    ("datatype", "shape", "count", "message"),
    [
        ("FP64", [1, 1, 28, 28], 784, "datatype must be FP32"),
        ("FP32", [1, 28, 28], 784, "shape must be"),
        ("FP32", [2, 1, 28, 28], 784, "do not fill"),
    ],
)
def test_the_runtime_refuses_tensors_that_do_not_fit(artifact, datatype, shape, count, message):
    with pytest.raises(TensorError, match=message):
        OnnxClassifier(artifact.onnx_path).decode(datatype=datatype, shape=shape, data=[0.0] * count)


def _window(ok: int, seconds: float, latency: float, errors: int = 0) -> tuple[LoadResult, dict]:
    statuses = Counter({"OK": ok} | ({"UNAVAILABLE": errors} if errors else {}))
    result = LoadResult(seconds=seconds, latencies=np.full(ok, latency), statuses=statuses)
    cpu = {
        "server_cpu_seconds": 0.5 * seconds,
        "server_main_thread_cpu_seconds": 0.4 * seconds,
        "generator_cpu_seconds": 0.3 * seconds,
        "other_cpu_cores": 0.05,
        "attempts": 1,
    }
    return result, cpu


def _report(levels: list[dict], targets: list[dict]) -> dict:
    """A run's result as :func:`bench.peer.run` assembles it, around hand-made levels."""
    return {
        "command": "python -m bench.peer",
        "date": "today",
        "machine": "here",
        "load_average_at_start": [0.0],
        "quick": True,
        "model": peer.MODEL,
        "generators": 1,
        "durations": {"rounds": 1, "window_seconds": 1.0, "warmup_seconds": 0.1},
        "mlserver": {"version": "mlserver 1.7.1", "config": peer.MLServerConfig().model_dump()},
        "agreement": {"requests": 16, "output": "logits", "datatype": "FP32", "max_abs_logit_difference": 0.0},
        "levels": levels,
        "targets": targets,
    }


def test_windows_pool_into_one_row_with_errors_by_status():
    row = peer.pooled([_window(100, 1.0, 0.001), _window(300, 1.0, 0.003, errors=2)])
    assert row["ok"] == 400 and row["requests"] == 402 and row["errors"] == {"UNAVAILABLE": 2}
    assert row["requests_per_second"] == 200.0 and row["windows_requests_per_second"] == [100.0, 300.0]
    assert row["p50_ms"] == 3.0 and row["server_cpu_cores"] == 0.5 and row["server_cpu_ms_per_request"] == 2.5


def test_targets_are_checked_at_every_level_and_reported():
    levels = [
        {"in_flight": 1, "throughput_ratio": 2.5, "p50_ratio": 0.4},
        {"in_flight": 32, "throughput_ratio": 1.5, "p50_ratio": None},  # MLServer answered nothing
    ]
    checks = peer.check_targets(levels)
    assert [(c["figure"], c["in_flight"], c["met"]) for c in checks] == [
        ("throughput_ratio", 1, True),
        ("p50_ratio", 1, True),
        ("throughput_ratio", 32, False),
        ("p50_ratio", 32, False),
    ]
    row = {name: peer.pooled([_window(100, 1.0, 0.001)]) for name in ("hegate", "mlserver")}
    text = peer.markdown(_report([{"in_flight": 1, **row}], checks))
    assert "| 1 | mlserver | 100 | 100 | 1.0 ms |" in text and "| throughput_ratio | 32 | 1.5 | >= 2.0 | NO |" in text


def test_the_cli_offers_the_command():
    args = build_parser().parse_args(["bench", "peer", "--quick", "--concurrency", "1", "8"])
    assert args.handler is peer.run and args.concurrency == [1, 8] and args.quick and args.mlserver_workers == 0


def test_the_floor_answers_every_call_with_its_fixed_bytes_and_is_stopped(tmp_path):
    import grpc

    from bench.floor import FloorProcess

    response = oip.ModelInferResponse(model_name="m", id="fixed").SerializeToString()
    (port,) = peer.free_ports(1)
    with FloorProcess(port, response, tmp_path) as floor:
        with grpc.insecure_channel(floor.target) as channel:
            call = channel.unary_unary(peer.PLAINTEXT_METHOD)
            assert [call(request, timeout=10) for request in (b"", b"\x00garbage")] == [response, response]
        main, whole, children = floor.cpu_seconds()
        assert 0 <= main <= whole and children == 0.0
    assert floor.process.poll() is not None


def test_a_level_reports_hegate_and_the_floor_over_mlserver():
    rows = {
        "hegate": peer.pooled([_window(300, 1.0, 0.002)]),
        "mlserver": peer.pooled([_window(100, 1.0, 0.004)]),
        "floor": peer.pooled([_window(400, 1.0, 0.001)]),
    }
    assert peer._ratios(rows, "hegate") == {"throughput_ratio": 3.0, "p50_ratio": 0.5}
    assert peer._ratios(rows, "floor", prefix="floor_") == {"floor_throughput_ratio": 4.0, "floor_p50_ratio": 0.25}
    assert peer._ratios({"mlserver": rows["mlserver"]}, "floor", prefix="floor_") == {}
    rows["hegate-aio"] = peer.pooled([_window(150, 1.0, 0.003)])
    ratios = peer._ratios(rows, "hegate") | peer._ratios(rows, "floor", prefix="floor_")
    level = {"in_flight": 1, **rows, **ratios, **peer._ratios(rows, "hegate-aio", prefix="aio_")}
    assert level["aio_throughput_ratio"] == 1.5 and level["aio_p50_ratio"] == 0.75
    text = peer.markdown(_report([level], []))
    assert "| 1 | floor | 400 |" in text and "| 1 | 4.0 | 0.25 | 0.75 | 2.00 |" in text
    assert "| 1 | hegate-aio | 150 |" in text and "| 1 | 1.5 | 0.75 |" in text

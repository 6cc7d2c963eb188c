"""The graph compiler, the load-time refusals and the onnxruntime fallback."""

from __future__ import annotations

import logging

import numba
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from kernels import NumbaModel, UnsupportedModelError, jitcache
from kernels import isa as kernel_isa
from kernels.compiler import compile_file, compile_model
from kernels.loader import OnnxRuntimeModel, load_backend
from kernels.plan import AvgPool, Conv, Dequantize, Gemm, Quantize, Square
from kernels.testing import QdqGraph, random_weights
from models import onnx_runtime
from models.errors import InvalidArgumentError, ModelArtifactError
from models.quantization import QuantParams


def _small_cnn(weight_limit: int = 63, *, final_dequantize: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = QdqGraph([1, 8, 8], QuantParams(0.02, 128))
    weight = random_weights(rng, (4, 1, 3, 3), limit=weight_limit)
    graph.conv(weight, np.full(4, 0.01), np.zeros(4), QuantParams(0.05, 100), pads=(1, 1, 1, 1))
    graph.square(QuantParams(0.02, 0)).avg_pool((2, 2), QuantParams(0.02, 0)).flatten()
    output = QuantParams(0.1, 128) if final_dequantize else None
    return graph.gemm(random_weights(rng, (10, 64)), np.full(10, 0.01), np.zeros(10), output).build()


def _replace_node(model: onnx.ModelProto, op_type: str, new: onnx.NodeProto) -> onnx.ModelProto:
    nodes = [new if node.op_type == op_type else node for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_exported_models_compile_to_fused_plans(trained_repo):
    """The exporter's last layer writes float logits (a float-output QGemm in onnxruntime)."""
    cnn = compile_file(next(trained_repo.glob("digits-cnn-*/1/model.onnx")))
    assert [type(s) for s in cnn.steps] == [Quantize, Conv, AvgPool, Gemm]
    assert isinstance(cnn.steps[1].activation, Square) and cnn.steps[-1].output is None
    mlp = compile_file(next(trained_repo.glob("digits-mlp-*/1/model.onnx")))
    assert [type(s) for s in mlp.steps] == [Quantize, Gemm, Gemm]
    assert isinstance(mlp.steps[1].activation, Square) and mlp.steps[2].activation is None
    assert mlp.num_outputs == 10


def test_final_dequantize_graphs_still_compile():
    plan = compile_model(_small_cnn(final_dequantize=True))
    assert [type(s) for s in plan.steps] == [Quantize, Conv, AvgPool, Gemm, Dequantize]


def test_float_output_from_anything_but_a_gemm_is_refused():
    """onnxruntime runs e.g. a float-output Conv in float32: not something integer kernels reproduce."""
    graph = QdqGraph([1, 8, 8], QuantParams(0.02, 128))
    graph.conv(
        random_weights(np.random.default_rng(0), (4, 1, 3, 3)), np.full(4, 0.01), np.zeros(4), QuantParams(0.05, 100)
    )
    graph.nodes.pop()  # drop the convolution's QuantizeLinear: the convolution writes the output
    conv = graph.nodes[-1]
    assert conv.op_type == "Conv"
    conv.output[0] = "logits"
    graph.tensor = None
    with pytest.raises(UnsupportedModelError, match=r"\(Conv\): writes the float graph output"):
        compile_model(graph.build())


def test_unknown_operator_is_refused_naming_the_node():
    model = _small_cnn()
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    max_pool = helper.make_node(
        "MaxPool", list(pool.input), list(pool.output), name="the_max_pool", kernel_shape=[2, 2], strides=[2, 2]
    )
    with pytest.raises(UnsupportedModelError, match=r"'the_max_pool' \(MaxPool\)"):
        compile_model(_replace_node(model, "AveragePool", max_pool))


def test_product_of_two_tensors_is_refused():
    model = _small_cnn()
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    input_dq = model.graph.node[1]  # the dequantized network input, which the convolution reads
    assert input_dq.op_type == "DequantizeLinear"
    bad = helper.make_node("Mul", [mul.input[0], input_dq.output[0]], list(mul.output), name=mul.name)
    with pytest.raises(UnsupportedModelError, match=r"only x \* x"):
        compile_model(_replace_node(model, "Mul", bad))


def test_asymmetric_weights_are_refused():
    model = _small_cnn()
    zero = next(
        i
        for i in model.graph.initializer
        if "conv_w" in i.name and i.name.endswith(".zero_point") and "bias" not in i.name
    )
    zero.CopyFrom(numpy_helper.from_array(np.full(4, 3, np.int8), zero.name))
    with pytest.raises(UnsupportedModelError, match="zero zero-points"):
        compile_model(model)


def test_bias_at_another_scale_is_refused():
    model = _small_cnn()
    scale = next(i for i in model.graph.initializer if i.name.endswith(".bias.scale") and "conv" in i.name)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(2), scale.name))
    with pytest.raises(UnsupportedModelError, match="bias scale"):
        compile_model(model)


def test_signed_activations_are_refused():
    model = _small_cnn()
    first = model.graph.node[0]
    zero = next(i for i in model.graph.initializer if i.name == first.input[2])
    zero.CopyFrom(numpy_helper.from_array(np.array(0, np.int8), zero.name))
    with pytest.raises(UnsupportedModelError, match="uint8 per-tensor"):
        compile_model(model)


def test_ceil_mode_pooling_is_refused():
    model = _small_cnn()
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    pool.attribute.append(helper.make_attribute("ceil_mode", 1))
    with pytest.raises(UnsupportedModelError, match="ceil_mode"):
        compile_model(model)


@pytest.mark.parametrize("isa", kernel_isa.available())
def test_full_range_int8_weights_are_refused_at_load(isa):
    """Weights beyond the 7-bit range could saturate vpmaddubsw (and onnxruntime's AVX2 kernels);
    the VNNI path, exact there, refuses them too, so that whether a model loads never depends on the CPU."""
    with pytest.raises(UnsupportedModelError, match=r"conv\d+.*\|w0\| \+ \|w1\|"):
        NumbaModel.from_onnx(_small_cnn(weight_limit=127), warm_up=False, isa=isa)


def test_unsupported_model_falls_back_to_onnxruntime_with_a_warning(tmp_path, caplog):
    path = tmp_path / "model.onnx"
    onnx.save(_small_cnn(weight_limit=127), str(path))
    with caplog.at_level(logging.WARNING, logger="kernels.loader"):
        backend = load_backend(path)
    assert isinstance(backend, OnnxRuntimeModel) and backend.backend == "onnxruntime"
    assert "serving it with onnxruntime" in caplog.text and "conv" in caplog.text
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    expected = onnx_runtime.predict_logits(onnx_runtime.create_session(path), x)
    np.testing.assert_array_equal(backend.predict_logits(x), expected)
    with pytest.raises(UnsupportedModelError):
        load_backend(path, strict=True)


def test_supported_model_loads_the_numba_backend(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_small_cnn(), str(path))
    backend = load_backend(path)
    assert isinstance(backend, NumbaModel) and backend.backend == "numba"
    assert backend.warmup_seconds > 0
    assert backend.isa == kernel_isa.select()


def test_unreadable_file_is_an_artifact_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(ModelArtifactError, match="not a loadable ONNX model"):
        compile_file(path)


def test_inputs_are_checked_before_the_kernels_run():
    model = NumbaModel.from_onnx(_small_cnn())
    with pytest.raises(InvalidArgumentError, match="float32"):
        model.predict_logits(np.zeros((2, 1, 8, 8), np.float64))
    with pytest.raises(InvalidArgumentError, match=r"\[batch, 1, 8, 8\]"):
        model.predict_logits(np.zeros((2, 64), np.float32))
    with pytest.raises(InvalidArgumentError):
        model.predict_logits([[0.0] * 64])
    assert model.predict_logits(np.zeros((0, 1, 8, 8), np.float32)).shape == (0, 10)


@pytest.mark.parametrize("threads", [0, numba.config.NUMBA_NUM_THREADS + 1])
def test_thread_count_must_fit_numbas_pool(threads):
    with pytest.raises(InvalidArgumentError, match="threads"):
        NumbaModel(compile_model(_small_cnn()), threads=threads)


def test_cache_stamp_covers_every_kernel_module():
    """numba would otherwise serve stale machine code after an edit to ops.py or simd.py alone."""
    assert len(jitcache.package_stamp()) == 64
    sources = {p.name for p in jitcache.PACKAGE_DIR.glob("*.py")}
    assert {"ops.py", "simd.py", "executor.py"} <= sources
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    assert any(getattr(cls, "_hegate_kernels", False) for cls in impl._locator_classes)


def test_threads_start_only_when_every_worker_gets_enough_work():
    plan = compile_model(_small_cnn())
    model = NumbaModel(plan, threads=2, parallel_min_macs=10 * plan.macs_per_sample())
    assert model.schedule(1) == (1, 1)
    assert model.schedule(19)[0] == 1  # 19 rows: not 10 per worker
    workers, chunk = model.schedule(4096)
    assert workers == 2 and 5 <= chunk <= 4096 // 8
    assert NumbaModel(plan, threads=1).schedule(4096)[0] == 1


# ---- uint16 activations (A16W8) -------------------------------------------------------------

WIDE = QuantParams(0.001, 30000, bits=16)


def _a16w8_mlp(rng: np.random.Generator, *, k: int = 64) -> QdqGraph:
    graph = QdqGraph([k], QuantParams(0.02, 128))
    graph.gemm(random_weights(rng, (16, k)), np.full(16, 0.01), rng.integers(-99, 99, 16), WIDE)
    return graph.square(QuantParams(0.002, 0, bits=16))


def test_a16w8_graphs_compile_to_16_bit_plans():
    rng = np.random.default_rng(30)
    graph = _a16w8_mlp(rng)
    plan = compile_model(graph.gemm(random_weights(rng, (10, 16)), np.full(10, 0.01), np.zeros(10), None).build())
    assert [type(s) for s in plan.steps] == [Quantize, Gemm, Gemm]
    assert isinstance(plan.steps[1].activation, Square) and plan.steps[1].output.bits == 16
    assert [t.bits for t in plan.tensors] == [8, 16] and plan.has_16_bit
    assert plan.describe()[1].endswith("[16] uint16")
    assert not compile_model(_small_cnn()).has_16_bit
    # a uint16 tensor as the graph output, through a DequantizeLinear
    plan = compile_model(_a16w8_mlp(rng).build())
    assert isinstance(plan.steps[-1], Dequantize) and plan.num_outputs == 16


def test_exported_mlp_is_a16w8_and_cnn_uint8(trained_repo):
    mlp = compile_file(next(trained_repo.glob("digits-mlp-*/1/model.onnx")))
    assert mlp.has_16_bit and mlp.steps[1].output.bits == 16 and mlp.steps[1].activation.output.bits == 16
    assert not compile_file(next(trained_repo.glob("digits-cnn-*/1/model.onnx"))).has_16_bit


def _refused(graph: QdqGraph, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        compile_model(graph.build())


@pytest.mark.parametrize("operator", ["conv", "avg_pool", "relu"])
def test_operators_without_a_16_bit_form_are_refused_naming_the_node(operator):
    rng = np.random.default_rng(31)
    graph = QdqGraph([2, 6, 6], WIDE)  # a uint16 input
    if operator == "conv":
        graph.conv(random_weights(rng, (3, 2, 3, 3)), np.full(3, 0.01), np.zeros(3), QuantParams(0.05, 100))
    elif operator == "avg_pool":
        graph.avg_pool((2, 2), QuantParams(0.05, 100))
    else:
        graph.relu(QuantParams(0.05, 0))
    name = {"conv": r"conv\d+' \(Conv", "avg_pool": r"averagepool\d+' \(AveragePool", "relu": r"relu\d+' \(Relu"}
    _refused(graph.flatten(), rf"node '{name[operator]}\): reads or writes a uint16 tensor")


@pytest.mark.parametrize("operator", ["conv", "avg_pool", "relu"])
def test_operators_writing_uint16_are_refused(operator):
    rng = np.random.default_rng(32)
    graph = QdqGraph([2, 6, 6], QuantParams(0.02, 128))
    if operator == "conv":
        graph.conv(random_weights(rng, (3, 2, 3, 3)), np.full(3, 0.01), np.zeros(3), WIDE)
    elif operator == "avg_pool":
        graph.avg_pool((2, 2), WIDE)
    else:
        graph.relu(WIDE)
    _refused(graph.flatten(), r"node '\w+' \((Conv|AveragePool|Relu)\): reads or writes a uint16 tensor")


def test_mixtures_of_uint8_and_uint16_are_refused():
    rng = np.random.default_rng(33)
    _refused(
        QdqGraph([40], QuantParams(0.02, 128)).square(WIDE), r"'mul\d+' \(Mul\): a square from a uint8 to a uint16"
    )
    _refused(QdqGraph([40], WIDE).square(QuantParams(0.02, 0)), r"'mul\d+' \(Mul\): a square from a uint16 to a uint8")
    graph = QdqGraph([40], WIDE).gemm(random_weights(rng, (8, 40)), np.full(8, 0.01), np.zeros(8), QuantParams(0.1, 9))
    _refused(graph, r"'gemm\d+' \(Gemm\): a Gemm from a uint16 to a uint8 tensor")


def test_16_bit_gemm_whose_sums_could_overflow_int32_is_refused_naming_it():
    """A uint16 input has |q - zp| up to 65535: with 7-bit weights, 521 inputs can pass 2**31."""
    weight = np.full((4, 521), 63, np.int8)
    graph = QdqGraph([521], QuantParams(0.001, 0, bits=16)).gemm(weight, np.full(4, 0.01), np.zeros(4), None)
    _refused(graph, r"'logits' \(Gemm\): its integer sums could reach 2151055305 .* beyond int32")
    fits = QdqGraph([520], QuantParams(0.001, 0, bits=16)).gemm(weight[:, :520], np.full(4, 0.01), np.zeros(4), None)
    assert compile_model(fits.build()).has_16_bit  # 65535 * 63 * 520 < 2**31
    bias = np.array([2**31 - 1 - 65535 * 63 * 520 + 1, 0, 0, 0])
    over = QdqGraph([520], QuantParams(0.001, 0, bits=16)).gemm(weight[:, :520], np.full(4, 0.01), bias, None)
    _refused(over, "beyond int32")
    # a uint8 input needs about 133,700 inputs to get there; the bias alone can
    wide_bias = np.array([2**31 - 100, 0])
    graph = QdqGraph([8], QuantParams(0.02, 128)).gemm(np.full((2, 8), 63, np.int8), np.full(2, 0.01), wide_bias, WIDE)
    _refused(graph, r"'gemm\d+' \(Gemm\): its integer sums could reach")


def test_a16w8_model_loads_the_numba_backend(tmp_path):
    rng = np.random.default_rng(34)
    path = tmp_path / "model.onnx"
    graph = _a16w8_mlp(rng)
    onnx.save(graph.gemm(random_weights(rng, (10, 16)), np.full(10, 0.01), np.zeros(10), None).build(), str(path))
    backend = load_backend(path, strict=True)
    assert isinstance(backend, NumbaModel) and backend.plan.has_16_bit


def test_uint16_named_by_output_dtype_without_a_zero_point():
    """QuantizeLinear may give its type as ``output_dtype`` (opset 21) instead of a zero point."""
    model = QdqGraph([300], QuantParams(0.0007, 0, bits=16)).build()
    for node in model.graph.node:  # drop both zero points; the QuantizeLinear names uint16 instead
        del node.input[2]
        if node.op_type == "QuantizeLinear":
            node.attribute.append(helper.make_attribute("output_dtype", onnx.TensorProto.UINT16))
    plan = compile_model(model)
    assert plan.tensors[0].params == QuantParams(float(np.float32(0.0007)), 0, bits=16)
    x = np.random.default_rng(35).uniform(-10, 50, (4, 300)).astype(np.float32)
    expected = onnx_runtime.predict_logits(onnx_runtime.create_session(model.SerializeToString()), x)
    np.testing.assert_array_equal(NumbaModel(plan).predict_logits(x), expected)
    assert (expected == np.float32(65535 * np.float32(0.0007))).any()  # saturated at 65535, not 255

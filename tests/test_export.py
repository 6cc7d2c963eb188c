"""The exported int8 ONNX model against the PyTorch int8 reference and the fp32 model."""

from __future__ import annotations

import numpy as np
import onnx

from models import onnx_runtime
from models.int8_reference import reference_logits


def test_onnxruntime_matches_the_pytorch_int8_reference(exported_cnn, digits):
    """Every intermediate uint8 tensor is identical, so the float logits agree to float rounding."""
    x = digits.normalize(digits.test.x)
    session = onnx_runtime.create_session(exported_cnn.artifact.onnx_path)
    ort_logits = onnx_runtime.predict_logits(session, x)
    torch_logits = reference_logits(exported_cnn.network, x)
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=1e-5, atol=1e-5 * np.abs(torch_logits).max())
    assert (ort_logits.argmax(1) == torch_logits.argmax(1)).all()


def test_logits_are_not_requantized(exported_cnn):
    model = onnx.load(str(exported_cnn.artifact.onnx_path))
    last = model.graph.node[-1]
    assert last.op_type == "Gemm" and last.output[0] == model.graph.output[0].name
    assert exported_cnn.network.layers[-1].output is None


def test_int8_accuracy_is_close_to_fp32(exported_cnn):
    metrics = exported_cnn.artifact.manifest.metrics
    assert abs(metrics.int8_accuracy - metrics.fp32_accuracy) <= 0.02
    assert metrics.int8_accuracy > 0.85


def test_result_for_one_input_does_not_depend_on_its_batch(exported_cnn, digits):
    x = digits.normalize(digits.test.x[:64])
    session = onnx_runtime.create_session(exported_cnn.artifact.onnx_path)
    alone = np.concatenate([onnx_runtime.predict_logits(session, x[i : i + 1]) for i in range(len(x))])
    together = onnx_runtime.predict_logits(session, x)
    with_outlier = onnx_runtime.predict_logits(session, np.concatenate([x, np.full_like(x[:1], 1e4)]))[:-1]
    np.testing.assert_array_equal(alone, together)
    np.testing.assert_array_equal(alone, with_outlier)


def test_graph_is_int8_qdq_with_per_channel_weights(exported_cnn):
    model = onnx.load(str(exported_cnn.artifact.onnx_path))
    ops = [node.op_type for node in model.graph.node]
    assert {"Conv", "Gemm", "Mul", "AveragePool"} <= set(ops)
    assert set(ops) <= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Mul", "AveragePool", "Flatten"}
    weights = {i.name: i for i in model.graph.initializer if i.name.endswith("weight.q")}
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights.values())
    weight_scales = [i for i in model.graph.initializer if i.name.endswith("weight.scale")]
    assert all(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales)


def test_an_a16w8_mlp_has_uint16_hidden_activations_at_opset_21(trained_repo):
    """The digits MLP's recipe asks for 16-bit hidden activations; its input stays on the uint8 grid."""
    model = onnx.load(str(trained_repo / "digits-mlp-eps3" / "1" / "model.onnx"))
    assert model.opset_import[0].version == 21
    zero_points = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("zero_point")}
    assert zero_points["input.zero_point"] == onnx.TensorProto.UINT8
    assert zero_points["layer1.zero_point"] == zero_points["layer2.zero_point"] == onnx.TensorProto.UINT16
    cnn = onnx.load(str(trained_repo / "digits-cnn-eps3" / "1" / "model.onnx"))
    assert cnn.opset_import[0].version == 17
    assert all(i.data_type != onnx.TensorProto.UINT16 for i in cnn.graph.initializer)


def test_onnxruntime_gives_the_a16w8_mlp_the_exact_networks_classes(trained_repo, digits):
    """With 16-bit hidden activations onnxruntime's rounding changes no class of the exact network
    (the int8 model without intermediate rounding, what the CKKS engine evaluates)."""
    from gateway.he.graph import lower
    from models.recipes import recipe_from_manifest
    from models.repository import load_artifact

    artifact = load_artifact(trained_repo / "digits-mlp-eps3" / "1")
    assert recipe_from_manifest(artifact.manifest).activation_bits == 16
    assert "uint16" in artifact.manifest.quantization.activations
    x = digits.normalize(digits.test.x)
    ort_logits = onnx_runtime.predict_logits(onnx_runtime.create_session(artifact.onnx_path), x)
    np.testing.assert_array_equal(ort_logits.argmax(1), lower(artifact.onnx_path).evaluate(x).argmax(1))
    assert abs(artifact.manifest.metrics.int8_accuracy - artifact.manifest.metrics.fp32_accuracy) <= 0.01

"""End to end on real ciphertexts: bundled models, encrypted against onnxruntime's int8 logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tenseal.sealapi as seal

from gateway.cli import BUNDLED_REPOSITORY
from gateway.he.client import ClientKeys
from gateway.he.graph import UnsupportedOperatorError
from gateway.he.plan import EncryptedModel
from models import onnx_runtime
from models.data import load_dataset
from models.errors import InvalidArgumentError
from models.repository import ModelRepository


def _encrypted_vs_onnxruntime(name: str, count: int):
    artifact = ModelRepository(BUNDLED_REPOSITORY).get(name)
    model = EncryptedModel(artifact.onnx_path)
    client = ClientKeys(model.spec)
    keys = model.load_keys(*client.evaluation_keys())
    data = load_dataset(artifact.manifest.dataset)
    x = artifact.manifest.input.normalization.apply(data.test.x[:count])
    reference = onnx_runtime.predict_logits(onnx_runtime.create_session(artifact.onnx_path), x)
    encrypted = np.stack([client.decrypt(model.evaluate(client.encrypt(row), keys)) for row in x])
    return model, encrypted, reference


def test_breast_cancer_logits_match_onnxruntime():
    model, encrypted, reference = _encrypted_vs_onnxruntime("breast-cancer-linear-eps3", 30)
    assert model.spec.parameters.poly_modulus_degree == 4096
    np.testing.assert_allclose(encrypted, reference, atol=0.05)
    assert (encrypted.argmax(1) == reference.argmax(1)).all()


def test_mnist_mlp_predicts_like_onnxruntime():
    """Under encryption no activation is rounded to uint8, so logits differ by that rounding only."""
    model, encrypted, reference = _encrypted_vs_onnxruntime("mnist-mlp-eps3", 4)
    assert model.spec.parameters.depth == 3 and sum(model.spec.parameters.coeff_modulus_bits) <= 218
    assert (encrypted.argmax(1) == reference.argmax(1)).all()
    assert np.abs(encrypted - reference).max() < 0.05 * np.abs(reference).max()


def test_server_side_model_holds_no_secret_key():
    artifact = ModelRepository(BUNDLED_REPOSITORY).get("breast-cancer-linear-eps3")
    model = EncryptedModel(artifact.onnx_path)
    seen = [model, *vars(model).values(), *(vars(layer) for layer in model._layers if layer is not None)]
    for value in seen:
        values = value.values() if isinstance(value, dict) else [value]
        assert not any(isinstance(v, seal.SecretKey) for v in values)
    assert "secret" not in model.spec.model_dump_json().lower()


def test_unsupported_operator_is_refused_at_load_naming_the_node(tmp_path):
    artifact = ModelRepository(BUNDLED_REPOSITORY).get("mnist-mlp-eps3")
    model = onnx.load(str(artifact.onnx_path))
    square = next(node for node in model.graph.node if node.op_type == "Mul")
    square.op_type = "Relu"
    del square.input[1]
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOperatorError, match=rf"operator Relu \(node '{square.name}'\)"):
        EncryptedModel(path)


@pytest.fixture(scope="module")
def breast_cancer():
    artifact = ModelRepository(BUNDLED_REPOSITORY).get("breast-cancer-linear-eps3")
    model = EncryptedModel(artifact.onnx_path)
    client = ClientKeys(model.spec)
    return model, client, model.load_keys(*client.evaluation_keys())


def test_broken_ciphertext_bytes_are_refused(breast_cancer):
    model, client, keys = breast_cancer
    good = client.encrypt(np.zeros(30, np.float32))
    for bad in (good[: len(good) // 2], good[:100], b"", b"\x00" * 64, b"\xff" * len(good)):
        with pytest.raises(InvalidArgumentError):
            model.evaluate(bad, keys)
    assert len(client.decrypt(model.evaluate(good, keys))) == 2  # the model still works


def test_ciphertext_under_other_parameters_is_refused(breast_cancer):
    model, _, keys = breast_cancer
    mnist = EncryptedModel(ModelRepository(BUNDLED_REPOSITORY).get("mnist-mlp-eps3").onnx_path)
    other = ClientKeys(mnist.spec).encrypt(np.zeros([1, 28, 28], np.float32))
    with pytest.raises(InvalidArgumentError, match="not valid for this model's parameters"):
        model.evaluate(other, keys)


def test_keys_under_other_parameters_are_refused(breast_cancer):
    model, _, _ = breast_cancer
    mnist = EncryptedModel(ModelRepository(BUNDLED_REPOSITORY).get("mnist-mlp-eps3").onnx_path)
    relin, galois = ClientKeys(mnist.spec).evaluation_keys()
    with pytest.raises(InvalidArgumentError, match="relinearization key is not valid"):
        model.load_keys(relin, galois)


def test_client_refuses_wrong_shape_and_dtype():
    artifact = ModelRepository(BUNDLED_REPOSITORY).get("breast-cancer-linear-eps3")
    keys = ClientKeys(EncryptedModel(artifact.onnx_path).spec)
    with pytest.raises(InvalidArgumentError, match=r"shape \[30\]"):
        keys.encrypt(np.zeros(29, np.float32))
    with pytest.raises(InvalidArgumentError, match="float32"):
        keys.encrypt(np.zeros(30, np.float64))

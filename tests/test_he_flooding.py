"""The circuit_private profile on real ciphertexts: right classes within the stated bound, a flood
that is really there (and absent from the other profiles), slots that hold nothing but logits,
and public keys required exactly where the profile needs them."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import tenseal.sealapi as seal

from gateway.he.client import ClientKeys
from gateway.he.flooding import FLOODING_BITS, choose_private_parameters
from gateway.he.graph import lower
from gateway.he.plan import EncryptedModel, compile_plan
from gateway.he.wire import load_ciphertext
from gateway.settings import BUNDLED_REPOSITORY
from models import onnx_runtime
from models.data import load_dataset
from models.errors import InvalidArgumentError
from models.repository import ModelRepository

REPOSITORY = ModelRepository(BUNDLED_REPOSITORY)
SAMPLE = 1000  # the fixed sample of the other profiles' agreement test: the first 1,000 test inputs
CHECKED = 8  # inputs encrypted besides every close call


def _private(name: str) -> tuple[EncryptedModel, ClientKeys, object]:
    model = EncryptedModel(REPOSITORY.get(name).onnx_path, profile="circuit_private")
    client = ClientKeys(model.spec)
    return model, client, model.load_keys(*client.evaluation_keys(), client.public_key())


@pytest.fixture(scope="module")
def cancer():
    return _private("breast-cancer-linear-eps3")


def _all_slots(client: ClientKeys, result: bytes) -> np.ndarray:
    """Every slot of a result, decoded with the client's secret key (not only the logits)."""
    plaintext = seal.Plaintext()
    seal.Decryptor(client.context, client._secret_key).decrypt(load_ciphertext(client.context, result), plaintext)
    return np.array(client._encoder.decode_double(plaintext))


@pytest.mark.parametrize("name", ["mnist-cnn-eps3", "mnist-mlp-eps3", "breast-cancer-linear-eps3"])
def test_circuit_private_logits_are_within_the_stated_bound_and_agree_with_onnxruntime(name):
    """The other profiles' check, flood included in the bound: where the exact network's margin
    exceeds twice the bound the encrypted class is the exact one; every closer call of the fixed
    sample is encrypted, with a few others, and checked."""
    artifact = REPOSITORY.get(name)
    model, client, keys = _private(name)
    spec = model.spec
    assert spec.precision == "circuit_private" and spec.circuit_privacy.statistical_security_bits == FLOODING_BITS
    data = load_dataset(artifact.manifest.dataset)
    x = artifact.manifest.input.normalization.apply(data.test.x[:SAMPLE])
    exact = lower(artifact.onnx_path).evaluate(x)
    reference = onnx_runtime.predict_logits(onnx_runtime.create_session(artifact.onnx_path), x).argmax(1)
    bound = spec.logit_error_bound
    top2 = np.sort(exact, axis=1)[:, -2:]
    close = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * bound)
    checked = np.union1d(np.arange(CHECKED), close)
    lanes = spec.packing.lanes
    batches = [checked[i : i + lanes] for i in range(0, len(checked), lanes)]
    encrypted = np.concatenate(
        [client.decrypt_unrounded_unsafe(model.evaluate(client.encrypt(x[b]), keys), len(b)) for b in batches]
    )
    assert np.abs(encrypted - exact[checked]).max() <= bound
    predicted = exact.argmax(1)
    predicted[checked] = encrypted.argmax(1)
    assert np.mean(predicted == exact.argmax(1)) >= 0.999
    agreement = float(np.mean(predicted == reference))
    assert agreement >= 0.999, f"{name}: {agreement:.2%} agree with onnxruntime"


def test_the_flood_is_there_and_the_other_profiles_have_none(cancer):
    """Two evaluations of one ciphertext: bit-identical under standard (evaluation is deterministic),
    apart by the flood under circuit_private (each slot's difference has twice the flood's variance)."""
    model, client, keys = cancer
    x = load_dataset("breast_cancer").test.x
    x = REPOSITORY.get("breast-cancer-linear-eps3").manifest.input.normalization.apply(x)[: model.spec.packing.lanes]
    ciphertext = client.encrypt(x)
    first, second = (_all_slots(client, model.evaluate(ciphertext, keys)) for _ in range(2))
    measured = float(np.std(first - second) / math.sqrt(2))
    stated = model.spec.circuit_privacy.flooding_logit_std
    assert 0.8 * stated <= measured <= 1.2 * stated, (measured, stated)

    standard = EncryptedModel(model.path)
    plain = ClientKeys(standard.spec)
    standard_keys = standard.load_keys(*plain.evaluation_keys())
    again = plain.encrypt(x[: standard.spec.packing.lanes])
    assert np.array_equal(*(_all_slots(plain, standard.evaluate(again, standard_keys)) for _ in range(2)))


def test_every_slot_of_a_private_result_holds_a_logit_or_a_zero(cancer):
    """The flood hides the error, not the slots' values: every slot must hold what the logits
    determine (replicated copies or zeros), never a partial sum of the model."""
    model, client, keys = cancer
    spec = model.spec
    lanes, outputs = spec.packing.lanes, spec.packing.outputs
    x = np.random.default_rng(0).normal(size=(lanes - 3, 30)).astype(np.float32)  # three lanes left empty
    exact = lower(model.path).evaluate(np.concatenate([x, np.zeros((3, 30), np.float32)]))
    exact[-3:] = lower(model.path).stages[-1].bias  # an empty lane holds a zero input: the bias
    period = model._layers[-1].plan.output_period
    position = np.arange(spec.packing.virtual_slots) % period
    expected = np.where(position[:, None] < outputs, exact.T[np.minimum(position, outputs - 1)], 0.0)
    slots = _all_slots(client, model.evaluate(client.encrypt(x), keys)).reshape(spec.packing.virtual_slots, lanes)
    assert np.abs(slots - expected).max() <= spec.logit_error_bound


def test_a_private_plan_needs_the_public_key_and_the_others_refuse_one(cancer):
    model, client, _ = cancer
    relin, galois = client.evaluation_keys()
    with pytest.raises(InvalidArgumentError, match="circuit_private profile needs the client's public key"):
        model.load_keys(relin, galois)
    with pytest.raises(InvalidArgumentError, match="public key is not valid"):
        model.load_keys(relin, galois, b"\x00" * 100)
    standard = EncryptedModel(model.path)
    plain = ClientKeys(standard.spec)
    with pytest.raises(InvalidArgumentError, match="used by the circuit_private profile only"):
        standard.load_keys(*plain.evaluation_keys(), plain.public_key())


def test_private_parameters_drop_two_primes_a_layer_and_state_the_flood():
    spec, _ = compile_plan(REPOSITORY.get("mnist-cnn-eps3").onnx_path, profile="circuit_private")
    params, privacy = spec.parameters, spec.circuit_privacy
    assert params.poly_modulus_degree == 16384 and len(params.coeff_modulus_bits) == 2 + 2 * 3 + 1
    assert [layer.levels for layer in spec.layers] == [2, 2, 2]
    assert privacy.flooding_bits >= FLOODING_BITS + math.log2(privacy.evaluation_noise_bound)
    assert privacy.statistical_distance == params.poly_modulus_degree * 2.0 ** -(FLOODING_BITS + 1)
    assert privacy.flooding_logit_bound <= spec.logit_error_bound < 0.05


def test_standard_and_high_specs_serialize_as_before_so_older_clients_parse_them():
    path = REPOSITORY.get("breast-cancer-linear-eps3").onnx_path
    for profile in ("standard", "high"):
        assert "circuit_privacy" not in json.loads(compile_plan(path, profile=profile)[0].model_dump_json())
    assert "circuit_privacy" in json.loads(compile_plan(path, profile="circuit_private")[0].model_dump_json())


def test_no_ring_is_chosen_when_the_flood_would_swamp_the_logits():
    with pytest.raises(InvalidArgumentError, match="no ring holds"):
        choose_private_parameters(
            depth=3,
            slots_needed=4096,
            value_bound=1e3,
            evaluation_bound=lambda params: 1e-9,  # an evaluation far noisier than any real one
            noise_per_operation=lambda degree: 32.0 * degree,
        )


@pytest.mark.parametrize("bits", [None, 70])  # the spec's (int64 arithmetic) and a wider one (Python integers)
def test_the_flood_is_uniform_on_its_stated_range(cancer, bits):
    """Reconstructed from its residues (CRT over the two primes), every coefficient lies in
    [-2**b, 2**b) and the spread is a uniform's (standard deviation 2**b / sqrt(3))."""
    model, _, _ = cancer
    flooder = model._flooder
    if bits is not None:
        flooder = copy.copy(flooder)
        flooder.bits = bits
    residues = flooder.flood()
    (p, q), b = flooder.primes, flooder.bits
    assert p * q > 2 ** (b + 2)
    values = [(int(r0) * q * pow(q, -1, p) + int(r1) * p * pow(p, -1, q)) % (p * q) for r0, r1 in residues.T]
    values = np.array([v - p * q if v >= p * q // 2 else v for v in values], dtype=object)
    assert min(values) >= -(2**b) and max(values) < 2**b
    spread = float(np.std(np.array(values, dtype=np.float64))) / 2.0**b
    assert abs(spread - 1 / math.sqrt(3)) < 0.02
    assert len(set(values)) == len(values)  # fresh bits for every coefficient

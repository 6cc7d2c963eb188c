"""End to end on real ciphertexts: every bundled model against its exact network and onnxruntime."""

from __future__ import annotations

import functools
import multiprocessing
import struct
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx
import pytest
import tenseal
import tenseal.sealapi as seal

from gateway.cli import BUNDLED_REPOSITORY
from gateway.he.client import ClientKeys, logit_grid
from gateway.he.graph import UnsupportedOperatorError, lower
from gateway.he.plan import EncryptedModel, compile_plan
from gateway.he.wire import dump, load_ciphertext
from models import onnx_runtime
from models.data import load_dataset
from models.errors import InvalidArgumentError
from models.repository import ModelRepository

REPOSITORY = ModelRepository(BUNDLED_REPOSITORY)
AT_LEAST = 200  # inputs encrypted per model and ring, in whole ciphertexts
CLOSEST = 64  # among them: the test images with the smallest exact top-two margins of the whole test set
REPEATED = 32  # inputs encrypted a second time, for the rounding's determinism (random part of the sample)
IDENTICAL = 0.97  # least fraction of inputs whose two encryptions decrypt to identical rounded logits
SAMPLE_SEED = 13
# The engine computes the exact int8 network; onnxruntime rounds the CNN's intermediate uint8
# activations (conv output, square, pooled features), and on some draws of the DP noise that
# changes more classes. The target stays 99.9% of the whole test set; a bundled model below it is
# listed with its measured figure (a target not met, in the README), so it can only get better.
ONNXRUNTIME_AGREEMENT = 0.999
ONNXRUNTIME_SHORTFALLS = {"mnist-cnn-eps1": 0.9978}  # retrained 2026-12-03 with CSPRNG noise


def _architectures() -> list[str]:
    """One bundled model per dataset and architecture: the models measured at the high profile too.
    Models of one architecture share depth and widths, so each profile gives them one ring."""
    first: dict[tuple[str, str], str] = {}
    for name in sorted(REPOSITORY.names()):
        manifest = REPOSITORY.get(name).manifest
        first.setdefault((manifest.dataset, manifest.training.architecture), name)
    return sorted(first.values())


REPRESENTATIVES = _architectures()
CASES = [(name, "standard") for name in sorted(REPOSITORY.names())] + [(name, "high") for name in REPRESENTATIVES]


@functools.cache
def _raw_inputs(dataset: str) -> tuple[int, np.ndarray]:
    """The test split's size and the raw inputs to sample from: the test split first, then (when
    it is smaller than ``AT_LEAST``) the other splits. Loaded once per worker."""
    data = load_dataset(dataset)
    if len(data.test) >= AT_LEAST:
        return len(data.test), data.test.x
    return len(data.test), np.concatenate([data.test.x, data.public.x, data.private.x])


def _measure(name: str, precisions: list[str]) -> dict[str, dict]:
    """Encrypt one model's sample at each profile, in a worker process; everything the checks need.

    The sample: the ``CLOSEST`` test images whose exact top-two margins are the smallest of the
    whole test set, and seeded random inputs up to ``AT_LEAST`` (the test split; every split
    where the test split is smaller than that, as for breast cancer's 114 rows).
    """
    artifact = REPOSITORY.get(name)
    tests, pool = _raw_inputs(artifact.manifest.dataset)
    x = artifact.manifest.input.normalization.apply(pool)
    lowered = lower(artifact.onnx_path)
    exact_test = lowered.evaluate(x[:tests])
    top2 = np.sort(exact_test, axis=1)[:, -2:]
    closest = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:CLOSEST]
    reference = onnx_runtime.predict_logits(onnx_runtime.create_session(artifact.onnx_path), x[:tests])
    measured = {}
    for precision in precisions:
        model = EncryptedModel(artifact.onnx_path, profile=precision)
        client = ClientKeys(model.spec)
        keys = model.load_keys(*client.evaluation_keys())
        lanes = model.spec.packing.lanes
        repeats = -(-REPEATED // lanes) * lanes
        size = -(-max(AT_LEAST, CLOSEST + repeats) // lanes) * lanes
        rest = np.setdiff1d(np.arange(len(x)), closest)
        others = np.random.default_rng(SAMPLE_SEED).choice(rest, size - CLOSEST, replace=False)
        chosen = np.concatenate([closest, others])

        unrounded, rounded, classes = [], [], []
        for i in range(0, len(chosen), lanes):
            result = model.evaluate(client.encrypt(x[chosen[i : i + lanes]]), keys)
            decrypted = client.decrypt_classified(result, lanes)
            unrounded.append(client.decrypt_unrounded_unsafe(result, lanes))
            rounded.append(decrypted.logits)
            classes.append(decrypted.classes)
        repeated = None
        if name in REPRESENTATIVES:
            again = x[chosen[CLOSEST : CLOSEST + repeats]]
            groups = np.split(again, repeats // lanes)
            repeated = np.concatenate([client.decrypt(model.evaluate(client.encrypt(b), keys), lanes) for b in groups])
        measured[precision] = {
            "ring": model.spec.parameters.poly_modulus_degree,
            "lanes": lanes,
            "bound": model.spec.logit_error_bound,
            "grid": client.logit_grid,
            "exact": lowered.evaluate(x[chosen]),
            "unrounded": np.concatenate(unrounded),
            "rounded": np.concatenate(rounded),
            "classes": np.concatenate(classes),
            "repeated": repeated,
            "exact_onnxruntime_agreement": float(np.mean(exact_test.argmax(1) == reference.argmax(1))),
        }
    return measured


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, str], dict]:
    """Every case, measured in two spawn workers (TenSEAL holds the GIL; the machine has 2 cores)."""
    jobs: dict[str, list[str]] = {}
    for name, precision in CASES:
        jobs.setdefault(name, []).append(precision)
    order = sorted(jobs, key=lambda name: -len(jobs[name]))  # the models measured at both profiles first
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_measure, name, jobs[name]) for name in order}
        return {(name, p): m for name, future in futures.items() for p, m in future.result().items()}


@pytest.mark.parametrize(("name", "precision"), CASES)
def test_encrypted_logits_are_within_the_stated_bound_at_every_ring(measured, name, precision):
    """Measured, not inferred: at least 200 encrypted inputs per model and ring, the 64 closest
    calls of the whole test set among them, every bundled model at the standard profile and one
    model per architecture at the high one (rings 4096, 8192 and 16384 on 2026-12-03; the test
    models of ``conftest.py`` use 8192 and 16384 too).

    - every unrounded logit within ``logit_error_bound`` of the exact network (the int8 model
      without onnxruntime's rounding of intermediate activations);
    - the SDK's rounded logits on the grid, within half a grid of the unrounded ones, and in the
      exact network's order wherever its top-two margin is at least ``grid + 2 * bound``;
    - the SDK's classes (taken before rounding) the exact network's wherever that margin
      exceeds twice the bound: every class, whatever the grid;
    - the exact network's classes those of onnxruntime on at least 99.9% of the whole test set
      (``ONNXRUNTIME_SHORTFALLS`` lists a model below it with its measured figure; the MLPs reach
      it through their 16-bit hidden activations: with uint8 ones, onnxruntime's own rounding
      changed up to 0.7% of classes).
    """
    m = measured[(name, precision)]
    bound, grid, exact = m["bound"], m["grid"], m["exact"]
    error = float(np.abs(m["unrounded"] - exact).max())
    where = f"{name} ({precision}, ring {m['ring']}, {len(exact)} inputs, {m['lanes']} per ciphertext)"
    assert error <= bound, f"{where}: max error {error:.3g} exceeds the stated bound {bound:.3g}"
    agreement = m["exact_onnxruntime_agreement"]
    print(f"{where}: max error {error:.3g}, bound {bound:.3g}, ratio {error / bound:.4f}, grid {grid:g}; ", end="")
    print(f"exact = onnxruntime on {agreement:.2%} of the test set")

    rounded = m["rounded"]
    assert np.array_equal(rounded / grid, np.round(rounded / grid)), f"{where}: a logit is off the grid {grid:g}"
    assert np.abs(rounded - m["unrounded"]).max() <= grid / 2
    top2 = np.sort(exact, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    clear = margin > 2 * bound
    assert np.array_equal(m["classes"][clear], exact.argmax(1)[clear]), f"{where}: a class differs from the exact one"
    wide = margin >= grid + 2 * bound
    assert np.array_equal(rounded.argmax(1)[wide], exact.argmax(1)[wide]), f"{where}: rounding changed an order"
    least = ONNXRUNTIME_SHORTFALLS.get(name, ONNXRUNTIME_AGREEMENT)
    assert agreement >= least, f"{name}: the exact network agrees with onnxruntime on {agreement:.2%} of the test set"


def test_two_encryptions_of_the_same_inputs_decrypt_to_the_same_rounded_logits(measured):
    """The grid is at least twice the stated bound, which is 30-3,000 times the measured error,
    so a rounded logit moves only when the exact one lies within the noise of a grid boundary.
    Measured on 2026-12-03: 100% of the repeated inputs identical (see the printed figures);
    required: ``IDENTICAL`` (97%) over all repeated inputs, one model per architecture and
    profile, ``REPEATED`` (32) inputs each or one ciphertext's lanes."""
    same, total = 0, 0
    for (name, precision), m in sorted(measured.items()):
        if m["repeated"] is None:
            continue
        first = m["rounded"][CLOSEST : CLOSEST + len(m["repeated"])]
        identical = np.all(first == m["repeated"], axis=1)
        print(f"{name} ({precision}, ring {m['ring']}): {identical.mean():.2%} of {len(identical)} identical")
        same, total = same + int(identical.sum()), total + len(identical)
    assert total >= 2 * len(REPRESENTATIVES) * REPEATED and same / total >= IDENTICAL, f"{same} of {total} identical"


def test_the_grid_is_the_smallest_power_of_two_at_least_twice_the_bound():
    assert logit_grid(bound=0.0959) == 0.25 and logit_grid(bound=0.125) == 0.25 and logit_grid(bound=0.126) == 0.5
    assert logit_grid(bound=2.2e-6) == 2.0**-17
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InvalidArgumentError, match="positive and finite"):
            logit_grid(bound=bad)


@pytest.mark.parametrize("name", ["breast-cancer-linear-eps3", "mnist-cnn-eps3"])
def test_the_high_precision_profile_buys_a_far_smaller_error_with_a_larger_ring(name):
    """The stated bounds; the measured errors at each ring are the first test's."""
    path = REPOSITORY.get(name).onnx_path
    standard, spec = compile_plan(path)[0], compile_plan(path, profile="high")[0]
    assert spec.precision == "high" and spec.parameters.scale_bits >= 50
    assert spec.parameters.poly_modulus_degree > standard.parameters.poly_modulus_degree
    assert spec.logit_error_bound < standard.logit_error_bound / 1000


def test_the_default_model_packs_one_input_and_the_mlp_four():
    cnn = EncryptedModel(REPOSITORY.get("mnist-cnn-eps3").onnx_path).spec
    mlp = EncryptedModel(REPOSITORY.get("mnist-mlp-eps3").onnx_path).spec
    assert (cnn.packing.kind, cnn.packing.lanes, mlp.packing.kind, mlp.packing.lanes) == ("im2col", 1, "flat", 4)
    assert cnn.parameters.poly_modulus_degree == 8192 and cnn.parameters.depth == 3


@pytest.fixture(scope="module")
def breast_cancer():
    artifact = REPOSITORY.get("breast-cancer-linear-eps3")
    model = EncryptedModel(artifact.onnx_path)
    client = ClientKeys(model.spec)
    return model, client, model.load_keys(*client.evaluation_keys())


def test_a_packed_batch_gives_each_input_its_own_logits(breast_cancer):
    model, client, keys = breast_cancer
    lanes = model.spec.packing.lanes
    x = np.random.default_rng(0).normal(size=(lanes, 30)).astype(np.float32)
    exact = lower(model.path).evaluate(x)
    batch = client.decrypt(model.evaluate(client.encrypt(x), keys), lanes)
    assert batch.shape == (lanes, 2)
    np.testing.assert_allclose(batch, exact, atol=model.spec.logit_error_bound + client.logit_grid / 2)


def _plain_seal_bytes(data: bytes) -> bytearray:
    """A SEAL object's payload without its zstd compression (header stripped)."""
    import zstandard

    return bytearray(zstandard.ZstdDecompressor().decompress(data[16:], max_output_size=1 << 28))


def _as_uncompressed(header: bytes, payload: bytes) -> bytes:
    """SEAL's 16-byte header with compression 'none' and the new size, then the payload."""
    return header[:5] + b"\x00" + header[6:8] + struct.pack("<Q", 16 + len(payload)) + payload


def test_broken_ciphertext_bytes_are_refused(breast_cancer):
    model, client, keys = breast_cancer
    good = client.encrypt(np.zeros(30, np.float32))
    out_of_range = _plain_seal_bytes(good)  # seeded: c0's coefficients, then the seed for c1
    middle = len(out_of_range) // 2
    out_of_range[middle : middle + 8] = struct.pack("<Q", 1 << 62)  # above every prime of the modulus
    wrong_size = _plain_seal_bytes(good)[:-8]
    broken = [
        good[: len(good) // 2],
        good[:100],
        b"",
        b"\x00" * 64,
        b"\xff" * len(good),
        _as_uncompressed(good[:16], bytes(out_of_range)),
        _as_uncompressed(good[:16], bytes(wrong_size)),
    ]
    assert model.evaluate(_as_uncompressed(good[:16], bytes(_plain_seal_bytes(good))), keys)  # the crafting is sound
    for bad in broken:
        with pytest.raises(InvalidArgumentError):
            model.evaluate(bad, keys)
    assert client.decrypt(model.evaluate(good, keys)).shape == (2,)  # the model still works


def test_ciphertext_and_keys_under_other_parameters_are_refused(breast_cancer):
    model, _, keys = breast_cancer
    mnist = ClientKeys(EncryptedModel(REPOSITORY.get("mnist-mlp-eps3").onnx_path).spec)
    with pytest.raises(InvalidArgumentError, match="not valid for this model's parameters"):
        model.evaluate(mnist.encrypt(np.zeros([1, 28, 28], np.float32)), keys)
    with pytest.raises(InvalidArgumentError, match="relinearization key is not valid"):
        model.load_keys(*mnist.evaluation_keys())


def test_swapped_keys_are_refused_before_they_can_crash_the_evaluator():
    """Both keys parse as either type; relinearizing with Galois keys would crash SEAL natively."""
    model = EncryptedModel(REPOSITORY.get("mnist-mlp-eps3").onnx_path)  # squares: relinearizes
    relin, galois = ClientKeys(model.spec).evaluation_keys()
    with pytest.raises(InvalidArgumentError, match="no key for s\\^2"):
        model.load_keys(galois, relin)


def test_galois_keys_without_the_plans_steps_are_refused(breast_cancer):
    model, client, _ = breast_cancer
    relin, _ = client.evaluation_keys()
    generator = client._generator
    partial = dump(generator.create_galois_keys(model.spec.parameters.galois_elements(model.spec.rotation_steps[:1])))
    with pytest.raises(InvalidArgumentError, match="lack rotation steps"):
        model.load_keys(relin, partial)


def _tenseal_context(model: EncryptedModel) -> tenseal.Context:
    """A TenSEAL client's context for this model; TenSEAL makes Galois keys for the powers of two,
    which cover this plan's steps."""
    assert all(step & (step - 1) == 0 for step in model.spec.rotation_steps)
    params = model.spec.parameters
    context = tenseal.context(
        tenseal.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=params.coeff_modulus_bits
    )
    context.generate_galois_keys()
    return context


def test_a_context_holding_a_secret_key_is_refused(breast_cancer):
    model, client, _ = breast_cancer
    context = _tenseal_context(model)
    with pytest.raises(InvalidArgumentError, match="contains a secret key"):
        model.load_context(context.serialize(save_secret_key=True))
    with pytest.raises(InvalidArgumentError, match="not a serialized TenSEAL context"):
        model.load_context(b"\x00" * 100)
    secret = dump(client._secret_key)  # a bare secret key passed off as Galois keys
    with pytest.raises(InvalidArgumentError, match="Galois keys is not valid"):
        model.load_keys(client.evaluation_keys()[0], secret)


def test_a_public_tenseal_context_serves_like_bare_keys(breast_cancer):
    model, client, _ = breast_cancer
    context = _tenseal_context(model)
    keys = model.load_context(context.serialize(save_secret_key=False))
    # encrypt with the TenSEAL context's own secret key, in the spec's packing
    x = np.random.default_rng(1).normal(size=(1, 30)).astype(np.float32)
    params, sealed = model.spec.parameters, context.seal_context().data
    plaintext, ciphertext = seal.Plaintext(), seal.Ciphertext()
    values = model.spec.packing.pack(client._input.dequantize(client._input.quantize(x)))
    seal.CKKSEncoder(sealed).encode(values.tolist(), 2.0**params.scale_bits, plaintext)
    seal.Encryptor(sealed, context.secret_key().data).encrypt_symmetric(plaintext, ciphertext)
    result = load_ciphertext(sealed, model.evaluate(dump(ciphertext), keys))
    seal.Decryptor(sealed, context.secret_key().data).decrypt(result, plaintext)
    logits = model.spec.packing.unpack(np.array(seal.CKKSEncoder(sealed).decode_double(plaintext)), 1)
    np.testing.assert_allclose(logits, lower(model.path).evaluate(x), atol=model.spec.logit_error_bound)


def test_server_side_model_holds_no_secret_key_and_cannot_decrypt(breast_cancer):
    model, client, keys = breast_cancer
    seen = [model, *vars(model).values(), *(vars(layer) for layer in model._layers if layer is not None)]
    for value in seen:
        values = value.values() if isinstance(value, dict) else [value]
        assert not any(isinstance(v, seal.SecretKey) for v in values)
    assert "secret" not in model.spec.model_dump_json().lower()
    # all the server could do is guess a key: decryption under any other key is noise
    x = np.full((1, 30), 0.5, np.float32)
    result = model.evaluate(client.encrypt(x), keys)
    guess = seal.KeyGenerator(model.context).secret_key()
    plaintext = seal.Plaintext()
    seal.Decryptor(model.context, guess).decrypt(load_ciphertext(model.context, result), plaintext)
    noise = np.array(seal.CKKSEncoder(model.context).decode_double(plaintext))
    assert np.abs(noise).max() > 1e3 * np.abs(client.decrypt(result)).max()


def test_unsupported_operator_is_refused_at_load_naming_the_node(tmp_path):
    model = onnx.load(str(REPOSITORY.get("mnist-mlp-eps3").onnx_path))
    square = next(node for node in model.graph.node if node.op_type == "Mul")
    square.op_type = "Relu"
    del square.input[1]
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOperatorError, match=rf"operator Relu \(node '{square.name}'\)"):
        EncryptedModel(path)


def test_uint16_hidden_activations_lower_to_the_identity_but_a_uint16_input_is_refused(tmp_path):
    """The MLPs' 16-bit hidden QDQ pairs vanish like uint8 ones; the input grid is the client's
    and the spec describes a uint8 one, so a model quantizing its input to 16 bits is refused."""
    path = REPOSITORY.get("mnist-mlp-eps3").onnx_path
    model = onnx.load(str(path))
    hidden = {i.name: i.data_type for i in model.graph.initializer if i.name == "layer1.zero_point"}
    assert hidden == {"layer1.zero_point": onnx.TensorProto.UINT16}
    assert [type(stage).__name__ for stage in lower(path).stages] == ["Affine", "Square", "Affine"]
    zero = next(i for i in model.graph.initializer if i.name == "input.zero_point")
    zero.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.uint16), zero.name))
    wide = tmp_path / "wide-input.onnx"
    onnx.save(model, str(wide))
    with pytest.raises(UnsupportedOperatorError, match="network input must be uint8, not uint16"):
        EncryptedModel(wide)


def test_client_refuses_wrong_shape_dtype_and_too_many_inputs(breast_cancer):
    _, client, _ = breast_cancer
    with pytest.raises(InvalidArgumentError, match=r"shape \[n, \*\[30\]\]"):
        client.encrypt(np.zeros(29, np.float32))
    with pytest.raises(InvalidArgumentError, match="float32"):
        client.encrypt(np.zeros(30, np.float64))
    with pytest.raises(InvalidArgumentError, match="1 to 64 inputs"):
        client.encrypt(np.zeros((65, 30), np.float32))

"""Whole models: the numba kernels against onnxruntime on the digits fixtures and every bundled model.

Models whose tensors are all uint8 match onnxruntime bit for bit. Models with uint16 hidden
activations (A16W8: the digits fixture's MLP, the bundled MLPs) run their 16-bit layers in exact
integer arithmetic where onnxruntime runs float32 (kernels/arithmetic.py): their logits must
equal the numpy reference's bit for bit, lie within
:func:`kernels.testing.onnxruntime_deviation_bound` of onnxruntime's (derived there: every
float32 rounding of onnxruntime's sums at its worst, propagated through the weights and scales),
and give the same classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.cli import BUNDLED_REPOSITORY
from kernels import NumbaModel, reference
from kernels import isa as kernel_isa
from kernels.compiler import compile_file
from kernels.plan import Gemm, Plan
from kernels.testing import onnxruntime_deviation_bound
from models import onnx_runtime
from models.errors import InvalidArgumentError
from models.repository import ModelArtifact, load_artifact

BUNDLED = sorted(path.parent for path in BUNDLED_REPOSITORY.glob("*/*/manifest.json"))
ISAS = kernel_isa.available()  # every code path this CPU runs: avx2, and vnni where it has AVX512-VNNI


def _output_step(path: Path) -> float:
    """One quantization step of the logits: the output tensor's scale, or for float logits written by
    the last Gemm, one unit of its int32 sums (input scale x weight scale, the largest over outputs)."""
    plan = compile_file(path)
    last = plan.steps[-1]
    if isinstance(last, Gemm) and last.output is None:
        return float(np.float32(plan.tensors[last.source].params.scale) * last.weight_scale.max())
    return plan.tensors[last.source].params.scale


def _assert_close_to_onnxruntime(plan: Plan, x: np.ndarray, logits: np.ndarray, expected: np.ndarray) -> None:
    """A plan with uint16 tensors: exactly the numpy reference's logits, within the derived bound of
    onnxruntime's (elementwise, per sample), and the same classes."""
    assert plan.has_16_bit
    trace = reference.trace(plan, x)
    np.testing.assert_array_equal(logits, trace.logits)  # the exact-integer arithmetic, bit for bit
    bound = onnxruntime_deviation_bound(plan, x, trace)
    excess = np.abs(logits.astype(np.float64) - expected) - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} logits beyond the bound, by up to {excess.max()}"
    np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))


def _assert_matches_onnxruntime(path: Path, x: np.ndarray, *, threads: int = 1, isa: str | None = None) -> np.ndarray:
    model = NumbaModel.load(path, threads=threads, isa=isa)
    assert model.isa == (isa or kernel_isa.select())
    logits = model.predict_logits(x)
    expected = onnx_runtime.predict_logits(onnx_runtime.create_session(path), x)
    if model.plan.has_16_bit:
        _assert_close_to_onnxruntime(model.plan, x, logits, expected)
        return logits
    assert np.abs(logits - expected).max() <= _output_step(path) * 1.0001, "more than one quantization step apart"
    np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_array_equal(logits, expected)  # in fact bit-identical: same integer arithmetic
    return logits


def _assert_agrees_with_onnxruntime(model: NumbaModel, x: np.ndarray, expected: np.ndarray) -> None:
    """Bit-identical for a uint8 model, else as :func:`_assert_close_to_onnxruntime`."""
    logits = model.predict_logits(x)
    if model.plan.has_16_bit:
        _assert_close_to_onnxruntime(model.plan, x, logits, expected)
    else:
        np.testing.assert_array_equal(logits, expected)


@pytest.fixture(scope="module")
def digits_models(trained_repo) -> list[Path]:
    return sorted(trained_repo.glob("*/1/model.onnx"))


@pytest.mark.parametrize("isa", ISAS)
def test_digits_models_match_onnxruntime(digits_models, digits, isa):
    x = digits.normalize(digits.test.x)
    for path in digits_models:
        logits = _assert_matches_onnxruntime(path, x, isa=isa)
        assert (logits.argmax(axis=1) == digits.test.y).mean() > 0.5


@pytest.mark.parametrize("isa", ISAS)
def test_exported_cnn_matches_onnxruntime_on_two_threads(exported_cnn, digits, isa):
    _assert_matches_onnxruntime(exported_cnn.artifact.onnx_path, digits.normalize(digits.test.x), threads=2, isa=isa)


def test_avx2_path_forced_by_the_environment_still_matches(monkeypatch, digits_models, digits):
    """HEGATE_KERNELS_ISA=avx2 runs the AVX2 tiles even on a CPU with VNNI (how the paths are compared)."""
    monkeypatch.setenv(kernel_isa.ENVIRONMENT, "avx2")
    x = digits.normalize(digits.test.x)
    for path in digits_models:
        for threads in (1, 2):
            model = NumbaModel.load(path, threads=threads)
            assert model.isa == "avx2"
            expected = onnx_runtime.predict_logits(onnx_runtime.create_session(path), x)
            _assert_agrees_with_onnxruntime(model, x, expected)


@pytest.mark.parametrize("isa", ISAS)
def test_result_for_one_input_does_not_depend_on_its_batch(digits_models, digits, isa):
    x = digits.normalize(digits.test.x[:67])
    outliers = np.stack([np.full_like(x[0], 1e4), np.full_like(x[0], -1e4), np.full_like(x[0], np.nan)])
    for path in digits_models:
        for threads in (1, 2):
            model = NumbaModel.load(path, threads=threads, isa=isa)
            alone = np.concatenate([model.predict_logits(x[i : i + 1]) for i in range(len(x))])
            np.testing.assert_array_equal(model.predict_logits(x), alone)
            np.testing.assert_array_equal(model.predict_logits(np.concatenate([outliers, x, outliers]))[3:-3], alone)
            np.testing.assert_array_equal(model.predict_logits(x[::-1])[::-1], alone)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch", [1, 3, 8, 64, 255, 4096])
def test_every_batch_size_runs_the_same_code(digits_models, digits, batch, isa):
    x = digits.normalize(digits.test.x)
    x = np.resize(x, (batch, *x.shape[1:]))
    for path in digits_models:
        expected = onnx_runtime.predict_logits(onnx_runtime.create_session(path), x)
        for threads in (1, 2):
            model = NumbaModel.load(path, threads=threads, isa=isa)
            _assert_agrees_with_onnxruntime(model, x, expected)


@pytest.fixture(scope="module")
def mnist():
    from models.data import load_dataset

    return load_dataset("mnist")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("directory", BUNDLED, ids=[f"{d.parent.name}/{d.name}" for d in BUNDLED])
def test_bundled_model_matches_onnxruntime_on_its_whole_test_set(directory, request, isa):
    artifact: ModelArtifact = load_artifact(directory)
    if artifact.manifest.dataset == "mnist":
        dataset = request.getfixturevalue("mnist")
    else:
        from models.data import load_dataset

        dataset = load_dataset(artifact.manifest.dataset)
    x = artifact.manifest.input.normalization.apply(dataset.test.x)  # = dataset.normalize(x)
    logits = _assert_matches_onnxruntime(artifact.onnx_path, x, isa=isa)
    assert len(logits) == len(dataset.test.y)


@pytest.mark.parametrize("isa", ISAS)
def test_bundled_a16w8_models_on_two_threads(request, isa):
    """The bundled A16W8 MLPs with their whole test set split across two threads: the same exact-integer
    logits as the numpy reference, within the derived bound of onnxruntime's."""
    artifacts = [load_artifact(d) for d in BUNDLED]
    wide = [a for a in artifacts if compile_file(a.onnx_path).has_16_bit]
    assert {a.manifest.training.architecture.split()[0] for a in wide} == {"mlp"}, "the bundled MLPs are A16W8"
    for artifact in wide:
        dataset = request.getfixturevalue("mnist") if artifact.manifest.dataset == "mnist" else None
        if dataset is None:
            from models.data import load_dataset

            dataset = load_dataset(artifact.manifest.dataset)
        x = artifact.manifest.input.normalization.apply(dataset.test.x)
        _assert_matches_onnxruntime(artifact.onnx_path, x, threads=2, isa=isa)


def test_any_float32_dtype_object_is_accepted_and_other_dtypes_are_refused(digits_models, digits):
    """Arrays decoded from the wire carry a float32 dtype that is equal to, not the same object
    as, ``np.dtype(np.float32)``; the check compares dtypes, not their identity."""
    model = NumbaModel.load(digits_models[0])
    x = digits.normalize(digits.test.x[:3])
    wire = np.frombuffer(x.tobytes(), dtype=np.dtype("<f4")).astype(np.dtype("<f4").newbyteorder("="))
    wire = wire.reshape(x.shape)
    assert wire.dtype is not np.dtype(np.float32)
    np.testing.assert_array_equal(model.predict_logits(wire), model.predict_logits(x))
    with pytest.raises(InvalidArgumentError, match="float32"):
        model.predict_logits(x.astype(np.float64))

"""Encrypted inference, measured: latency, rotations, sizes and agreement with onnxruntime.

    python -m bench.encrypted                                   # bundled breast-cancer and MNIST MLP, 20 images
    python -m bench.encrypted --images 10000                    # the whole test sets (~30 min)

Work in progress with the engine issue: this run reports what the engine does today, one
request at a time on one core; the targets of the engine issue are not met yet.
Results go to ``bench/results/encrypted.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import tenseal

from bench.report import provenance, write
from gateway.cli import BUNDLED_REPOSITORY
from gateway.he.client import ClientKeys
from gateway.he.graph import Affine, lower
from gateway.he.plan import EncryptedModel
from models import onnx_runtime
from models.data import load_dataset
from models.repository import ModelRepository

DEFAULT_MODELS = ["breast-cancer-linear-eps3", "mnist-mlp-eps3"]


def tenseal_mm_seconds(model: EncryptedModel, x) -> float:
    """The same lowered model through TenSEAL's own ``mm`` chain, same parameters: the baseline."""
    params = model.spec.parameters
    context = tenseal.context(
        tenseal.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=params.coeff_modulus_bits
    )
    context.global_scale = 2.0**params.scale_bits
    context.generate_galois_keys()
    context.generate_relin_keys()
    vector = tenseal.ckks_vector(context, x.ravel().astype(np.float64).tolist())
    started = time.perf_counter()
    for stage in lower(model.path).stages:
        if isinstance(stage, Affine):
            vector = vector.mm(stage.matrix.T.tolist()) + stage.bias.tolist()
        else:
            vector = vector.square()
    return time.perf_counter() - started


def measure(name: str, images: int) -> dict:
    artifact = ModelRepository(BUNDLED_REPOSITORY).get(name)
    started = time.perf_counter()
    model = EncryptedModel(artifact.onnx_path)
    load_seconds = time.perf_counter() - started
    client = ClientKeys(model.spec)
    relin, galois = client.evaluation_keys()
    keys = model.load_keys(relin, galois)
    data = load_dataset(artifact.manifest.dataset)
    x = artifact.manifest.input.normalization.apply(data.test.x[:images])
    reference = onnx_runtime.predict_logits(onnx_runtime.create_session(artifact.onnx_path), x)
    labels = data.test.y[: len(x)]
    seconds, errors, agree, correct = [], [], 0, 0
    for row, expected, label in zip(x, reference, labels, strict=True):
        ciphertext = client.encrypt(row)
        started = time.perf_counter()
        result = model.evaluate(ciphertext, keys)
        seconds.append(time.perf_counter() - started)
        logits = client.decrypt(result)
        errors.append(float(np.abs(logits - expected).max()))
        agree += int(logits.argmax() == expected.argmax())
        correct += int(logits.argmax() == label)
    params = model.spec.parameters
    baseline = tenseal_mm_seconds(model, x[0])
    return {
        "model": name,
        "ring": params.poly_modulus_degree,
        "modulus_bits": params.coeff_modulus_bits,
        "rotations": model.spec.rotations,
        "plaintext_products": sum(layer.plaintext_products for layer in model.spec.layers),
        "load_seconds": round(load_seconds, 2),
        "evaluate_ms_p50": round(1000 * float(np.median(seconds)), 1),
        "tenseal_mm_ms": round(1000 * baseline, 1),
        "speedup_vs_tenseal_mm": round(baseline / float(np.median(seconds)), 1),
        "input_kib": round(len(ciphertext) / 1024, 1),
        "result_kib": round(len(result) / 1024, 1),
        "galois_keys_mib": round(len(galois) / 2**20, 1),
        "relin_key_mib": round(len(relin) / 2**20, 1),
        "images": len(x),
        "class_agreement": agree / len(x),
        "encrypted_accuracy": correct / len(x),
        "int8_accuracy": float(np.mean(reference.argmax(1) == labels)),
        "max_logit_error": round(max(errors), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    rows = [measure(name, args.images) for name in args.models]
    result = {**provenance("bench.encrypted"), "models": rows}
    lines = [
        "# Encrypted inference (engine in progress)",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}; one request at a time, one core.",
        "",
        "| model | ring | modulus bits | rotations | pt products | eval p50 | TenSEAL mm chain | speed-up "
        "| input | result | Galois keys | agree with onnxruntime | encrypted / int8 accuracy | max logit error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ring']} | {r['modulus_bits']} | {r['rotations']} | {r['plaintext_products']} "
            f"| {r['evaluate_ms_p50']} ms | {r['tenseal_mm_ms']} ms | {r['speedup_vs_tenseal_mm']}x "
            f"| {r['input_kib']} KiB | {r['result_kib']} KiB | {r['galois_keys_mib']} MiB "
            f"| {r['class_agreement']:.2%} of {r['images']} "
            f"| {r['encrypted_accuracy']:.2%} / {r['int8_accuracy']:.2%} | {r['max_logit_error']} |"
        )
    write("encrypted", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``hegate`` command line: one subcommand per job, each a thin layer over the library.

Any :class:`HegateError` becomes one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import typing
from pathlib import Path

import numpy as np

from gateway.he.params import PROFILES
from gateway.settings import BUNDLED_REPOSITORY, GatewaySettings
from models.errors import HegateError
from models.manifest import Manifest
from models.repository import ModelRepository

DEFAULT_MODEL = "mnist-cnn-eps3"


def _epsilon(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("epsilon must be positive (use inf for the non-private baseline)")
    return value


def _train(args: argparse.Namespace) -> int:
    from models.pipeline import train_model
    from models.recipes import recipe_for

    recipe = recipe_for(
        args.dataset,
        args.arch,
        activation_bits=args.activation_bits,
        epsilon=args.epsilon,
        delta=args.delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        momentum=args.momentum,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        randomness="replayable" if args.replayable_noise else None,
        threads=args.threads,
    )
    command = shlex.join(["hegate", *args.argv])
    exported = train_model(
        recipe=recipe, out=args.out, name=args.name, version=args.version, command=command, progress=not args.quiet
    )
    _print_models([exported.artifact.manifest], [exported.artifact.model_bytes])
    print(f"wrote {exported.artifact.directory}")
    return 0


def _epsilon_text(manifest: Manifest) -> str:
    """The accountant's epsilon where it is delivered; ``none`` where a seed replays the noise."""
    dp = manifest.dp
    if not dp.private:
        return "inf"
    return f"{dp.epsilon:.2f}" if dp.secure_rng else "none"


def _audit_text(manifest: Manifest) -> str:
    """The one-run audit's empirical lower bound on epsilon, at its confidence; ``-`` if never audited."""
    audit = manifest.audit
    return "-" if audit is None else f">={audit.epsilon_lower_bound:.2f} ({audit.confidence:.0%})"


def _print_models(manifests: list[Manifest], sizes: list[int]) -> None:
    header = (
        f"{'model':<26}{'ver':>4}{'epsilon':>9}{'delta':>8}{'fp32':>8}{'int8':>8}{'size':>10}{'depth':>7}"
        f"{'audited epsilon':>18}"
    )
    print(header)
    for manifest, size in zip(manifests, sizes, strict=True):
        print(
            f"{manifest.name:<26}{manifest.version:>4}{_epsilon_text(manifest):>9}{manifest.dp.delta:>8.0e}"
            f"{manifest.metrics.fp32_accuracy:>8.2%}{manifest.metrics.int8_accuracy:>8.2%}"
            f"{size / 1024:>8.1f}KB{manifest.multiplicative_depth:>7}{_audit_text(manifest):>18}"
        )
    if any(m.dp.private and not m.dp.secure_rng for m in manifests):
        print("epsilon none: trained with --replayable-noise; its seed replays the noise, so it is not a DP model")


def _models(args: argparse.Namespace) -> int:
    if args.target:
        with _client(args) as client:
            infos = client.list_models()
        _print_models([m.manifest for m in infos], [m.manifest.files["model.onnx"].bytes for m in infos])
        encrypted = [f"{m.name} ({m.lanes} per ciphertext)" for m in infos if m.encrypted]
        print(f"encrypted: {', '.join(encrypted) or 'none'}")
        return 0
    repository = ModelRepository(args.repo)
    artifacts = repository.artifacts()
    _print_models([a.manifest for a in artifacts], [a.model_bytes for a in artifacts])
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway.server.app import Gateway
    from gateway.settings import load_settings

    tls = None
    if args.tls_cert or args.tls_key:
        tls = {"cert_file": args.tls_cert, "key_file": args.tls_key, "client_ca_file": args.tls_client_ca}
    api_keys = None
    if args.api_key:
        pairs = [item.partition("=") for item in args.api_key]
        if any(not key or not tenant for key, _, tenant in pairs):
            raise argparse.ArgumentTypeError("--api-key takes KEY=TENANT")
        api_keys = {key: tenant for key, _, tenant in pairs}
    settings = load_settings(
        config_file=args.config,
        repository=args.repo,
        address=args.address,
        workers=args.workers,
        metrics_port=args.metrics_port,
        fast_path_port=args.fast_path_port,
        api_keys=api_keys,
        tls=tls,
        queue_limit=args.queue_limit,
        key_budget_bytes=args.key_budget_mib and args.key_budget_mib << 20,
        tenant_key_bytes=args.tenant_key_mib and args.tenant_key_mib << 20,
        tenant_key_sets=args.tenant_key_sets,
        tenant_queue_limit=args.tenant_queue_limit,
        upload_idle_seconds=args.upload_idle,
        key_ttl_seconds=args.key_ttl,
        key_store=args.key_store,
        grace_seconds=args.grace,
        plaintext_backend=args.plaintext_backend,
        ckks_precision=args.ckks_precision,
    )

    async def run() -> None:
        gateway = Gateway(settings)
        await gateway.start()
        host = settings.address.rpartition(":")[0]
        fast = f", fast path on {host}:{gateway.fast_path_port}" if gateway.fast_path_port else ""
        metrics = f", metrics on http://{host}:{gateway.metrics_port}/metrics" if gateway.metrics_port else ""
        served = f"{settings.repository} on {host}:{gateway.port}{fast}{metrics}"
        print(f"hegate: serving {served}; Ctrl-C stops", flush=True)
        await gateway.wait()

    asyncio.run(run())
    return 0


def _client(args: argparse.Namespace):
    from gateway.client import HegateClient

    return HegateClient(
        args.target or "127.0.0.1:8001",
        api_key=args.api_key,
        tls_ca_file=args.tls_ca,
        fast_path_target=getattr(args, "fast_path", None),
    )


def _infer(args: argparse.Namespace) -> int:
    from gateway.client.inputs import read_input

    with _client(args) as client:
        info = client.model(args.model)
        x = read_input(args.input, info.manifest.input)
        if args.plaintext:
            from gateway.client import Prediction

            prediction = Prediction(logits=client.predict(args.model, x), labels=info.manifest.output.labels)
            print(f"{info.name}: plaintext path")
        else:
            with client.encrypted_session(args.model, profile=args.profile) as session:
                print(
                    f"{info.name}: encrypted path ({session.spec.precision} profile), keys "
                    f"{session.key_bytes / 2**20:.1f} MiB registered in {session.registration_seconds:.2f} s"
                )
                prediction = session.predict(x)
    for index, (label, probabilities) in enumerate(zip(prediction.predicted, prediction.probabilities, strict=True)):
        top = np.argsort(probabilities)[::-1][:3]
        shown = ", ".join(f"{prediction.labels[i]}: {probabilities[i]:.3f}" for i in top)
        print(f"[{index}] label {label}   ({shown})")
    t = prediction.timings
    if not args.plaintext:
        print(
            f"timings: encrypt {t.encrypt_ms:.1f} ms, call {t.call_ms:.1f} ms (server queue {t.server_queue_ms:.1f} "
            f"ms, compute {t.server_compute_ms:.1f} ms), decrypt {t.decrypt_ms:.1f} ms"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hegate", description="Encrypted-inference gateway for DP-trained int8 models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model with DP-SGD, quantize it to int8 and export it")
    train.add_argument("--dataset", required=True, choices=["mnist", "digits", "breast_cancer"])
    train.add_argument("--arch", required=True, choices=["linear", "mlp", "cnn"])
    train.add_argument("--epsilon", required=True, type=_epsilon, help="target epsilon; 'inf' for no DP noise")
    train.add_argument("--delta", type=float, help="default: the largest power of ten at most 1/(10 n)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="expected batch size (Poisson sampling)")
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--momentum", type=float)
    train.add_argument("--max-grad-norm", type=float, help="per-sample clipping bound C")
    train.add_argument(
        "--seed",
        type=int,
        help="seed of the initial weights; of the noise too only with epsilon inf or --replayable-noise",
    )
    train.add_argument(
        "--replayable-noise",
        action="store_true",
        help="development only: draw the DP noise from --seed so a run replays; the model is then NOT private "
        "(listed with epsilon: none)",
    )
    train.add_argument("--threads", type=int, help="torch threads (default 1)")
    train.add_argument(
        "--activation-bits", type=int, choices=[8, 16], help="hidden activations' width (default: 16 for mlp, else 8)"
    )
    train.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into")
    train.add_argument("--name", help="model name (default: <dataset>-<arch>-eps<epsilon>)")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    models = commands.add_parser("models", help="list the models of a repository, or of a running gateway")
    models.add_argument("--repo", type=Path, default=BUNDLED_REPOSITORY, help="model repository (default: bundled)")
    models.add_argument("--target", help="host:port of a running gateway (instead of --repo)")
    _client_flags(models)
    models.set_defaults(handler=_models)

    serve = commands.add_parser("serve", help="run the gateway (defaults: bundled models on 127.0.0.1:8001)")
    serve.add_argument("--config", type=Path, help="TOML settings file; HEGATE_* variables and flags override it")
    serve.add_argument("--repo", type=Path, help="model repository")
    serve.add_argument("--address", help="host:port to listen on (port 0: any free port)")
    serve.add_argument("--workers", type=int, help="encrypted worker processes (default: cores)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port)")
    serve.add_argument("--fast-path-port", type=int, help="plaintext fast path port (0: any free port)")
    serve.add_argument("--api-key", action="append", metavar="KEY=TENANT", help="accept KEY for TENANT (repeatable)")
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    serve.add_argument("--queue-limit", type=int, help="encrypted requests queued or running per model")
    serve.add_argument(
        "--tenant-queue-limit", type=int, help="encrypted requests queued or running per model and tenant"
    )
    serve.add_argument("--key-budget-mib", type=int, help="resident memory of every tenant's evaluation keys")
    serve.add_argument("--tenant-key-mib", type=int, help="resident memory of one tenant's evaluation keys")
    serve.add_argument("--tenant-key-sets", type=int, help="key sets one tenant may hold")
    serve.add_argument("--upload-idle", type=float, help="seconds a key upload may wait between chunks")
    serve.add_argument("--key-ttl", type=float, help="seconds an unused key set stays registered")
    serve.add_argument(
        "--key-store",
        metavar="URL",
        help="'memory' (default: this process) or redis://[:password@]HOST:PORT/DB, shared by replicas and "
        "durable (the HEGATE_KEY_STORE variable keeps a password off the command line)",
    )
    serve.add_argument("--grace", type=float, help="seconds in-flight requests get at shutdown")
    for name in ("plaintext_backend", "ckks_precision"):
        field = GatewaySettings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        choices = typing.get_args(field.annotation)
        serve.add_argument(flag, choices=choices, help=f"{field.description} (default {field.default})")
    serve.set_defaults(handler=_serve)

    infer = commands.add_parser("infer", help="classify an input through a running gateway (encrypted by default)")
    infer.add_argument("input", type=Path, help=".npy of raw values (one input or a batch) or an image file")
    infer.add_argument("--model", default=DEFAULT_MODEL)
    infer.add_argument("--plaintext", action="store_true", help="send the input unencrypted (trusted callers)")
    infer.add_argument(
        "--profile",
        choices=PROFILES,
        help="CKKS profile (default: the gateway's); circuit_private also hides the model in the result",
    )
    infer.add_argument("--target", help="host:port of the gateway (default 127.0.0.1:8001)")
    infer.add_argument("--fast-path", metavar="HOST:PORT", help="with --plaintext: the gateway's fast path (:8003)")
    _client_flags(infer)
    infer.set_defaults(handler=_infer)

    from bench import audit as bench_audit
    from bench import hostile as bench_hostile
    from bench import load as bench_load
    from bench import peer as bench_peer
    from bench import privacy as bench_privacy

    bench = commands.add_parser("bench", help="measure what privacy costs (load, ...)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_load.add_parser(bench_commands)
    bench_audit.add_parser(bench_commands)
    bench_hostile.add_parser(bench_commands)
    bench_peer.add_parser(bench_commands)
    bench_privacy.add_parser(bench_commands)
    return parser


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help="API key, if the gateway requires one")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate of the gateway (PEM): connect with TLS")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except HegateError as exc:
        print(f"hegate {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

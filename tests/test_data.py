from __future__ import annotations

import numpy as np
import pytest

from models.data import load_dataset
from models.errors import NotFoundError


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1)}


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "mnist"])
def test_splits_are_disjoint_and_complete(name):
    data = load_dataset(name)
    assert min(len(data.private), len(data.public), len(data.test)) > 0
    if name == "mnist":
        assert (len(data.private), len(data.public), len(data.test)) == (59000, 1000, 10000)
        assert np.bincount(data.test.y).tolist()[:3] == [980, 1135, 1032]
    else:  # sklearn sets have no duplicate rows across our splits
        assert not _rows(data.private.x) & _rows(data.test.x)
        assert not _rows(data.public.x) & _rows(data.private.x)


def test_split_does_not_depend_on_anything_but_the_dataset():
    first, second = load_dataset("breast_cancer"), load_dataset("breast_cancer")
    np.testing.assert_array_equal(first.test.y, second.test.y)
    np.testing.assert_array_equal(first.public.x, second.public.x)


def test_normalization_is_fitted_on_the_public_split_only(digits):
    normalized = digits.normalize(digits.public.x)
    assert abs(float(normalized.mean())) < 1e-4
    assert abs(float(normalized.std()) - 1) < 1e-3
    assert digits.normalization.fitted_on == "public split"


def test_tabular_normalization_is_per_feature():
    data = load_dataset("breast_cancer")
    assert len(data.normalization.mean) == 30
    np.testing.assert_allclose(data.normalize(data.public.x).mean(axis=0), 0, atol=1e-4)


def test_unknown_dataset_is_refused():
    with pytest.raises(NotFoundError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")

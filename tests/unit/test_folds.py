"""l2sweep.base.data.stratified_folds: k stratified validation folds of equal size."""

from __future__ import annotations

import numpy as np
import pytest

from l2sweep.base.config_errors import ConfigError
from l2sweep.base.data import stratified_folds

#: Unbalanced classes: 103, 57, 31 and 9 examples, shuffled.
Y = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [103, 57, 31, 9]))


@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_folds_are_disjoint_equal_stratified_and_leave_under_k_out(k):
    """Each fold: sorted int64 indices, exactly len(y) // k of them, of each class within one
    example of its share n_c / k; no index twice; the len(y) % k left over belong to no fold."""
    folds = stratified_folds(Y, k, seed=42)
    assert len(folds) == k
    for fold in folds:
        assert fold.dtype == np.int64 and np.all(np.diff(fold) > 0)
        assert len(fold) == len(Y) // k
        share = np.bincount(Y) / k
        assert np.all(np.abs(np.bincount(Y[fold], minlength=4) - share) < 1), fold
    every = np.concatenate(folds)
    assert len(np.unique(every)) == len(every)
    assert len(Y) - len(every) == len(Y) % k < k


def test_folds_are_drawn_from_the_seed():
    first = stratified_folds(Y, 5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, stratified_folds(Y, 5, seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, stratified_folds(Y, 5, seed=2)))


@pytest.mark.parametrize("k", [1, 0, -3, 10, 2.0, True, None])
def test_a_k_outside_two_to_the_smallest_class_is_refused(k):
    allowed = "null .no cross-validation. or an integer from 2 to 9, the smallest class's"
    with pytest.raises(ConfigError, match=rf"data.folds={k!r} is not allowed: {allowed}"):
        stratified_folds(Y, k, seed=0)

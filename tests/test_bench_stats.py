"""The benchmarks' statistics on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from bench.stats import percentiles, roc_auc, tpr_at_fpr, wilson_interval


def test_percentiles_interpolate_between_order_statistics():
    assert percentiles(range(1, 101)) == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    with pytest.raises(ValueError, match="no samples"):
        percentiles([])


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), table I: 81 of 263 -> 0.2553 to 0.3662; 15 of 148 -> 0.0624 to 0.1605
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(15, 148)
    assert (round(low, 4), round(high, 4)) == (0.0624, 0.1605)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert 0.0 < wilson_interval(10, 10)[0] < 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_auc_of_perfect_random_and_tied_scores():
    members = [1] * 4 + [0] * 4
    assert roc_auc([5, 6, 7, 8, 1, 2, 3, 4], members) == 1.0
    assert roc_auc([1, 2, 3, 4, 5, 6, 7, 8], members) == 0.0
    assert roc_auc([1] * 8, members) == 0.5  # all tied
    # one member below one non-member out of 2 x 2 pairs: AUC 3/4
    assert roc_auc([3, 1, 2, 0], [1, 1, 0, 0]) == 0.75


def test_auc_equals_the_pairwise_definition_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=300).astype(float)
    member = rng.random(300) < 0.4
    a, b = scores[member][:, None], scores[~member][None, :]
    pairwise = ((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size)
    assert roc_auc(scores, member) == pytest.approx(pairwise)


def test_tpr_at_low_fpr():
    others = np.arange(100.0)  # non-members score 0..99
    members = np.array([99.5, 98.5, 50.0, 10.0])
    scores = np.concatenate([members, others])
    is_member = np.r_[np.ones(4, bool), np.zeros(100, bool)]
    # at most 1 of 100 non-members may pass: the threshold must be above 98, so 99.5 and 98.5 pass
    assert tpr_at_fpr(scores, is_member, 0.01) == 0.5
    assert tpr_at_fpr(scores, is_member, 0.0) == 0.25  # above every non-member: 99.5 only
    assert tpr_at_fpr(scores, is_member, 1.0) == 1.0
    with pytest.raises(ValueError, match="at least one member"):
        tpr_at_fpr([1.0, 2.0], [False, False])

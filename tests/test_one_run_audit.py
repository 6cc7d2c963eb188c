"""One-run privacy auditing: the bound's mathematics on cases checked independently, and the canary plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bench.one_run import (
    RESOLUTION,
    best_bound,
    count_correct,
    epsilon_lower_bound,
    guess_counts,
    guesses_from_scores,
    p_value,
)


def _theorem(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem transcribed literally, with scipy's binomial: f(v) + 2 m delta max_{i=1..m} (f(v-i) - f(v)) / i."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x: int) -> float:
        return 1.0 if x <= 0 else float(stats.binom.sf(x - 1, r, q))

    return min(1.0, f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, m + 1)))


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(1000, 100, 80, 1.0, 1e-5), (1000, 1000, 600, 0.3, 1e-5), (100, 10, 10, 2.0, 1e-4), (200, 200, 150, 0.5, 0.0)],
)
def test_p_value_is_the_theorem(m, r, v, eps, delta):
    assert p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(
        _theorem(m, r, v, eps, delta), rel=1e-9
    )


def test_without_delta_the_p_value_is_the_binomial_tail_of_randomized_response():
    q = math.exp(1.5) / (1 + math.exp(1.5))
    assert p_value(canaries=50, guesses=40, correct=35, epsilon=1.5, delta=0) == pytest.approx(
        sum(math.comb(40, k) * q**k * (1 - q) ** (40 - k) for k in range(35, 41)), rel=1e-12
    )
    # at epsilon 0 a guess is a fair coin
    assert p_value(canaries=10, guesses=10, correct=10, epsilon=0, delta=0) == pytest.approx(2**-10)
    assert p_value(canaries=10, guesses=10, correct=0, epsilon=0, delta=1e-3) == 1.0


def test_all_guesses_right_matches_a_hand_computation():
    """r right guesses, delta 0: refuted while q^r <= 0.05, i.e. eps <= log(q / (1 - q)) at q = 0.05^(1/r)."""
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)
        exact = math.log(q / (1 - q))  # 1.45 at r = 10, 3.49 at r = 100, 5.80 at r = 1000
        bound = epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0, confidence=0.95)
        assert exact - RESOLUTION <= bound <= exact
    assert epsilon_lower_bound(canaries=100, guesses=100, correct=100, delta=0, confidence=0.95) == pytest.approx(
        3.492, abs=1e-9
    )


def test_monotone_in_every_direction_it_should_be():
    def bound(**changes):
        args = {"canaries": 1000, "guesses": 200, "correct": 150, "delta": 1e-5, "confidence": 0.95} | changes
        return epsilon_lower_bound(**args)

    base = bound()
    assert base > 0
    assert bound(correct=160) > base > bound(correct=140)  # more right guesses
    assert bound(confidence=0.99) < base < bound(confidence=0.9)
    assert bound(delta=1e-3) < base < bound(delta=0)  # delta lets some outcomes through for free
    assert bound(canaries=20_000) < base  # the 2 m delta term counts canaries, not guesses
    assert bound(guesses=400, correct=300) > base  # the same precision over more guesses


def test_the_delta_term_counts_the_canaries():
    """500 right guesses out of 500: with delta = 0 the bound is 5.11 (q = 0.05^(1/500)); 2 m delta = 1
    lets every near miss (499 right, 498, ...) through at up to probability delta per canary."""
    pure = epsilon_lower_bound(canaries=500, guesses=500, correct=500, delta=0, confidence=0.95)
    assert pure == pytest.approx(math.log(0.05 ** (1 / 500) / (1 - 0.05 ** (1 / 500))), abs=RESOLUTION)
    assert epsilon_lower_bound(canaries=500, guesses=500, correct=500, delta=1e-3, confidence=0.95) < pure - 1


def test_random_guessing_yields_no_bound():
    rng = np.random.default_rng(7)
    bounds = []
    for _ in range(40):
        included = rng.random(1000) < 0.5
        result = best_bound(
            rng.normal(size=1000), included, pairs=guess_counts(1000, (0.05, 0.2, 1.0)), delta=1e-5, confidence=0.95
        )
        bounds.append(result["epsilon_lower_bound"])
    assert sum(b > 0 for b in bounds) <= 4 and max(bounds) < 0.3


def test_the_bound_is_wrong_at_most_as_often_as_its_confidence_allows():
    """Randomized response is the eps-DP mechanism that guessing gains most against: each guess is
    right with probability e^eps / (1 + e^eps) exactly. The 95% bound may exceed the true epsilon in
    at most 5% of runs; a bound with the wrong tail, or without its delta term, would do so more."""
    rng = np.random.default_rng(11)
    eps, delta, r, runs = 1.0, 1e-4, 400, 300
    q = math.exp(eps) / (1 + math.exp(eps))
    bounds = np.array(
        [
            epsilon_lower_bound(canaries=r, guesses=r, correct=int(rng.binomial(r, q)), delta=delta, confidence=0.95)
            for _ in range(runs)
        ]
    )
    assert np.mean(bounds > eps) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / runs)
    assert np.median(bounds) > 0.6  # and it is not vacuous


def test_guesses_take_the_extremes_and_abstain_in_the_middle():
    scores = np.array([0.5, 3.0, -1.0, 2.0, 0.0, -2.0])
    np.testing.assert_array_equal(guesses_from_scores(scores, positives=2, negatives=1), [0, 1, 0, 1, 0, -1])
    np.testing.assert_array_equal(guesses_from_scores(scores, positives=0, negatives=0), np.zeros(6))
    np.testing.assert_array_equal(guesses_from_scores(np.zeros(4), positives=1, negatives=1), [-1, 0, 0, 1])
    with pytest.raises(ValueError):
        guesses_from_scores(scores, positives=4, negatives=3)
    included = np.array([True, True, False, False, True, False])
    assert count_correct(np.array([0, 1, 0, 1, 0, -1]), included) == 2  # +1 right, +1 wrong, -1 right


def test_guess_counts_and_the_bonferroni_correction():
    assert guess_counts(1000, (0.05, 0.1, 1.0)) == [(25, 25), (50, 50), (500, 500)]
    assert guess_counts(15, (0.1, 0.1, 0.2)) == [(1, 1), (2, 1)]  # rounded, at least one guess, no repeats
    with pytest.raises(ValueError):
        guess_counts(100, (0.0,))
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(scale=1.5, size=1000)  # a real signal
    pairs = guess_counts(1000, (0.1, 0.2, 0.5))
    result = best_bound(scores, included, pairs=pairs, delta=1e-5, confidence=0.95)
    assert result["per_pair_confidence"] == pytest.approx(1 - 0.05 / 3)
    best = max(result["pairs"], key=lambda row: row["epsilon"])
    assert (result["positives"], result["negatives"], result["correct"]) == (
        best["positives"],
        best["negatives"],
        best["correct"],
    )
    alone = epsilon_lower_bound(
        canaries=1000, guesses=result["guesses"], correct=result["correct"], delta=1e-5, confidence=0.95
    )
    assert 0 < result["epsilon_lower_bound"] < alone  # the correction costs something
    assert result["included"] == int(included.sum()) and result["canaries"] == 1000


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        p_value(canaries=10, guesses=11, correct=1, epsilon=1, delta=0)
    with pytest.raises(ValueError):
        p_value(canaries=10, guesses=5, correct=1, epsilon=-1, delta=0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(canaries=10, guesses=5, correct=1, delta=0, confidence=1.0)
    with pytest.raises(ValueError):
        best_bound(np.zeros(3), np.zeros(4, dtype=bool), pairs=[(1, 1)], delta=0, confidence=0.95)


# -- canaries ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breast_cancer():
    from models.data import load_dataset

    return load_dataset("breast_cancer")


def test_canaries_are_mislabelled_test_examples_and_only_the_included_ones_train(breast_cancer):
    from bench.one_run_audit import draw_inclusion, make_canaries, with_canaries

    canaries = make_canaries(breast_cancer, count=50)
    assert len(canaries) == 50
    rows = {row.tobytes(): i for i, row in enumerate(breast_cancer.test.x)}
    sources = [rows[row.tobytes()] for row in canaries.x]  # every canary is a test example
    assert np.all(canaries.y != breast_cancer.test.y[sources])  # with a wrong label
    again = make_canaries(breast_cancer, count=50)  # public and fixed: the same canaries every time
    np.testing.assert_array_equal(again.x, canaries.x)
    np.testing.assert_array_equal(again.y, canaries.y)

    included = draw_inclusion(50)
    assert included.dtype == bool and 10 < included.sum() < 40
    assert not all(np.array_equal(included, draw_inclusion(50)) for _ in range(3))  # no seed fixes the coins
    audit = with_canaries(breast_cancer, canaries, included)
    assert len(audit.private) == len(breast_cancer.private) + included.sum()
    np.testing.assert_array_equal(audit.private.x[len(breast_cancer.private) :], canaries.x[included])
    np.testing.assert_array_equal(audit.private.y[len(breast_cancer.private) :], canaries.y[included])
    assert audit.test is breast_cancer.test and audit.public is breast_cancer.public


def test_more_canaries_than_test_examples_are_refused(breast_cancer):
    from bench.one_run_audit import make_canaries
    from models.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="test split has 114"):
        make_canaries(breast_cancer, count=115)


def test_scores_compare_the_run_with_the_audited_model():
    from bench.one_run_audit import canary_scores

    reference = np.array([[0.0, 0.0], [2.0, 0.0]])
    run = np.array([[1.0, 0.0], [2.0, 0.0]])
    labels = np.array([0, 1])
    np.testing.assert_allclose(canary_scores(run, reference, labels), [1.0, 0.0])

"""The statistics of one-run privacy auditing, apart from any model or training code.

Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023,
arXiv:2305.08846), turn one training run into a lower bound on epsilon:

* ``m`` canaries; each one's inclusion bit ``S_i`` is drawn independently and uniformly (it is in
  the training set or it is not), and only the auditor knows the bits.
* After training, the auditor makes ``r`` guesses ``T_i`` ("in" or "out") and abstains on the other
  ``m - r`` canaries, from the trained model and anything else that does not depend on ``S``.
* ``W``, the number of correct guesses, is compared with what (epsilon, delta)-DP allows.

The theorem implemented here (their main result for approximate DP, Section 3 of the paper,
computed as in their appendix's p-value algorithm): if the training mechanism is
(epsilon, delta)-DP with respect to adding or removing one canary, and the auditor makes exactly
``r`` guesses, then for every ``v``

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,

where ``f(x) = P[Binomial(r, q) >= x]`` and ``q = e^eps / (1 + e^eps)`` is the accuracy of
eps-DP randomized response (``f(x) = 1`` for ``x <= 0``). With ``delta = 0`` it is the pure-DP
statement ``P[W >= v] <= f(v)``: ``r`` guesses about an eps-DP mechanism are no better than ``r``
independent coins that each land right with probability ``q``. The delta term counts the
canaries, not the guesses (``2 m delta``): with MNIST's delta = 1e-5 and 1,000 canaries it is at
most 0.02, and it makes the bound meaningless once ``2 m delta`` approaches the significance
level, which caps the useful number of canaries at roughly ``0.05 / (2 delta)``.

For ``i > v`` the quotient is ``(1 - f(v)) / i``, below its value at ``i = v``, so the maximum runs
over ``i = 1..v`` only; every window ``f(v - i) - f(v) = P[v - i <= Binomial < v]`` is summed from
probabilities, never formed as a difference of two tails, so nothing cancels.

From the p-value to a bound: the reported epsilon is the largest ``L`` on a grid of step
:data:`RESOLUTION` such that every grid point ``0, h, ..., L`` is rejected (p-value at most
``1 - confidence``). If the true epsilon ``e`` of the mechanism were below ``L``, the mechanism
would also be (``g``, delta)-DP for the first grid point ``g >= e``, which lies at or below ``L``
and was rejected: that happens with probability at most ``1 - confidence``. The argument needs no
monotonicity of the p-value in epsilon (which the delta term does not guarantee).

Choosing the guesses after seeing the scores would void the theorem, so the choice is made in
advance among a fixed list of ``(k+, k-)`` pairs (the ``k+`` highest scores guessed "in", the
``k-`` lowest "out", as in the paper), and :func:`best_bound` reports the best of them at a
Bonferroni-corrected confidence: each pair is tested at ``1 - (1 - confidence) / K``, so the
chance that any of the ``K`` bounds is wrong stays at most ``1 - confidence``.
"""

from __future__ import annotations

import math

import numpy as np

RESOLUTION = 1e-3  # grid step of the reported bound, in epsilon
EPSILON_CEILING = 100.0  # no finite number of guesses can support more; the search stops here
_CHUNK = 256  # epsilons evaluated per vectorized step of the grid search


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")


def _check_delta(delta: float) -> None:
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def _log_binomial_coefficients(n: int) -> np.ndarray:
    return np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in range(n + 1)])


def _p_values(
    epsilons: np.ndarray, *, canaries: int, guesses: int, correct: int, delta: float, log_choose: np.ndarray
) -> np.ndarray:
    """The theorem's bound on ``P[W >= correct]`` at each of ``epsilons`` (vectorized over them)."""
    if correct == 0:  # P[W >= 0] = 1, exactly rather than as a sum that rounds below it
        return np.ones(len(epsilons))
    eps = np.asarray(epsilons, dtype=np.float64)[:, None]
    k = np.arange(guesses + 1)
    log_q = -np.logaddexp(0.0, -eps)  # log(e^eps / (1 + e^eps)), stable for any eps >= 0
    log_1mq = -np.logaddexp(0.0, eps)
    pmf = np.exp(log_choose[None, :] + k * log_q + (guesses - k) * log_1mq)
    tail = pmf[:, correct:].sum(axis=1)  # f(correct)
    if delta == 0:
        return np.minimum(tail, 1.0)
    windows = np.cumsum(pmf[:, correct - 1 :: -1], axis=1)  # window i: P[correct - i <= Binomial < correct]
    alpha = (windows / np.arange(1, correct + 1)).max(axis=1)
    return np.minimum(tail + 2 * canaries * delta * alpha, 1.0)


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The most probability (epsilon, delta)-DP leaves to ``correct`` or more right guesses out of ``guesses``.

    Args:
        canaries: ``m``, each included independently with probability 1/2.
        guesses: ``r``, the guesses made (abstentions excluded).
        correct: ``v``, how many of them were right.
        epsilon, delta: the DP guarantee under test (the null hypothesis).

    Raises:
        ValueError: counts out of order, a negative epsilon, or delta outside [0, 1].
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    if epsilon < 0:
        raise ValueError(f"epsilon must be non-negative, got {epsilon}")
    values = _p_values(
        np.array([epsilon]),
        canaries=canaries,
        guesses=guesses,
        correct=correct,
        delta=delta,
        log_choose=_log_binomial_coefficients(guesses),
    )
    return float(values[0])


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest epsilon (to :data:`RESOLUTION`) that the outcome refutes at ``confidence``.

    Every grid point from 0 up to the returned value has a p-value of at most ``1 - confidence``
    (see the module docstring for why that makes it a valid bound); 0 when even epsilon = 0 is not
    refuted, which is what guessing at random gives.

    Raises:
        ValueError: as :func:`p_value`, or ``confidence`` outside (0, 1).
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1 - confidence
    log_choose = _log_binomial_coefficients(guesses)
    steps = round(EPSILON_CEILING / RESOLUTION)
    for start in range(0, steps + 1, _CHUNK):
        grid = np.arange(start, min(start + _CHUNK, steps + 1)) * RESOLUTION
        p = _p_values(grid, canaries=canaries, guesses=guesses, correct=correct, delta=delta, log_choose=log_choose)
        kept = np.flatnonzero(p > significance)
        if kept.size:
            first = start + int(kept[0])
            return 0.0 if first == 0 else round((first - 1) * RESOLUTION, 6)
    return EPSILON_CEILING


def guesses_from_scores(scores: np.ndarray, *, positives: int, negatives: int) -> np.ndarray:
    """``T`` in {-1, 0, +1}: +1 ("in") for the ``positives`` highest scores, -1 for the ``negatives``
    lowest, 0 (abstain) for the rest. Ties are broken by position (a stable sort), never by the
    inclusion bits.

    Raises:
        ValueError: more guesses than scores, or a negative count.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if positives < 0 or negatives < 0 or positives + negatives > len(scores):
        raise ValueError(f"cannot guess {positives} in and {negatives} out among {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=np.int8)
    guesses[order[:negatives]] = -1
    if positives:
        guesses[order[len(scores) - positives :]] = 1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> int:
    """How many non-abstaining guesses match the inclusion bits."""
    guesses, included = np.asarray(guesses), np.asarray(included, dtype=bool)
    return int(np.sum((guesses == 1) & included) + np.sum((guesses == -1) & ~included))


def guess_counts(canaries: int, fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """The ``(k+, k-)`` pairs to try, fixed before any score is seen: for each fraction ``f`` of the
    canaries, ``round(f m)`` guesses (at least 1) split evenly between "in" and "out" (one more "in"
    when odd); repeated pairs are dropped.

    Raises:
        ValueError: a fraction outside (0, 1].
    """
    pairs = []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {fraction}")
        total = max(1, round(fraction * canaries))
        pair = (total - total // 2, total // 2)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def best_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    pairs: list[tuple[int, int]],
    delta: float,
    confidence: float,
) -> dict:
    """The best lower bound over the pre-registered ``(k+, k-)`` pairs, Bonferroni-corrected.

    Returns the chosen pair, its counts and bound, the per-pair confidence, and every pair's
    counts and bound (so that a reader can see the choice was not cherry-picked after the fact:
    the correction already pays for it).

    Raises:
        ValueError: no pairs, or scores and bits of different lengths.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if not pairs:
        raise ValueError("need at least one (k+, k-) pair")
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and inclusion bits must be 1-D and of the same length")
    per_pair = 1 - (1 - confidence) / len(pairs)
    rows = []
    for positives, negatives in pairs:
        guesses = guesses_from_scores(scores, positives=positives, negatives=negatives)
        correct = count_correct(guesses, included)
        bound = epsilon_lower_bound(
            canaries=len(scores), guesses=positives + negatives, correct=correct, delta=delta, confidence=per_pair
        )
        rows.append({"positives": positives, "negatives": negatives, "correct": correct, "epsilon": bound})
    best = max(rows, key=lambda row: row["epsilon"])  # the first of equals: the fewest guesses
    return {
        "epsilon_lower_bound": best["epsilon"],
        "confidence": confidence,
        "per_pair_confidence": per_pair,
        "canaries": len(scores),
        "included": int(included.sum()),
        "guesses": best["positives"] + best["negatives"],
        "positives": best["positives"],
        "negatives": best["negatives"],
        "correct": best["correct"],
        "delta": delta,
        "pairs": rows,
    }

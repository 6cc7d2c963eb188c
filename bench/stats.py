"""The statistics the benchmarks report, each written once and tested on known inputs.

- :func:`percentiles`: latency percentiles, in the same unit as the samples.
- :func:`wilson_interval`: a confidence interval for an accuracy measured on ``n`` samples; the
  encrypted path is measured on a sample of the test set, so its accuracy carries one.
- :func:`roc_auc` and :func:`tpr_at_fpr`: how well a membership-inference attack separates
  training members from non-members. AUC is the probability that a random member scores above a
  random non-member (ties count half); TPR at a low FPR is what matters for privacy (Carlini et
  al., "Membership Inference Attacks From First Principles", 2022).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def percentiles(samples, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` by linear interpolation between order statistics.

    Raises:
        ValueError: no samples.
    """
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("percentiles of no samples")
    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and behaves at 0 and n successes,
    which is where high accuracies on small samples sit.

    Raises:
        ValueError: ``n`` not positive, or ``successes`` outside [0, n].
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, where rounding lands off by 1e-17
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _split(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    scores, is_member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    if scores.shape != is_member.shape or scores.ndim != 1:
        raise ValueError("scores and membership labels must be 1-D and of the same length")
    members, others = scores[is_member], scores[~is_member]
    if members.size == 0 or others.size == 0:
        raise ValueError("need at least one member and one non-member")
    return members, others


def roc_auc(scores, is_member) -> float:
    """Area under the ROC curve of ``scores`` (higher: more likely a member); ties count half.

    Computed from the ranks (the Mann-Whitney U statistic), so it is exact and O(n log n).
    """
    members, others = _split(scores, is_member)
    combined = np.concatenate([members, others])
    order = np.argsort(combined, kind="mergesort")
    ranks = np.empty(len(combined))
    sorted_scores = combined[order]
    start = 0
    while start < len(combined):  # mid-ranks for ties
        end = start
        while end + 1 < len(combined) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(others)))


def tpr_at_fpr(scores, is_member, fpr: float = 0.01) -> float:
    """The largest true-positive rate of a threshold rule ``score >= t`` whose false-positive
    rate is at most ``fpr``."""
    members, others = _split(scores, is_member)
    allowed = math.floor(fpr * len(others))  # non-members that may score at or above t
    others_desc = np.sort(others)[::-1]
    if allowed >= len(others):
        return 1.0
    # t must exceed the (allowed+1)-th largest non-member score
    bound = others_desc[allowed]
    return float(np.mean(members > bound))

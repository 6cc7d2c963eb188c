"""The arithmetic of a membership-inference audit, apart from any model or training code.

- :func:`true_class_log_odds` and :func:`cross_entropy`: what an attacker reads off a model's
  logits for an example ``(x, y)``; both stay finite where the softmax rounds to exactly 1.
- :func:`lira_offline_scores`: the offline likelihood-ratio attack of Carlini et al.,
  "Membership Inference Attacks From First Principles" (IEEE S&P 2022), given the target's and
  the reference ("shadow") models' log-odds on the same examples.
- :func:`evaluate_attack`: AUC with a Hanley-McNeil interval and TPR at low FPRs with Wilson
  intervals, from :mod:`bench.stats`; :func:`paired_bootstrap_difference` compares two models
  audited on the same examples.
- :func:`dp_tpr_bound` and :func:`dp_auc_bound`: what (epsilon, delta)-DP allows any attack;
  :func:`above_dp_bound`: whether a measured attack is inconsistent with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np

from bench.stats import roc_auc, tpr_at_fpr, wilson_interval

PER_EXAMPLE_VARIANCE_MIN_SHADOWS = 32  # below this, one pooled variance estimates better (Carlini et al., sec. VI)


def true_class_log_odds(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``phi = log(p_y / (1 - p_y))`` of the softmax, per example.

    Carlini et al. score with this logit-scaled confidence because across models trained on
    different data it is close to Gaussian, where ``p_y`` piles up at 1. It equals the true
    class's logit minus the log-sum-exp of the other logits, which never forms ``1 - p_y``:
    confident MNIST models leave ``1 - p_y`` below 1e-12, where a loss taken from the softmax
    is mostly rounding error and ties or misorders exactly the examples a low-FPR threshold needs.

    Raises:
        ValueError: ``logits`` not ``[n, classes]`` with ``labels`` ``[n]``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"need logits [n, classes] and labels [n], got {logits.shape} and {labels.shape}")
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - np.logaddexp.reduce(others, axis=1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The per-example training loss ``-log p_y``, computed as ``log(1 + exp(-phi))``.

    Equal to the softmax cross-entropy, but it does not round to 0 for confident examples, so a
    threshold on it separates them instead of tying them.
    """
    return np.logaddexp(0.0, -true_class_log_odds(logits, labels))


def lira_offline_scores(
    target_log_odds: np.ndarray, shadow_log_odds: np.ndarray, *, per_example_variance: bool
) -> np.ndarray:
    """Offline LiRA: how far the target's log-odds lie above what models without the example give.

    ``shadow_log_odds`` is ``[shadows, n]``: reference models that never trained on any of the
    ``n`` examples. Each example's OUT distribution is a Gaussian with the shadows' mean and
    either its own variance or one pooled over all examples. The one-sided test of Carlini et al.
    scores ``Pr[Z <= phi_target]`` for ``Z`` from that Gaussian; its z-score, returned here, ranks
    the examples identically and keeps its resolution in the tails, where the float CDF rounds to 1.

    Raises:
        ValueError: fewer than 2 shadows, or shapes that do not match.
    """
    target = np.asarray(target_log_odds, dtype=np.float64)
    shadows = np.asarray(shadow_log_odds, dtype=np.float64)
    if shadows.ndim != 2 or target.shape != (shadows.shape[1],):
        raise ValueError(f"need target [n] and shadows [k, n], got {target.shape} and {shadows.shape}")
    if shadows.shape[0] < 2:
        raise ValueError("need at least 2 shadow models to estimate a variance")
    mean = shadows.mean(axis=0)
    if per_example_variance:
        std = shadows.std(axis=0, ddof=1)
    else:
        std = np.full_like(mean, math.sqrt(np.sum((shadows - mean) ** 2) / (shadows.size - shadows.shape[1])))
    return (target - mean) / np.maximum(std, 1e-12)


def auc_standard_error(auc: float, n_members: int, n_non_members: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC measured on the given counts.

    Closed form, so it costs nothing; at AUC 0.5 it equals the exact null standard error of
    the Mann-Whitney statistic, which is where an audit of a private model sits.
    """
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_members - 1) * (q1 - auc * auc) + (n_non_members - 1) * (q2 - auc * auc)) / (
        n_members * n_non_members
    )
    return math.sqrt(max(variance, 0.0))


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def evaluate_attack(scores, is_member, *, fprs: tuple[float, ...], confidence: float = 0.95) -> dict:
    """AUC and its interval, and the TPR at each FPR with a Wilson interval over the members.

    The TPR interval counts only the members' sampling; the threshold, set on the non-members,
    is noisy too, which is why ``false_positives_allowed`` is given beside it: at 0 or 1 the
    figure is a single order statistic.
    """
    is_member = np.asarray(is_member, dtype=bool)
    n_members, n_non_members = int(is_member.sum()), int((~is_member).sum())
    auc = roc_auc(scores, is_member)
    half = _z(confidence) * auc_standard_error(auc, n_members, n_non_members)
    result: dict = {
        "auc": auc,
        "auc_ci": [max(0.0, auc - half), min(1.0, auc + half)],
        "auc_standard_error": auc_standard_error(auc, n_members, n_non_members),
        "tpr_at_fpr": {},
    }
    for fpr in fprs:
        tpr = tpr_at_fpr(scores, is_member, fpr)
        found = round(tpr * n_members)
        result["tpr_at_fpr"][f"{fpr:g}"] = {
            "tpr": tpr,
            "ci": list(wilson_interval(found, n_members, confidence)),
            "false_positives_allowed": math.floor(fpr * n_non_members),
        }
    return result


def paired_bootstrap_difference(
    first,
    second,
    is_member,
    *,
    measure: Callable[[np.ndarray, np.ndarray], float],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """``measure(first) - measure(second)`` for two models' scores on the same examples, with a
    percentile interval from a paired bootstrap.

    Members and non-members are resampled separately, so their counts stay fixed, and with the
    same draws for both models. The interval then carries the noise of a threshold set on the
    non-members as well as that of the members, and the correlation between two models scored on
    the same examples, which an interval built from two separate standard errors ignores.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    members, non_members = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    for b in range(resamples):
        drawn = np.concatenate([rng.choice(members, len(members)), rng.choice(non_members, len(non_members))])
        differences[b] = measure(first[drawn], is_member[drawn]) - measure(second[drawn], is_member[drawn])
    tail = 100 * (1 - confidence) / 2
    return {
        "difference": measure(first, is_member) - measure(second, is_member),
        "ci": [float(np.percentile(differences, tail)), float(np.percentile(differences, 100 - tail))],
        "confidence": confidence,
        "resamples": resamples,
    }


def dp_tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """The highest TPR any attack can reach at ``fpr`` against an (epsilon, delta)-DP mechanism.

    The hypothesis-testing view of DP (Kairouz et al. 2015): any test's false-positive rate
    ``a`` and false-negative rate ``b`` satisfy ``e^eps a + b >= 1 - delta`` and
    ``a + e^eps b >= 1 - delta``; with ``TPR = 1 - b`` these read ``TPR <= e^eps FPR + delta``
    and ``TPR <= 1 - e^-eps (1 - delta - FPR)``. It holds per example, for the game in which that
    example's membership is the coin an attacker guesses.
    """
    if math.isinf(epsilon):
        return 1.0
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr)))


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The area under :func:`dp_tpr_bound`: the highest AUC any attack can reach.

    For delta = 0 it is ``e^eps / (1 + e^eps)`` (0.731 at epsilon 1); integrated numerically so
    that delta counts too.
    """
    if math.isinf(epsilon):
        return 1.0
    fprs = np.linspace(0.0, 1.0, 200_001)
    bound = np.minimum.reduce(
        [np.ones_like(fprs), math.exp(epsilon) * fprs + delta, 1 - math.exp(-epsilon) * (1 - delta - fprs)]
    )
    return float(np.trapezoid(bound, fprs))


def above_dp_bound(attack: dict, *, epsilon: float, delta: float) -> list[str]:
    """The measures of ``attack`` (from :func:`evaluate_attack`) whose whole 95% interval lies
    above what (epsilon, delta)-DP allows: empty when the audit is consistent with the guarantee.

    A point estimate above the bound alone proves nothing: at 1% FPR on a few hundred
    non-members the threshold is a single order statistic. The TPR interval ignores that
    threshold's own noise, so a flag here deserves a rerun with more examples before alarm.
    """
    above = []
    if attack["auc_ci"][0] > dp_auc_bound(epsilon, delta):
        above.append("AUC")
    for fpr, measured in attack["tpr_at_fpr"].items():
        if measured["ci"][0] > dp_tpr_bound(float(fpr), epsilon, delta):
            above.append(f"TPR at {float(fpr):.1%} FPR")
    return above

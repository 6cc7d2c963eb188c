"""One-run privacy audit of a model: an empirical lower bound on epsilon beside the accountant's.

After Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023);
the statistics live in :mod:`bench.one_run`. For each audited model:

1. **Canaries** (:func:`make_canaries`): ``m`` records that the model never trains on otherwise:
   test-split examples with a wrong label, images marked with bright pixels where the data is
   blank. Which records, labels and marks they are is public and fixed (:data:`CANARY_SEED`);
   what is secret is the inclusion bits.
2. **Inclusion bits** (:func:`draw_inclusion`): one fair coin per canary from the operating
   system's CSPRNG (``secrets``), held only in memory by the auditor; no seed reproduces them.
3. **One training run** with exactly the audited model's mechanism: its recipe rebuilt from the
   manifest (:func:`models.recipes.recipe_from_manifest`), trained through
   :func:`models.pipeline.train_private`, the code path of every bundled model (for the CNN, the
   frozen filter bank computed once per example), on the private split plus the included
   canaries. The batch size is adjusted so that Poisson sampling keeps the audited sample rate,
   hence the same steps and, from the same (epsilon, delta), the same noise multiplier;
   :func:`bench.audit.check_same_mechanism` refuses the run otherwise. Adding records does not
   change what DP-SGD guarantees per record, so the run's per-canary guarantee is the
   audited model's epsilon and delta.
4. **Scores and guesses** (:func:`canary_scores`): each canary's score is the run's fp32 model's
   log-odds on the canary's label (:func:`bench.membership.true_class_log_odds`; the fp32 model is
   the mechanism's direct output, the int8 export post-processing that can only lose
   information) minus the audited model's own log-odds on it (its int8 ONNX file, as served).
   The audited model trained before the coins were drawn and never on the test split, so it is
   independent of the coins and may inform the guesses; it removes what dominates the raw score,
   each canary's own difficulty (how plausible its wrong label looks). Measured on mnist-cnn-eps8
   with 1,000 unmarked mislabelled digits: the raw log-odds vary with a standard deviation of
   10.0 across canaries and correlate at 0.98 with the audited model's, the difference varies by
   3.1, and the AUC of included against excluded canaries rose from 0.526 to 0.566. The ``k+``
   highest scores are guessed "in", the ``k-`` lowest "out"; :func:`bench.one_run.best_bound`
   turns the correct guesses into an epsilon that holds with 95% confidence, Bonferroni-corrected
   over the ``(k+, k-)`` pairs fixed in :data:`GUESS_FRACTIONS`.

What the bound rests on: the inclusion bits reach nothing but the training run (drawn after the
canaries are fixed, from a CSPRNG, never written down), and the training run's noise and batches
come from the OS CSPRNG (:mod:`models.randomness`), as the audited model's did. The bound is a
lower bound: what this attack extracts, not all that the model leaks.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time

import numpy as np

from bench.audit import check_same_mechanism, int8_logits, shadow_recipe
from bench.membership import true_class_log_odds
from bench.one_run import best_bound, epsilon_lower_bound, guess_counts
from models.data import Dataset, Split
from models.errors import InvalidArgumentError
from models.manifest import DPRecord, EmpiricalAudit
from models.repository import ModelArtifact

METHOD = "one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv:2305.08846)"
CONFIDENCE = 0.95
CANARY_SEED = 0  # chooses which records become canaries and their labels: public by design
RUN_SEED_OFFSET = 1000  # the audit run's initial-weights seed: the model's plus this (shadows: + 1 + k)
# The (k+, k-) pairs, fixed before any score is seen: these fractions of the canaries guessed, split
# evenly between "in" and "out". Few pairs, because each costs confidence: with 5, each is tested at
# 99% (z = 2.33 one-sided) rather than 95% (1.64). On the 1,000-canary mnist-cnn-eps8 run the best
# precision came at 10-20% guessed (61-62%), both sides together beat "in" only (55-57%), and the
# smallest fractions (1-2%) never gave a bound.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
MARKS = 16  # bright pixels per image canary
BLANK_SHARE = 0.99  # a pixel is blank if 0 in this share of the public split


@dataclasses.dataclass(frozen=True)
class Canaries:
    """Raw canary inputs and the labels they are trained with, and what they are."""

    x: np.ndarray
    y: np.ndarray
    kind: str

    def __len__(self) -> int:
        return len(self.y)


def blank_pixels(dataset: Dataset) -> np.ndarray:
    """Flat indices of the input values that are 0 in at least :data:`BLANK_SHARE` of the public split.

    MNIST: 300 of 784 pixels (its digits are centred in a 20x20 box, the frame around it is
    blank); digits: 9 of 64; breast_cancer: none that are usable (its features are measurements).
    """
    if dataset.kind != "image":
        return np.array([], dtype=np.int64)
    share = (dataset.public.x == 0).reshape(len(dataset.public), -1).mean(axis=0)
    return np.flatnonzero(share >= BLANK_SHARE)


def make_canaries(dataset: Dataset, *, count: int, seed: int = CANARY_SEED) -> Canaries:
    """``count`` canaries for ``dataset``: test-split examples with a wrong label and, on images, marks.

    Why the test split: no model trains on it, so an excluded canary is genuinely absent from the
    run, and taking canaries from it touches neither the private split (whose membership the
    accountant's epsilon is about) nor the public split (which fits the normalization and the
    quantization calibration, and refills the membership audit's shadows).

    Why a wrong label (drawn uniformly among the others): a correctly labelled example moves a
    well-generalizing model hardly at all, so its presence is hidden by the rest of the data; a
    mislabelled one keeps a large gradient, clipped to the bound, for the whole run.

    Why marks: up to :data:`MARKS` pixels, chosen at random per canary among those the public split
    leaves blank, set to the brightest raw value the public split holds. On MNIST's CNN they put
    about half of each canary's feature vector (after the fixed filter bank, square, pooling and
    centring) into directions where the data barely varies (eigenvalues under 1% of the largest),
    against 27% for an unmarked digit: the data then hardly pulls the model back from what a canary
    pushed, and the marks make each canary's push its own. Marks alone do not work: a blank image
    with marks is, after centring, mostly the negated mean feature vector that every such canary
    shares (cosine 0.72-0.97 with it). Measured on mnist-cnn-eps8, 5,000 canaries, one run each:
    empirical epsilon 0.020 with plain mislabelled digits, 0.243 and 0.173 (two runs) with marked
    ones (``python -m bench.audit --one-run-only --models mnist-cnn-eps8``, 2026-12-03).

    Raises:
        InvalidArgumentError: more canaries than test examples.
    """
    if not 0 < count <= len(dataset.test):
        raise InvalidArgumentError(
            f"{dataset.name}: {count} canaries asked, the test split has {len(dataset.test)} examples"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(dataset.test), count, replace=False))
    classes = len(dataset.labels)
    labels = (dataset.test.y[chosen] + rng.integers(1, classes, count)) % classes
    x = dataset.test.x[chosen].copy()
    blank = blank_pixels(dataset)
    marks = min(MARKS, len(blank) // 4)  # at most a quarter of the blank pixels, so that canaries differ
    kind = "test-split examples, wrong label"
    if marks:
        flat = x.reshape(count, -1)
        bright = float(dataset.public.x.max())
        for row in flat:
            row[rng.choice(blank, marks, replace=False)] = bright
        kind += f", {marks} bright pixels where the public split is blank"
    return Canaries(x=x, y=labels.astype(np.int64), kind=kind)


def draw_inclusion(count: int) -> np.ndarray:
    """One fair coin per canary from a generator seeded by the OS CSPRNG; the seed is never kept."""
    rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    return rng.random(count) < 0.5


def with_canaries(dataset: Dataset, canaries: Canaries, included: np.ndarray) -> Dataset:
    """``dataset`` whose private split also holds the included canaries (the other splits unchanged)."""
    private = Split(
        np.concatenate([dataset.private.x, canaries.x[included]]),
        np.concatenate([dataset.private.y, canaries.y[included]]),
    )
    return dataclasses.replace(dataset, private=private)


@dataclasses.dataclass(frozen=True)
class OneRunResult:
    scores: np.ndarray
    included: np.ndarray
    seconds: float
    dp: DPRecord  # the audit run's


def train_and_score(
    artifact: ModelArtifact, dataset: Dataset, *, canaries: Canaries, included: np.ndarray
) -> OneRunResult:
    """Train once with ``artifact``'s mechanism on the private split plus the included canaries, and
    score every canary (higher: more likely included).

    Raises:
        InvalidArgumentError: the model was not trained on this dataset's private split.
        InternalError: the run's DP-SGD mechanism differs from the model's.
    """
    import torch

    from models.pipeline import train_private
    from models.recipes import recipe_from_manifest

    manifest = artifact.manifest
    if manifest.dp.private_size != len(dataset.private):
        raise InvalidArgumentError(
            f"{manifest.name} trained on {manifest.dp.private_size} examples, but the {dataset.name} private "
            f"split has {len(dataset.private)}"
        )
    audit_data = with_canaries(dataset, canaries, included)
    recipe = recipe_from_manifest(manifest)
    recipe = shadow_recipe(
        recipe,
        sample_rate=manifest.dp.sample_rate,
        private_size=len(audit_data.private),
        seed=recipe.training.seed + RUN_SEED_OFFSET,
    )
    started = time.perf_counter()
    trained = train_private(recipe=recipe, dataset=audit_data, progress=False)
    check_same_mechanism(trained.dp, manifest.dp)
    seconds = time.perf_counter() - started
    module = trained.module
    module.eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(dataset.normalize(canaries.x))).numpy()
    return OneRunResult(
        scores=canary_scores(logits, int8_logits(artifact, canaries.x), canaries.y),
        included=included,
        seconds=seconds,
        dp=trained.dp,
    )


def canary_scores(run_logits: np.ndarray, reference_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How much more the run's model believes each canary's label than the audited model does
    (log-odds against log-odds): higher means more likely included."""
    return true_class_log_odds(run_logits, labels) - true_class_log_odds(reference_logits, labels)


def audit_pairs(canaries: int) -> list[tuple[int, int]]:
    """The pre-registered ``(k+, k-)`` pairs for ``canaries`` canaries."""
    return guess_counts(canaries, GUESS_FRACTIONS)


def evaluate(result: OneRunResult, *, delta: float, accountant_epsilon: float) -> dict:
    """The bound from one run's scores, and whether it contradicts the accountant.

    ``above_accountant`` is the failure the benchmark must report: with probability at least
    95%, the mechanism's epsilon is at least the bound, so a bound above the accountant's epsilon
    says the implementation does not deliver what its proof claims (or the audit is broken).
    ``ceiling`` is the most this audit could show, every guess of the largest pair right: where it
    is below the accountant's epsilon, no attack could make this audit fail (5,000 MNIST canaries:
    6.56, under epsilon 8; breast_cancer's 114: 3.11, barely above its 3).
    """
    pairs = audit_pairs(len(result.scores))
    bound = best_bound(result.scores, result.included, pairs=pairs, delta=delta, confidence=CONFIDENCE)
    most = max(positives + negatives for positives, negatives in pairs)
    bound["ceiling"] = epsilon_lower_bound(
        canaries=len(result.scores), guesses=most, correct=most, delta=delta, confidence=bound["per_pair_confidence"]
    )
    bound["above_accountant"] = bool(bound["epsilon_lower_bound"] > accountant_epsilon)
    return bound


def one_run_audit(artifact: ModelArtifact, dataset: Dataset, *, canaries: int) -> dict:
    """The whole audit of one model: its report row (see :mod:`bench.audit` for the format)."""
    manifest = artifact.manifest
    chosen = make_canaries(dataset, count=min(canaries, len(dataset.test)))
    included = draw_inclusion(len(chosen))
    result = train_and_score(artifact, dataset, canaries=chosen, included=included)
    epsilon = manifest.dp.epsilon if manifest.dp.private else math.inf
    bound = evaluate(result, delta=manifest.dp.delta, accountant_epsilon=epsilon)
    return {
        "model": manifest.name,
        "dataset": manifest.dataset,
        "accountant_epsilon": epsilon if math.isfinite(epsilon) else "inf",
        "canary_kind": chosen.kind,
        **bound,
        "run": {
            "private_size": result.dp.private_size,
            "expected_batch_size": result.dp.expected_batch_size,
            "noise_multiplier": result.dp.noise_multiplier,
            "sample_rate": result.dp.sample_rate,
            "steps": result.dp.steps,
            "seconds": round(result.seconds, 1),
        },
    }


def audit_record(row: dict, *, date: str, results_file: str) -> EmpiricalAudit:
    """The manifest's :class:`EmpiricalAudit` for one report row."""
    return EmpiricalAudit(
        method=METHOD,
        epsilon_lower_bound=row["epsilon_lower_bound"],
        confidence=row["confidence"],
        delta=row["delta"],
        canaries=row["canaries"],
        canary_kind=row["canary_kind"],
        guesses=row["guesses"],
        correct=row["correct"],
        date=date,
        results_file=results_file,
    )

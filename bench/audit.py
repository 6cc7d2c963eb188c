"""``hegate bench audit``: a membership-inference audit and a one-run privacy audit of each model.

    hegate bench audit                                   # the bundled models, 8 shadows each (~30 min)
    hegate bench audit --models mnist-cnn-eps1 mnist-cnn-epsinf --shadows 8
    hegate bench audit --repo model_repo --quick         # smoke run, too small to conclude anything
    hegate bench audit --one-run-only --models mnist-cnn-eps8   # only the empirical epsilon
    hegate bench audit --write-manifests                 # also record each bound in its manifest.json
    python -m bench.audit ...                            # the same, without the CLI

The audited set, per dataset: ``m`` members drawn from the private split, which every model
trained on in full, and ``m`` non-members from the test split, which none trained on (all of it
for the small datasets, balanced). Two attacks score each example, higher meaning "member":

* **loss** (Yeom et al. 2018): minus the cross-entropy of the int8 ONNX model, as served.
* **offline LiRA** (Carlini et al. 2022): the target's log-odds on the true class against the
  Gaussian of ``K`` shadow models' log-odds for that example. Each shadow is trained with the
  target's recipe and DP mechanism (noise multiplier, clipping, sample rate, steps; no noise for
  a non-private target), read from its manifest, with another seed, on the private split
  without the audited members, refilled from the public split: every shadow is OUT for every
  audited example. Shadows are quantized and exported through the same path as the target and
  scored with onnxruntime too.

Each attack gets its AUC with a Hanley-McNeil 95% interval and its TPR at 1% and 0.1% FPR, next
to the most that (epsilon, delta)-DP allows any attack. Per architecture, the non-private model
is compared with the most private one on both measures, with paired-bootstrap intervals on the
differences.

The **one-run audit** (:mod:`bench.one_run_audit`, after Steinke, Nasr and Jagielski 2023) turns
an attack into an epsilon: canaries inserted into one more training run with the model's own
mechanism, each with a secret coin, are guessed afterwards, and the correct guesses give an
empirical lower bound on epsilon at 95% confidence, reported beside the accountant's. A bound
above the accountant's epsilon is a failure: the report says so at its top and the command exits
with status 1. ``--write-manifests`` records each bound in the model's ``manifest.json`` (the
``audit`` field, shown by ``hegate models`` and returned by ListModels); ``model.onnx`` and its
hash do not change.

Results go to ``audit.{json,md}`` in ``--out`` (``bench/results`` by default; ``audit-quick.*``
for ``--quick``, ``audit-one-run[-quick].*`` for ``--one-run-only``). Needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.membership import (
    PER_EXAMPLE_VARIANCE_MIN_SHADOWS,
    above_dp_bound,
    cross_entropy,
    dp_auc_bound,
    dp_tpr_bound,
    evaluate_attack,
    lira_offline_scores,
    paired_bootstrap_difference,
    true_class_log_odds,
)
from bench.report import RESULTS, provenance, write
from bench.stats import roc_auc, tpr_at_fpr
from gateway.settings import BUNDLED_REPOSITORY
from models.data import Dataset, Split, load_dataset
from models.errors import HegateError, InternalError, InvalidArgumentError
from models.manifest import DPRecord
from models.onnx_runtime import create_session, predict_logits
from models.repository import ModelArtifact, ModelRepository, record_audit

if TYPE_CHECKING:  # the train extra, imported where it is used so that the CLI starts without it
    from models.recipes import Recipe

# A side: the AUC's 95% interval is about +-0.011. MNIST's shadows then train on 54,000 private and
# 1,000 public images, 93% of the target's 59,000: at its sample rate, a 7% smaller expected batch.
DEFAULT_EXAMPLES = 5000
# Estimating each example's OUT mean from K shadows adds 1/K to the LiRA score's unit variance
# (1.25 at 4, 1.125 at 8). Measured on the bundled models, 2 cores shared: 13.7 min with 4 shadows.
DEFAULT_SHADOWS = 8
QUICK_EXAMPLES = 200
QUICK_SHADOWS = 2
# One-run audit: canaries per model. The bound grows with the number of guesses at a given precision,
# if the canaries do not get in each other's way. Measured on mnist-cnn-eps8 (one run each,
# 2026-12-03): plain mislabelled digits gave 0.042 with 1,000 canaries but 0.020 with 5,000 (precision
# fell from 61% to 52-58%); marked canaries (bench.one_run_audit.make_canaries) gave 0.153 with 2,500,
# 0.243 and 0.173 in two runs with 5,000, and 0.123 with 10,000 (the whole test split).
# The 2 m delta term stays small (0.1 at MNIST's delta 1e-5, times a binomial probability near 0.001).
# Capped at the test split's size: digits 359, breast_cancer 114, whose bounds are correspondingly weak.
DEFAULT_CANARIES = 5000
QUICK_CANARIES = 200
FPRS = (0.01, 0.001)
AUDIT_SEED = 0  # draws the audited examples; shadow k of a target seeded s trains with seed s + 1 + k
ATTACKS = {"loss": "loss threshold", "lira_offline": "offline LiRA"}
COMPARISON_CONFIDENCE = 1 - 0.05 / (2 * len(ATTACKS))  # Bonferroni over the attacks and two measures each


@dataclasses.dataclass(frozen=True)
class AuditedSet:
    """Raw inputs and labels of the audited examples, members first, and where they were drawn."""

    x: np.ndarray
    y: np.ndarray
    is_member: np.ndarray
    member_indices: np.ndarray  # positions in the private split
    non_member_indices: np.ndarray  # positions in the test split

    @property
    def members(self) -> int:
        return int(self.is_member.sum())


@dataclasses.dataclass(frozen=True)
class Shadow:
    log_odds: np.ndarray
    dp: DPRecord
    non_member_accuracy: float  # on the audited non-members; its manifest's test accuracy counts refilled images
    seconds: float


def audited_set(dataset: Dataset, *, examples: int, seed: int = AUDIT_SEED) -> AuditedSet:
    """``m`` private-split members and ``m`` test-split non-members, ``m`` at most ``examples``.

    ``m`` is also capped at half the private split so that the shadows keep most of it to train on.
    """
    m = min(examples, len(dataset.test), len(dataset.private) // 2)
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(len(dataset.private), m, replace=False))
    non_members = np.sort(rng.choice(len(dataset.test), m, replace=False))
    return AuditedSet(
        x=np.concatenate([dataset.private.x[members], dataset.test.x[non_members]]),
        y=np.concatenate([dataset.private.y[members], dataset.test.y[non_members]]),
        is_member=np.repeat([True, False], m),
        member_indices=members,
        non_member_indices=non_members,
    )


def shadow_dataset(dataset: Dataset, audited: AuditedSet, *, seed: int = AUDIT_SEED) -> Dataset:
    """The shadows' private split: the target's without the audited members, refilled from the public split.

    Every audited example must be OUT for every shadow. Removing the members alone would leave
    the shadows fewer examples, hence, at the target's sample rate, smaller batches and more noise
    per example in each step than the target had; the refill makes up what it can. It comes from
    the public split, drawn from the same pool as the private one, and never from the test split's
    unaudited rest: MNIST's test digits come from other writers than its training digits, and
    shadows that had seen those writers would expect more confidence on the non-members than a
    target that never saw them, which makes the target's members stand out more than they do.
    """
    keep = np.ones(len(dataset.private), dtype=bool)
    keep[audited.member_indices] = False
    refill = np.random.default_rng([seed, 1]).choice(
        len(dataset.public), min(audited.members, len(dataset.public)), replace=False
    )
    private = Split(
        np.concatenate([dataset.private.x[keep], dataset.public.x[refill]]),
        np.concatenate([dataset.private.y[keep], dataset.public.y[refill]]),
    )
    return dataclasses.replace(dataset, private=private)


@dataclasses.dataclass(frozen=True)
class AuditData:
    """One dataset's part of the audit, shared by every model trained on it."""

    dataset: Dataset
    audited: AuditedSet
    shadow_data: Dataset  # the shadows' private split


def prepare_audit(name: str, *, examples: int) -> AuditData:
    """Load dataset ``name``, draw its audited set and build the shadows' training data."""
    dataset = load_dataset(name)
    audited = audited_set(dataset, examples=examples)
    return AuditData(dataset=dataset, audited=audited, shadow_data=shadow_dataset(dataset, audited))


def shadow_recipe(recipe: Recipe, *, sample_rate: float, private_size: int, seed: int) -> Recipe:
    """The target's recipe with another seed, at the target's Poisson sample rate.

    Opacus samples each example with rate ``1 / ceil(n / batch)``. On a private split of the
    target's size the recipe's batch size keeps that rate; otherwise the batch size is chosen
    to keep it. Either way the shadow runs the same number of steps and, for a private target,
    the accountant picks the same noise multiplier for the same (epsilon, delta).

    Raises:
        InvalidArgumentError: no batch size gives that rate (a private split under ``s (s - 1)``
            examples for ``s`` steps per epoch).
    """
    steps_per_epoch = round(1 / sample_rate)
    batch = recipe.training.batch_size
    if math.ceil(private_size / batch) != steps_per_epoch:
        batch = math.ceil(private_size / steps_per_epoch)
    if math.ceil(private_size / batch) != steps_per_epoch:
        raise InvalidArgumentError(f"no batch size samples {private_size} examples at rate 1/{steps_per_epoch}")
    training = recipe.training.model_copy(update={"batch_size": batch, "seed": seed})
    return recipe.model_copy(update={"training": training})


def check_same_mechanism(shadow: DPRecord, target: DPRecord) -> None:
    """A shadow is only a reference for the target if DP-SGD ran the same way on both.

    Raises:
        InternalError: noise multiplier, clipping bound, sample rate or steps differ.
    """
    fields = ("noise_multiplier", "max_grad_norm", "sample_rate", "steps")
    differing = [f for f in fields if not math.isclose(getattr(shadow, f), getattr(target, f), rel_tol=1e-9)]
    if differing:
        pairs = ", ".join(f"{f} {getattr(shadow, f)} vs {getattr(target, f)}" for f in differing)
        raise InternalError(f"shadow model's DP-SGD differs from the target's: {pairs}")


def int8_logits(artifact: ModelArtifact, raw: np.ndarray) -> np.ndarray:
    """Logits of the int8 ONNX model in onnxruntime, on raw inputs normalized as its manifest says."""
    session = create_session(artifact.onnx_path)
    return predict_logits(session, artifact.manifest.input.normalization.apply(raw))


def train_shadow(
    recipe: Recipe, dataset: Dataset, audited: AuditedSet, *, workdir: Path, name: str, command: str
) -> Shadow:
    """Train one shadow with DP-SGD, export it to int8 like any model, and score the audited set."""
    from models.pipeline import export_trained, train_private

    started = time.perf_counter()
    trained = train_private(recipe, dataset, progress=False)
    exported = export_trained(
        trained=trained, dataset=dataset, recipe=recipe, out=workdir, name=name, version=1, command=command
    )
    logits = int8_logits(exported.artifact, audited.x)
    non_members = ~audited.is_member
    return Shadow(
        log_odds=true_class_log_odds(logits, audited.y),
        dp=trained.dp,
        non_member_accuracy=float(np.mean(logits[non_members].argmax(axis=1) == audited.y[non_members])),
        seconds=time.perf_counter() - started,
    )


def _dp_summary(dp: DPRecord) -> dict:
    return {
        "epsilon": dp.epsilon if dp.private else "inf",
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": dp.sample_rate,
        "steps": dp.steps,
    }


@dataclasses.dataclass(frozen=True)
class ModelAudit:
    """One model's audit: the report's row, and the attack scores the comparisons resample."""

    row: dict
    scores: dict[str, np.ndarray]  # per attack, over the audited set
    is_member: np.ndarray


def audit_model(
    artifact: ModelArtifact, data: AuditData, *, shadows: int, workdir: Path, command: str, bar
) -> ModelAudit:
    """Both attacks on one model, after training its ``shadows`` reference models (``bar`` counts them).

    Raises:
        InvalidArgumentError: the model was not trained on this dataset's private split.
    """
    from models.recipes import recipe_from_manifest

    manifest, audited, shadow_data = artifact.manifest, data.audited, data.shadow_data
    if manifest.dp.private_size != len(data.dataset.private):
        raise InvalidArgumentError(
            f"{manifest.name} trained on {manifest.dp.private_size} examples, but the {data.dataset.name} private "
            f"split has {len(data.dataset.private)}: its members are not the ones audited"
        )
    recipe = recipe_from_manifest(manifest)
    trained: list[Shadow] = []
    for k in range(shadows):
        bar.set_postfix_str(f"{manifest.name} {k + 1}/{shadows}")
        seeded = shadow_recipe(
            recipe,
            sample_rate=manifest.dp.sample_rate,
            private_size=len(shadow_data.private),
            seed=recipe.training.seed + 1 + k,
        )
        shadow = train_shadow(
            seeded, shadow_data, audited, workdir=workdir, name=f"shadow-{manifest.name}-{k}", command=command
        )
        check_same_mechanism(shadow.dp, manifest.dp)
        trained.append(shadow)
        bar.update()

    logits = int8_logits(artifact, audited.x)
    per_example = shadows >= PER_EXAMPLE_VARIANCE_MIN_SHADOWS
    scores = {
        "loss": -cross_entropy(logits, audited.y),
        "lira_offline": lira_offline_scores(
            true_class_log_odds(logits, audited.y),
            np.stack([s.log_odds for s in trained]),
            per_example_variance=per_example,
        ),
    }
    correct = logits.argmax(axis=1) == audited.y
    dp = manifest.dp
    epsilon = dp.epsilon if dp.private else math.inf
    attacks = {name: evaluate_attack(s, audited.is_member, fprs=FPRS) for name, s in scores.items()}
    for attack in attacks.values():
        attack["above_dp_bound"] = above_dp_bound(attack, epsilon=epsilon, delta=dp.delta)
    row = {
        "model": manifest.name,
        "dataset": manifest.dataset,
        "architecture": recipe.architecture,
        "dp": _dp_summary(dp),
        "members": audited.members,
        "non_members": len(audited.y) - audited.members,
        "member_accuracy": float(correct[audited.is_member].mean()),
        "non_member_accuracy": float(correct[~audited.is_member].mean()),
        "dp_bound": {
            "auc": dp_auc_bound(epsilon, dp.delta),
            "tpr_at_fpr": {f"{fpr:g}": dp_tpr_bound(fpr, epsilon, dp.delta) for fpr in FPRS},
        },
        "attacks": attacks,
        "shadows": {
            "count": shadows,
            "variance": "per example" if per_example else "pooled over examples",
            "seeds": [s.dp.init_seed for s in trained],
            "private_size": trained[0].dp.private_size,
            "refilled_from_public": trained[0].dp.private_size - (len(data.dataset.private) - audited.members),
            "expected_batch_size": trained[0].dp.expected_batch_size,
            "dp": [_dp_summary(s.dp) for s in trained],
            "non_member_accuracy": [s.non_member_accuracy for s in trained],
            "seconds": [round(s.seconds, 1) for s in trained],
        },
    }
    return ModelAudit(row=row, scores=scores, is_member=audited.is_member)


def _fmt_ci(low: float, high: float, digits: int = 3) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _epsilon_text(dp: dict) -> str:
    if dp["epsilon"] == "inf":
        return "inf (no noise)"
    return f"{dp['epsilon']:.3f} (delta {dp['delta']:g})"


def _difference(first: ModelAudit, second: ModelAudit, attack: str, measure) -> dict:
    difference = paired_bootstrap_difference(
        first.scores[attack], second.scores[attack], first.is_member, measure=measure, confidence=COMPARISON_CONFIDENCE
    )
    return {**difference, "measurably_more": difference["ci"][0] > 0}


def compare(audits: list[ModelAudit]) -> list[dict]:
    """Per dataset and architecture, the non-private model against the lowest-epsilon one.

    For each attack, the AUC and the TPR at 1% FPR of the two, with paired-bootstrap intervals
    on their differences; "measurably more" means an interval lies above 0. The intervals are
    Bonferroni-adjusted so that, over every attack and both measures, a difference that is not
    there gets called measurable with probability at most 5%.
    """
    comparisons = []
    for dataset, architecture in sorted({(a.row["dataset"], a.row["architecture"]) for a in audits}):
        group = [a for a in audits if (a.row["dataset"], a.row["architecture"]) == (dataset, architecture)]
        public = next((a for a in group if a.row["dp"]["epsilon"] == "inf"), None)
        private = sorted((a for a in group if a.row["dp"]["epsilon"] != "inf"), key=lambda a: a.row["dp"]["epsilon"])
        entry: dict = {"dataset": dataset, "architecture": architecture}
        if public is None or not private:
            entry["sentence"] = (
                f"{dataset} {architecture}: no non-private and private pair was audited, nothing to compare."
            )
            comparisons.append(entry)
            continue
        entry.update(non_private=public.row["model"], private=private[0].row["model"], attacks={})
        for attack in ATTACKS:
            entry["attacks"][attack] = {
                "auc": _difference(public, private[0], attack, roc_auc),
                "tpr_at_fpr_0.01": _difference(public, private[0], attack, functools.partial(tpr_at_fpr, fpr=0.01)),
            }
        entry["sentence"] = _comparison_sentence(entry, public.row, private[0].row)
        comparisons.append(entry)
    return comparisons


def _comparison_sentence(entry: dict, public: dict, private: dict) -> str:
    parts, measurable = [], []
    for attack, label in ATTACKS.items():
        auc, tpr = entry["attacks"][attack]["auc"], entry["attacks"][attack]["tpr_at_fpr_0.01"]
        pub, priv = public["attacks"][attack], private["attacks"][attack]
        measurable += [f"{label} {what}" for what, d in (("AUC", auc), ("TPR at 1% FPR", tpr)) if d["measurably_more"]]
        parts.append(
            f"{label}: AUC {pub['auc']:.3f} vs {priv['auc']:.3f}, {auc['difference']:+.3f} "
            f"[{auc['ci'][0]:+.3f}, {auc['ci'][1]:+.3f}]; TPR at 1% FPR {pub['tpr_at_fpr']['0.01']['tpr']:.2%} vs "
            f"{priv['tpr_at_fpr']['0.01']['tpr']:.2%}, {100 * tpr['difference']:+.2f} points "
            f"[{100 * tpr['ci'][0]:+.2f}, {100 * tpr['ci'][1]:+.2f}]"
        )
    eps = _epsilon_text(private["dp"])
    if measurable:
        verdict = f"leaks measurably more than epsilon {eps}, in {', '.join(measurable)}"
    else:
        verdict = (
            f"does **not** leak measurably more than epsilon {eps} on {public['members']:,} members and "
            f"{public['non_members']:,} non-members: every difference's interval reaches 0 or below"
        )
    return (
        f"**{entry['dataset']} {entry['architecture']}**: the non-private {public['model']} {verdict}. "
        f"Non-private vs private, differences with {COMPARISON_CONFIDENCE:.2%} paired-bootstrap intervals "
        f"(95% over both attacks and both measures): {'; '.join(parts)}."
    )


def _pct_ci(ci: list[float]) -> str:
    return f"[{ci[0]:.2%}, {ci[1]:.2%}]"


def _method(settings: dict) -> str:
    return (
        "Audited per dataset: members drawn from the private split (which every model trained on in full), as many "
        f"non-members from the test split, seed {settings['audit_seed']}. Attacks: **loss threshold** (minus the "
        f"int8 model's cross-entropy) and **offline LiRA** ({settings['shadows']} shadow models per target, same "
        "recipe and DP-SGD mechanism, trained on the private split without the audited members, refilled from the "
        "public split, exported to int8; the target's log-odds on the true class against each "
        "example's Gaussian of shadow log-odds, one-sided). AUC with a "
        "Hanley-McNeil 95% interval; TPR at a fixed FPR with a Wilson 95% interval over the members (the threshold, "
        "set on the non-members, adds noise it does not count). *DP allows*: the most any attack can reach against "
        "the model's (epsilon, delta) from its accountant, TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) "
        "and the area under that curve; *within* says whether the measured intervals reach below it. Non-private "
        "against private: differences of AUC and of TPR at 1% FPR on the same audited examples, with paired "
        "bootstrap intervals (members and non-members resampled separately, 2,000 times), Bonferroni-adjusted to "
        "95% over both attacks and both measures."
    )


def _dataset_table(rows: list[dict]) -> list[str]:
    lines = [
        f"## {rows[0]['dataset']}: {rows[0]['members']:,} members, {rows[0]['non_members']:,} non-members",
        "",
        "| model | epsilon (accountant) | accuracy members / non-members | attack | AUC [95% CI] "
        "| TPR @ 1% FPR [95% CI] | TPR @ 0.1% FPR | DP allows: TPR @ 1% FPR, AUC | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        public = r["dp"]["epsilon"] == "inf"
        bound = "no bound" if public else f"{r['dp_bound']['tpr_at_fpr']['0.01']:.2%}, {r['dp_bound']['auc']:.3f}"
        for attack, label in ATTACKS.items():
            a = r["attacks"][attack]
            at1, at01 = a["tpr_at_fpr"]["0.01"], a["tpr_at_fpr"]["0.001"]
            within = (
                "-" if public else ("yes" if not a["above_dp_bound"] else f"**NO**: {', '.join(a['above_dp_bound'])}")
            )
            lines.append(
                f"| {r['model']} | {_epsilon_text(r['dp'])} | {r['member_accuracy']:.2%} / "
                f"{r['non_member_accuracy']:.2%} | {label} | {a['auc']:.3f} {_fmt_ci(*a['auc_ci'])} "
                f"| {at1['tpr']:.2%} {_pct_ci(at1['ci'])} | {at01['tpr']:.2%} | {bound} | {within} |"
            )
    return lines


def _shadow_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Shadow models",
        "",
        "| target | shadows (seeds) | trained on (public) | expected batch | noise | clip | sample rate | steps "
        "| epsilon (accountant) | accuracy on non-members (mean) | s each (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["shadows"]
        dp = s["dp"][0]
        lines.append(
            f"| {r['model']} | {s['count']} ({', '.join(map(str, s['seeds']))}) "
            f"| {s['private_size']:,} ({s['refilled_from_public']:,}) "
            f"| {s['expected_batch_size']} | {dp['noise_multiplier']:.4g} | {dp['max_grad_norm']:g} "
            f"| {dp['sample_rate']:.5f} | {dp['steps']} | {_epsilon_text(dp)} "
            f"| {np.mean(s['non_member_accuracy']):.2%} | {np.mean(s['seconds']):.1f} |"
        )
    return lines


def _one_run_method(settings: dict) -> str:
    return (
        'Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023). Per model: '
        f"up to {settings['canaries']:,} canaries (test-split examples with a wrong label, images with "
        "bright pixels where the public split is blank; fewer when the test split is smaller), each included "
        "with probability 1/2 by a coin from the OS CSPRNG that only the auditor holds; "
        "one DP-SGD run with the model's recipe and mechanism (noise multiplier, clipping, sample rate, steps; the "
        "batch size adjusted to keep the sample rate) on the private split plus the included canaries; each canary "
        "scored by the run's fp32 model's log-odds on its label minus the audited model's own (int8, as served; "
        "it never saw the coins); the k+ highest guessed in, the k- lowest out. "
        "The bound is the theorem's for (epsilon, delta)-DP at the model's delta, including its 2 m delta term, at "
        f"{settings['one_run_confidence']:.0%} confidence, Bonferroni-corrected over the "
        f"{settings['one_run_pairs']} (k+, k-) pairs fixed in advance (each tested at "
        f"{1 - (1 - settings['one_run_confidence']) / settings['one_run_pairs']:.2%}). It bounds what this attack "
        "extracts from the mechanism; it is not an estimate of the model's true epsilon."
    )


def _one_run_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | epsilon (accountant) | canaries (included) | guesses in / out | correct "
        "| empirical epsilon >= (95%) | most it could show | within | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accountant = "inf, no noise" if r["accountant_epsilon"] == "inf" else f"{r['accountant_epsilon']:.3f}"
        within = "**NO: above the accountant**" if r["above_accountant"] else "yes"
        lines.append(
            f"| {r['model']} | {accountant} (delta {r['delta']:g}) | {r['canaries']:,} ({r['included']:,}) "
            f"| {r['positives']} / {r['negatives']} | {r['correct']} | {r['epsilon_lower_bound']:.3f} "
            f"| {r['ceiling']:.2f} | {within} "
            f"| {r['run']['seconds']:.0f} |"
        )
    return lines


def _one_run_failures(rows: list[dict]) -> list[str]:
    return [r["model"] for r in rows if r["above_accountant"]]


def _one_run_section(result: dict) -> list[str]:
    rows = result["one_run"]
    lines = ["## One-run audit: an empirical epsilon beside the accountant's", "", _one_run_method(result["settings"])]
    lines += ["", *_one_run_table(rows), ""]
    lines += [
        "Every pair's count, for each model, is in the JSON (`one_run[].pairs`); the reported pair is the best "
        "of them, which the correction already pays for. *Most it could show*: the bound had every guess of the "
        "largest pair been right; where it lies below the accountant's epsilon, no attack could have made this "
        "audit fail, so its *within* says nothing there.",
        "",
    ]
    return lines


def markdown(result: dict) -> str:
    one_run_only = result["settings"]["one_run_only"]
    lines = [
        "# One-run privacy audit" if one_run_only else "# Membership-inference audit",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}; {result['seconds'] / 60:.1f} min, "
        f"load average {result['load_average_at_start'][0]} at start, {result['load_average_at_end'][0]} at end.",
        "",
    ]
    failures = _one_run_failures(result["one_run"])
    if failures:
        lines += [
            f"**FAILURE: the one-run audit's lower bound exceeds the accountant's epsilon for {', '.join(failures)}**: "
            "with 95% confidence the training code leaks more than its privacy proof allows (or the audit is "
            "broken). See the one-run table below.",
            "",
        ]
    if result["settings"]["quick"]:
        lines += ["**Quick run**: too few examples, shadows and canaries to conclude anything.", ""]
    if one_run_only:
        return "\n".join([*lines, *_one_run_section(result)])
    lines += [_method(result["settings"]), ""]
    for dataset in sorted({r["dataset"] for r in result["models"]}):
        lines += [*_dataset_table([r for r in result["models"] if r["dataset"] == dataset]), ""]
    lines += ["## Non-private against the most private model", ""]
    for comparison in result["comparisons"]:
        lines += [comparison["sentence"], ""]
    below = [r["model"] for r in result["models"] if r["attacks"]["loss"]["auc_ci"][1] < 0.5]
    if below:
        lines += [
            f"The loss attack scores below chance on {', '.join(below)}: their members have a higher loss than their "
            "non-members on average. A global threshold has no per-example calibration, so any difference in "
            "difficulty between the private and the test split moves it either way; LiRA compares each example with "
            "itself under the shadows and is not moved by it.",
            "",
        ]
    lines += _shadow_table(result["models"])
    lines += ["", *_one_run_section(result)]
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    """The command as typed: ``python -m bench.audit ...`` from :func:`main`, else ``hegate bench audit ...``."""
    return getattr(args, "invocation", None) or shlex.join(["hegate", *args.argv])


def _output_name(args: argparse.Namespace) -> str:
    return ("audit-one-run" if args.one_run_only else "audit") + ("-quick" if args.quick else "")


def run(args: argparse.Namespace) -> int:
    """Both audits (or only the one-run audit); exit status 1 if a one-run bound exceeds its accountant's epsilon.

    Raises:
        InvalidArgumentError: ``--write-manifests`` with ``--quick``.
    """
    if args.write_manifests and args.quick:
        raise InvalidArgumentError("--write-manifests records a full audit; a --quick run is too small to record")
    tqdm, logging_redirect_tqdm = _require_training()
    from bench import one_run_audit

    shadows = args.shadows or (QUICK_SHADOWS if args.quick else DEFAULT_SHADOWS)
    examples = args.examples or (QUICK_EXAMPLES if args.quick else DEFAULT_EXAMPLES)
    canaries = args.canaries or (QUICK_CANARIES if args.quick else DEFAULT_CANARIES)
    repository = ModelRepository(args.repo)
    artifacts = [repository.get(name) for name in args.models] if args.models else repository.artifacts()
    result: dict = {
        **provenance("bench.audit"),
        "command": _command(args),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "settings": {
            "repo": str(args.repo),
            "shadows": shadows,
            "examples": examples,
            "quick": args.quick,
            "one_run_only": args.one_run_only,
            "audit_seed": AUDIT_SEED,
            "fprs": list(FPRS),
            "canaries": canaries,
            "one_run_confidence": one_run_audit.CONFIDENCE,
            "one_run_pairs": len(one_run_audit.audit_pairs(canaries)),
        },
    }
    started = time.perf_counter()
    datasets: dict[str, Dataset] = {}
    if not args.one_run_only:
        prepared: dict[str, AuditData] = {}
        audits: list[ModelAudit] = []
        with (
            tempfile.TemporaryDirectory(prefix="hegate-audit-") as workdir,
            tqdm(total=len(artifacts) * shadows, desc="shadow models", unit="model") as bar,
            logging_redirect_tqdm(),
        ):
            for artifact in artifacts:
                name = artifact.manifest.dp.dataset
                if name not in prepared:
                    prepared[name] = prepare_audit(name, examples=examples)
                    datasets[name] = prepared[name].dataset
                audit = audit_model(
                    artifact, prepared[name], shadows=shadows, workdir=Path(workdir), command=result["command"], bar=bar
                )
                audits.append(audit)
                bar.write(
                    f"{audit.row['model']}: "
                    + ", ".join(
                        f"{ATTACKS[a]} AUC {v['auc']:.3f}, TPR@1%FPR {v['tpr_at_fpr']['0.01']['tpr']:.2%}"
                        for a, v in audit.row["attacks"].items()
                    )
                )
        print("comparing non-private and private models (paired bootstrap)...", file=sys.stderr, flush=True)
        result["models"] = [a.row for a in audits]
        result["comparisons"] = compare(audits)
    rows = []
    with tqdm(total=len(artifacts), desc="one-run audits", unit="model") as bar, logging_redirect_tqdm():
        for artifact in artifacts:
            name = artifact.manifest.dp.dataset
            if name not in datasets:
                datasets[name] = load_dataset(name)
            bar.set_postfix_str(artifact.manifest.name)
            row = one_run_audit.one_run_audit(artifact, datasets[name], canaries=canaries)
            rows.append(row)
            bar.update()
            bar.write(
                f"{row['model']}: empirical epsilon >= {row['epsilon_lower_bound']:.3f} "
                f"(accountant {row['accountant_epsilon']}), {row['correct']}/{row['guesses']} correct guesses"
            )
    result["one_run"] = rows
    failures = _one_run_failures(rows)
    result["one_run_failures"] = failures
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    output = _output_name(args)
    write(output, result, markdown(result), directory=args.out)
    if args.write_manifests:
        for artifact, row in zip(artifacts, rows, strict=True):
            record = one_run_audit.audit_record(row, date=result["date"], results_file=f"{output}.json")
            record_audit(artifact, record)
    if failures:
        print(
            f"bench.audit: FAILURE: one-run lower bound above the accountant's epsilon for {', '.join(failures)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _require_training():
    """tqdm and its logging redirect, after checking that the ``train`` extra (torch, opacus) is
    there to train shadows: one clear message up front rather than an ImportError mid-run.

    Raises:
        MissingExtraError: naming the install command.
    """
    from models.extras import require_train_extra

    require_train_extra("torch")
    require_train_extra("opacus")
    return require_train_extra("tqdm").tqdm, require_train_extra("tqdm.contrib.logging").logging_redirect_tqdm


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=BUNDLED_REPOSITORY, help="model repository (default: bundled)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where audit.{json,md} go (default: bench/results)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="audit only these models (default: all)")
    parser.add_argument(
        "--shadows", type=_at_least(2), help=f"shadow models per target for LiRA (default {DEFAULT_SHADOWS})"
    )
    parser.add_argument(
        "--examples",
        type=_at_least(10),
        help=f"audited members, and as many non-members, per dataset (default {DEFAULT_EXAMPLES}; "
        "fewer when the test split is smaller)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_SHADOWS} shadows, {QUICK_EXAMPLES} examples a side, {QUICK_CANARIES} canaries; "
        "writes audit-quick.*",
    )
    parser.add_argument(
        "--one-run-only",
        action="store_true",
        help="only the one-run audit (no membership attacks, no shadows); writes audit-one-run.*",
    )
    parser.add_argument(
        "--canaries",
        type=_at_least(10),
        help=f"one-run audit: canaries per model (default {DEFAULT_CANARIES:,}, {QUICK_CANARIES} with --quick; "
        "at most the test split's size)",
    )
    parser.add_argument(
        "--write-manifests",
        action="store_true",
        help="record each model's one-run bound in its manifest.json (the model file does not change)",
    )
    parser.set_defaults(handler=run)


def add_parser(commands) -> None:
    audit = commands.add_parser(
        "audit",
        help="membership-inference audit (loss, offline LiRA) and one-run empirical epsilon of each model; "
        "needs 'train'",
    )
    _add_arguments(audit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.invocation = shlex.join(["python", "-m", "bench.audit", *argv])
    try:
        return args.handler(args)
    except HegateError as exc:
        print(f"bench.audit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

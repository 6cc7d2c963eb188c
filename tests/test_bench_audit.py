"""The membership-inference audit: its arithmetic on known cases, its data plumbing, and a quick end-to-end run."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

from bench.membership import (
    above_dp_bound,
    auc_standard_error,
    cross_entropy,
    dp_auc_bound,
    dp_tpr_bound,
    evaluate_attack,
    lira_offline_scores,
    paired_bootstrap_difference,
    true_class_log_odds,
)
from bench.stats import roc_auc, tpr_at_fpr
from models.errors import InternalError, InvalidArgumentError

FPRS = (0.01, 0.001)


def test_log_odds_and_loss_stay_finite_where_the_softmax_rounds_to_one():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0], [40.0, 0.0, 0.0]])
    labels = np.array([0, 2, 0])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p_true = p[np.arange(3), labels]
    phi = true_class_log_odds(logits, labels)
    np.testing.assert_allclose(phi[:2], np.log(p_true[:2] / (1 - p_true[:2])), rtol=1e-12)
    assert phi[2] == pytest.approx(40 - math.log(2))  # where 1 - p_true is exactly 0 in float64
    loss = cross_entropy(logits, labels)
    np.testing.assert_allclose(loss[:2], -np.log(p_true[:2]), rtol=1e-12)
    assert -np.log(p_true[2]) == 0.0 and loss[2] == pytest.approx(2 * math.exp(-40), rel=1e-9)
    with pytest.raises(ValueError):
        true_class_log_odds(logits[0], labels)


def test_a_perfectly_separating_score_gives_auc_1_and_full_tpr():
    is_member = np.repeat([True, False], 500)
    result = evaluate_attack(np.r_[np.arange(500) + 1000.0, np.arange(500)], is_member, fprs=FPRS)
    assert result["auc"] == 1.0 and result["auc_ci"][1] == 1.0
    assert result["tpr_at_fpr"]["0.01"]["tpr"] == 1.0 and result["tpr_at_fpr"]["0.001"]["tpr"] == 1.0
    assert result["tpr_at_fpr"]["0.01"]["false_positives_allowed"] == 5
    reversed_ = evaluate_attack(np.r_[np.arange(500), np.arange(500) + 1000.0], is_member, fprs=FPRS)
    assert reversed_["auc"] == 0.0 and reversed_["tpr_at_fpr"]["0.01"]["tpr"] == 0.0


def test_auc_interval_is_the_exact_null_standard_error_at_one_half():
    n1, n2 = 1000, 700
    assert auc_standard_error(0.5, n1, n2) == pytest.approx(math.sqrt((n1 + n2 + 1) / (12 * n1 * n2)))
    assert auc_standard_error(1.0, n1, n2) == 0.0
    assert auc_standard_error(0.7, 100, 100) > auc_standard_error(0.7, 1000, 1000)
    rng = np.random.default_rng(1)
    result = evaluate_attack(rng.normal(size=2000), np.repeat([True, False], 1000), fprs=FPRS)
    low, high = result["auc_ci"]
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.0129, rel=0.02)


def test_lira_scores_a_hand_made_case_exactly():
    shadows = np.array([[0.0, 1.0], [2.0, 3.0]])  # means 1 and 2; pooled variance (1+1+1+1)/(4-2) = 2
    target = np.array([1 + math.sqrt(2), 2.0])
    np.testing.assert_allclose(lira_offline_scores(target, shadows, per_example_variance=False), [1.0, 0.0])
    np.testing.assert_allclose(lira_offline_scores(target, shadows, per_example_variance=True), [1.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        lira_offline_scores(target, shadows[:1], per_example_variance=False)


def test_lira_finds_members_that_a_global_threshold_misses():
    """Examples differ in difficulty far more than membership moves them: per-example calibration wins."""
    rng = np.random.default_rng(0)
    n, k = 2000, 8
    difficulty = rng.normal(0, 4, size=n)  # each example's mean log-odds under OUT models
    is_member = np.arange(n) < n // 2
    shadows = difficulty + rng.normal(size=(k, n))
    target = difficulty + rng.normal(size=n) + 1.5 * is_member
    lira = roc_auc(lira_offline_scores(target, shadows, per_example_variance=False), is_member)
    assert lira > 0.8 and lira > roc_auc(target, is_member) + 0.2
    # a member's and a non-member's score differ by N(1.5, 2 (1 + 1/k)): AUC = Phi(1.5 / sqrt(2 (1 + 1/k)))
    expected = 0.5 * math.erfc(-1.5 / math.sqrt(2 * (1 + 1 / k)) / math.sqrt(2))
    assert lira == pytest.approx(expected, abs=0.03)
    null_target = difficulty + rng.normal(size=n)
    assert abs(roc_auc(lira_offline_scores(null_target, shadows, per_example_variance=True), is_member) - 0.5) < 0.05


def test_dp_bounds():
    assert dp_tpr_bound(0.01, 1.0, 0.0) == pytest.approx(math.e * 0.01)
    assert dp_tpr_bound(0.5, 1.0, 0.0) == pytest.approx(1 - 0.5 / math.e)  # the other constraint binds
    assert dp_tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert dp_tpr_bound(0.01, math.inf, 1e-5) == 1.0
    for epsilon in (0.1, 1.0, 3.0):
        assert dp_auc_bound(epsilon, 0.0) == pytest.approx(math.exp(epsilon) / (1 + math.exp(epsilon)), abs=1e-8)
    assert dp_auc_bound(1.0, 1e-5) > dp_auc_bound(1.0, 0.0)
    assert dp_auc_bound(math.inf, 1e-5) == 1.0


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(2)
    is_member = np.repeat([True, False], 1000)
    noise = rng.normal(size=2000)
    same = paired_bootstrap_difference(noise, noise, is_member, measure=roc_auc, resamples=200)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]  # paired: identical models never differ
    leaky = noise + 0.5 * is_member
    diff = paired_bootstrap_difference(leaky, noise, is_member, measure=roc_auc, resamples=200)
    assert diff["difference"] == pytest.approx(roc_auc(leaky, is_member) - roc_auc(noise, is_member))
    assert 0 < diff["ci"][0] < diff["difference"] < diff["ci"][1]
    other = rng.normal(size=2000)  # another model, equally blind
    null = paired_bootstrap_difference(other, noise, is_member, measure=roc_auc, resamples=200)
    assert null["ci"][0] < 0 < null["ci"][1]
    at_1pct = paired_bootstrap_difference(
        leaky, noise, is_member, measure=lambda s, m: tpr_at_fpr(s, m, 0.01), resamples=200
    )
    assert at_1pct["ci"][0] <= at_1pct["difference"] <= at_1pct["ci"][1]


def test_the_dp_bound_check():
    leaky = {"auc_ci": [0.80, 0.90], "tpr_at_fpr": {"0.01": {"ci": [0.05, 0.10]}, "0.001": {"ci": [0.0, 0.01]}}}
    assert above_dp_bound(leaky, epsilon=1.0, delta=1e-5) == ["AUC", "TPR at 1.0% FPR"]
    assert above_dp_bound(leaky, epsilon=8.0, delta=1e-5) == []
    assert above_dp_bound(leaky, epsilon=math.inf, delta=1e-5) == []


@pytest.fixture(scope="module")
def breast_cancer():
    from models.data import load_dataset

    return load_dataset("breast_cancer")


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


@pytest.mark.parametrize("examples", [50, 1000])
def test_shadows_never_see_an_audited_or_test_example(breast_cancer, examples):
    from bench.audit import audited_set, shadow_dataset

    audited = audited_set(breast_cancer, examples=examples)
    m = min(examples, len(breast_cancer.test))
    assert audited.members == m and len(audited.y) == 2 * m
    assert _rows(audited.x[:m]) <= _rows(breast_cancer.private.x)
    assert _rows(audited.x[m:]) <= _rows(breast_cancer.test.x)
    shadow = shadow_dataset(breast_cancer, audited).private
    assert not _rows(shadow.x) & _rows(audited.x)
    assert len(shadow) == len(breast_cancer.private) - m + min(m, len(breast_cancer.public))
    assert not _rows(shadow.x) & _rows(breast_cancer.test.x)  # the unaudited rest of the test split neither


def test_shadow_recipe_keeps_the_sample_rate():
    from bench.audit import shadow_recipe
    from models.recipes import recipe_for

    recipe = recipe_for("mnist", "cnn", epsilon=1.0)
    same = shadow_recipe(recipe, sample_rate=1 / 58, private_size=59000, seed=3)
    assert same.training.batch_size == 1024 and same.training.seed == 3
    smaller = shadow_recipe(recipe, sample_rate=1 / 58, private_size=54000, seed=3)
    assert math.ceil(54000 / smaller.training.batch_size) == 58
    assert smaller.training.model_copy(update={"batch_size": 1024, "seed": 0}) == recipe.training
    with pytest.raises(InvalidArgumentError, match="no batch size"):
        shadow_recipe(recipe, sample_rate=1 / 58, private_size=100, seed=3)


def test_a_shadow_with_another_mechanism_is_refused():
    from bench.audit import check_same_mechanism
    from gateway.settings import BUNDLED_REPOSITORY
    from models.repository import ModelRepository

    record = ModelRepository(BUNDLED_REPOSITORY).get("mnist-cnn-eps1").manifest.dp
    check_same_mechanism(record.model_copy(update={"seed": 5, "private_size": 1000}), record)
    with pytest.raises(InternalError, match="noise_multiplier"):
        check_same_mechanism(record.model_copy(update={"noise_multiplier": 3.0}), record)


def test_recipe_from_manifest_rebuilds_the_bundled_recipes():
    from gateway.settings import BUNDLED_REPOSITORY
    from models.recipes import recipe_from_manifest
    from models.repository import ModelRepository

    repository = ModelRepository(BUNDLED_REPOSITORY)
    baseline = recipe_from_manifest(repository.get("mnist-cnn-epsinf").manifest)
    # the recorded command: --epsilon inf --max-grad-norm 1 --lr 2 --delta 1e-5
    assert (baseline.architecture, baseline.training.max_grad_norm, baseline.training.learning_rate) == ("cnn", 1, 2)
    assert math.isinf(baseline.training.epsilon) and baseline.training.delta == 1e-5
    manifest = repository.get("mnist-mlp-eps1").manifest
    assert recipe_from_manifest(manifest).training.epochs == manifest.dp.epochs == 20
    changed = manifest.training.model_copy(update={"architecture": "mlp {'hidden': 64}"})
    with pytest.raises(InvalidArgumentError, match="recipe now builds"):
        recipe_from_manifest(manifest.model_copy(update={"training": changed}))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A digits MLP at epsilon 1 and without noise, two epochs each (about a second)."""
    from models.pipeline import train_model
    from models.recipes import recipe_for

    root = tmp_path_factory.mktemp("audit-repo")
    for epsilon in (1.0, math.inf):
        train_model(
            recipe=recipe_for("digits", "mlp", epsilon=epsilon, epochs=2), out=root, command="test", progress=False
        )
    return root


def test_quick_audit_end_to_end(tiny_repo, digits, tmp_path, capsys):
    from gateway.cli import main
    from models.repository import ModelRepository

    assert main(["bench", "audit", "--repo", str(tiny_repo), "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "audit-quick.json").read_text())
    markdown = (tmp_path / "audit-quick.md").read_text()
    assert result["command"] == f"hegate bench audit --repo {tiny_repo} --quick --out {tmp_path}"
    assert {"date", "machine", "seconds"} <= result.keys()
    assert result["settings"]["shadows"] == 2 and result["settings"]["quick"]
    assert [r["model"] for r in result["models"]] == ["digits-mlp-eps1", "digits-mlp-epsinf"]
    repository = ModelRepository(tiny_repo)
    for row in result["models"]:
        target = repository.get(row["model"]).manifest.dp
        assert row["members"] == row["non_members"] == 200
        assert row["dp"]["delta"] == target.delta
        assert row["dp"]["epsilon"] == (target.epsilon if target.private else "inf")
        for attack in ("loss", "lira_offline"):
            a = row["attacks"][attack]
            assert 0.3 < a["auc"] < 0.7  # two epochs of an MLP on 1,258 digits memorize little
            assert a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1]
            for fpr in ("0.01", "0.001"):
                tpr = a["tpr_at_fpr"][fpr]
                assert 0.0 <= tpr["ci"][0] <= tpr["tpr"] <= tpr["ci"][1] <= 1.0
        shadows = row["shadows"]
        assert shadows["count"] == 2 and shadows["seeds"] == [target.init_seed + 1, target.init_seed + 2]
        refill = min(200, len(digits.public))
        assert (
            shadows["refilled_from_public"] == refill and shadows["private_size"] == target.private_size - 200 + refill
        )
        for shadow in shadows["dp"]:  # the same DP-SGD mechanism as the target
            assert shadow["noise_multiplier"] == target.noise_multiplier
            assert (shadow["sample_rate"], shadow["steps"]) == (target.sample_rate, target.steps)
    private = result["models"][0]
    epsilon, delta = private["dp"]["epsilon"], private["dp"]["delta"]
    assert private["dp_bound"]["tpr_at_fpr"]["0.01"] == pytest.approx(math.exp(epsilon) * 0.01 + delta)
    assert result["models"][1]["dp_bound"]["auc"] == 1.0
    [comparison] = result["comparisons"]
    assert (comparison["non_private"], comparison["private"]) == ("digits-mlp-epsinf", "digits-mlp-eps1")
    assert set(comparison["attacks"]) == {"loss", "lira_offline"}
    for measures in comparison["attacks"].values():
        for difference in measures.values():  # AUC and TPR at 1% FPR
            low, high = difference["ci"]
            assert low <= difference["difference"] <= high and difference["measurably_more"] == (low > 0)
    assert f"measurably more than epsilon {epsilon:.3f} (delta {delta:g})" in comparison["sentence"]
    assert f"| digits-mlp-eps1 | {epsilon:.3f} (delta {delta:g}) |" in markdown and "**Quick run**" in markdown
    assert "# Membership-inference audit" in capsys.readouterr().out


def test_without_the_train_extra_the_audit_says_what_to_install(monkeypatch, capsys, tmp_path):
    from bench import audit
    from gateway.cli import main

    real = importlib.import_module

    def without_torch(name, *args):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real(name, *args)

    monkeypatch.setattr("models.extras.importlib.import_module", without_torch)
    assert main(["bench", "audit", "--quick", "--out", str(tmp_path)]) == 2
    assert "pip install 'hegate[train]'" in capsys.readouterr().err
    assert audit.main(["--quick", "--out", str(tmp_path)]) == 2  # python -m bench.audit
    assert capsys.readouterr().err.startswith("bench.audit: error: 'torch' is not installed")
    assert not list(tmp_path.iterdir())


# -- the one-run audit ------------------------------------------------------------------------


def test_quick_one_run_audit_end_to_end(tiny_repo, digits, tmp_path, capsys):
    """Digits models, 200 canaries (the quick setting), one run each: a finite bound, below the accountant's."""
    from bench.one_run import epsilon_lower_bound
    from gateway.cli import main

    assert main(["bench", "audit", "--repo", str(tiny_repo), "--quick", "--one-run-only", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "audit-one-run-quick.json").read_text())
    markdown = (tmp_path / "audit-one-run-quick.md").read_text()
    assert "models" not in result and result["settings"]["one_run_only"] and result["one_run_failures"] == []
    assert not (tmp_path / "audit-quick.json").exists()
    private, public = result["one_run"]
    assert (private["model"], public["model"]) == ("digits-mlp-eps1", "digits-mlp-epsinf")
    for row in result["one_run"]:
        assert row["canaries"] == 200 and 60 < row["included"] < 140
        assert row["confidence"] == 0.95 and row["per_pair_confidence"] == pytest.approx(1 - 0.05 / 5)
        assert len(row["pairs"]) == 5 and row["correct"] <= row["guesses"] <= row["canaries"]
        assert row["run"]["private_size"] == len(digits.private) + row["included"]
        assert math.isfinite(row["epsilon_lower_bound"]) and 0 <= row["epsilon_lower_bound"] <= row["ceiling"]
        assert row["ceiling"] == epsilon_lower_bound(
            canaries=200, guesses=200, correct=200, delta=row["delta"], confidence=1 - 0.05 / 5
        )
    assert 0 <= private["epsilon_lower_bound"] < private["accountant_epsilon"] <= 1.0
    assert not private["above_accountant"] and public["accountant_epsilon"] == "inf"
    assert "# One-run privacy audit" in markdown and "FAILURE" not in markdown
    assert f"| digits-mlp-eps1 | {private['accountant_epsilon']:.3f} (delta {private['delta']:g}) | 200 (" in markdown
    assert "empirical epsilon >=" in capsys.readouterr().out


def test_a_non_private_model_leaks_to_the_one_run_audit(digits, tmp_path):
    """Without noise, mislabelled canaries are learnt: the audit must find a clearly positive epsilon,
    or it could not detect anything."""
    from bench.one_run_audit import one_run_audit
    from models.pipeline import train_model
    from models.recipes import recipe_for

    # 100 epochs at a high learning rate, so that the MLP learns its mislabelled canaries (a few seconds);
    # five runs gave 1.07-1.84. Were the canaries not trained on, the bound would be 0 in 95% of runs.
    recipe = recipe_for("digits", "mlp", epsilon=math.inf, epochs=100, learning_rate=0.5)
    artifact = train_model(recipe=recipe, out=tmp_path, command="test", progress=False).artifact
    row = one_run_audit(artifact, digits, canaries=1000)  # capped at the test split's 359
    assert row["canaries"] == len(digits.test) == 359
    assert row["epsilon_lower_bound"] > 0.5, row
    assert not row["above_accountant"]  # nothing is above infinity


def test_a_bound_above_the_accountant_fails_loudly(tiny_repo, tmp_path, monkeypatch, capsys):
    """A fake run whose scores give every coin away: the bound exceeds epsilon 1 and the benchmark fails."""
    from bench import audit, one_run_audit
    from gateway.cli import main

    def leaking(artifact, dataset, *, canaries, included):
        scores = included.astype(float)
        return one_run_audit.OneRunResult(scores=scores, included=included, seconds=0.0, dp=artifact.manifest.dp)

    monkeypatch.setattr(one_run_audit, "train_and_score", leaking)
    # exactly half the coins up: with the scores giving every coin away, every guess of every
    # pair is then right (with random coins, a side can hold more guesses than canaries of its kind)
    monkeypatch.setattr(one_run_audit, "draw_inclusion", lambda count: np.arange(count) % 2 == 0)
    argv = ["--repo", str(tiny_repo), "--quick", "--one-run-only", "--out", str(tmp_path)]
    assert main(["bench", "audit", *argv]) == 1
    result = json.loads((tmp_path / "audit-one-run-quick.json").read_text())
    assert result["one_run_failures"] == ["digits-mlp-eps1"]  # the non-private one has no epsilon to exceed
    private = result["one_run"][0]
    assert private["above_accountant"] and private["epsilon_lower_bound"] > 2
    assert private["correct"] == private["guesses"] >= 100  # a perfect score: no guess is wrong
    markdown = (tmp_path / "audit-one-run-quick.md").read_text()
    assert markdown.count("**FAILURE") == 1 and "for digits-mlp-eps1**" in markdown
    assert "**NO: above the accountant**" in markdown
    assert "FAILURE: one-run lower bound above the accountant's epsilon for digits-mlp-eps1" in capsys.readouterr().err
    assert audit.main(argv) == 1  # python -m bench.audit


def test_the_bound_is_recorded_in_the_manifest_and_listed(tiny_repo, tmp_path, capsys):
    """--write-manifests puts the bound in manifest.json (model.onnx untouched); hegate models shows it."""
    import shutil

    from gateway.cli import main
    from models.manifest import Manifest
    from models.repository import ModelRepository

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    before = {a.manifest.name: a.manifest for a in ModelRepository(repo).artifacts()}
    assert all(m.audit is None for m in before.values())
    argv = ["bench", "audit", "--repo", str(repo), "--one-run-only", "--write-manifests", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "audit-one-run.json").read_text())["one_run"]}
    for artifact in ModelRepository(repo).artifacts():  # loading re-checks every hash
        manifest, row = artifact.manifest, rows[artifact.manifest.name]
        assert manifest.files == before[manifest.name].files and manifest.dp == before[manifest.name].dp
        audit = manifest.audit
        assert (audit.epsilon_lower_bound, audit.confidence, audit.delta) == (
            row["epsilon_lower_bound"],
            0.95,
            manifest.dp.delta,
        )
        assert (audit.canaries, audit.guesses, audit.correct) == (row["canaries"], row["guesses"], row["correct"])
        assert "arXiv:2305.08846" in audit.method and audit.results_file == "audit-one-run.json"
        assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest
    capsys.readouterr()
    assert main(["models", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-2:] == ["audited", "epsilon"]
    for line in out[1:]:
        name = line.split()[0]
        assert line.endswith(f">={rows[name]['epsilon_lower_bound']:.2f} (95%)")
    assert main([*argv, "--quick"]) == 2  # refused before anything trains
    assert "a --quick run is too small to record" in capsys.readouterr().err

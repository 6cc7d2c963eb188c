from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from services import free_port

from gateway.cli import main
from models.manifest import MANIFEST_FILE


def test_train_writes_an_artifact_with_its_exact_command(tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "breast_cancer",
        "--arch",
        "mlp",
        "--epsilon",
        "3",
        "--epochs",
        "3",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "breast-cancer-mlp-eps3" / "1" / MANIFEST_FILE).read_text())
    assert manifest["training"]["command"] == "hegate " + " ".join(argv)
    assert manifest["dp"]["delta"] == 1e-4
    out = capsys.readouterr().out
    assert "breast-cancer-mlp-eps3" in out and "wrote" in out


def test_replayable_noise_is_trained_only_on_request_and_listed_as_not_private(tmp_path, capsys):
    """--replayable-noise is the one way to a private-epsilon model whose noise replays; its manifest
    records the seed, and the listing shows epsilon none instead of the accountant's figure."""
    common = ["train", "--dataset", "breast_cancer", "--arch", "linear", "--epsilon", "3", "--epochs", "2", "--quiet"]
    assert main([*common, "--out", str(tmp_path), "--seed", "5", "--replayable-noise"]) == 0
    assert main([*common, "--out", str(tmp_path), "--name", "secure"]) == 0
    replayable = json.loads((tmp_path / "breast-cancer-linear-eps3" / "1" / MANIFEST_FILE).read_text())["dp"]
    secure = json.loads((tmp_path / "secure" / "1" / MANIFEST_FILE).read_text())["dp"]
    assert (replayable["secure_rng"], replayable["replay_seed"], replayable["init_seed"]) == (False, 5, 5)
    assert (secure["secure_rng"], secure["replay_seed"]) == (True, None)
    capsys.readouterr()
    assert main(["models", "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["breast-cancer-linear-eps3"][2] == "none"
    assert float(rows["secure"][2]) <= 3.0
    assert out.splitlines()[-1].startswith("epsilon none:") and "not a DP model" in out


def test_models_lists_a_repository(trained_repo, capsys):
    assert main(["models", "--repo", str(trained_repo)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["model", "ver", "epsilon", "delta"]
    assert [line.split()[0] for line in out[1:]] == ["digits-cnn-eps3", "digits-mlp-eps3"]


def test_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["models", "--repo", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hegate models: error: model repository") and err.count("\n") == 1


def test_unknown_recipe_is_a_clear_error(tmp_path, capsys):
    argv = ["train", "--dataset", "breast_cancer", "--arch", "cnn", "--epsilon", "3", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "no recipe for dataset 'breast_cancer' with architecture 'cnn'" in capsys.readouterr().err


def test_missing_train_extra_names_the_install_command(tmp_path):
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from gateway.cli import main\n"
        "sys.exit(main(['train', '--dataset', 'digits', '--arch', 'mlp', '--epsilon', '3',"
        f" '--out', {str(tmp_path)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install 'hegate[train]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_model_name_is_refused_before_training(tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "mnist",
        "--arch",
        "cnn",
        "--epsilon",
        "3",
        "--name",
        "My Model",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "model name 'My Model' must be lower-case" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_demo_answers_on_both_paths_and_stops_its_gateway():
    """``make demo``: a gateway of its own, a plaintext answer from the fast path, an encrypted one."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.demo"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("plaintext (fast path): label 7") for line in lines)
    assert any(line.startswith("encrypted: label 7") for line in lines)
    assert lines[-1] == "gateway stopped (exit code 0)"


def _serve_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``hegate serve`` expecting it to stop at start: return its stderr, checked to be one line."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("HEGATE_")}
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--address", "127.0.0.1:0", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment,
    )
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:99999/0", "redis://***@127.0.0.1:99999/0"),
        ("http://:hunter2@127.0.0.1:6379/0", "must be 'memory' or redis://"),
        ("redis://:hunter2@127.0.0.1:6379/db0", "the database must be an integer"),
    ],
)
def test_serve_refuses_a_malformed_key_store_url_in_one_line(url, shown):
    for env, args in (({}, ("--key-store", url)), ({"HEGATE_KEY_STORE": url}, ())):
        stderr = _serve_fails(*args, env=env)
        assert stderr.startswith("hegate serve: error: invalid gateway settings: key_store:")
        assert shown in stderr and "hunter2" not in stderr


def test_serve_stops_at_start_when_its_redis_cannot_be_reached():
    url = f"redis://127.0.0.1:{free_port()}/0"
    stderr = _serve_fails("--key-store", url.replace("//", "//:hunter2@"))
    assert stderr.startswith(f"hegate serve: error: key store {url} unavailable: ") and "hunter2" not in stderr

"""The repository refuses every missing, corrupt or mismatching file, naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from models.errors import ModelArtifactError, NotFoundError
from models.manifest import MANIFEST_FILE, MODEL_FILE
from models.repository import ModelRepository, file_record, load_artifact


@pytest.fixture
def repo(trained_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(trained_repo, copy)
    return copy


def _version_dir(repo: Path, name: str = "digits-cnn-eps3") -> Path:
    return repo / name / "1"


def test_repository_lists_and_gets_models(repo):
    repository = ModelRepository(repo)
    assert repository.names() == ["digits-cnn-eps3", "digits-mlp-eps3"]
    artifact = repository.get("digits-cnn-eps3")
    assert artifact.manifest.version == 1 and artifact.onnx_path.is_file()
    assert artifact.manifest.dp.epsilon <= 3.05
    assert artifact.manifest.multiplicative_depth == 4


def test_unknown_model_and_version_are_not_found(repo):
    repository = ModelRepository(repo)
    with pytest.raises(NotFoundError, match="'nope' is not in"):
        repository.get("nope")
    with pytest.raises(NotFoundError, match="no version 7"):
        repository.get("digits-cnn-eps3", 7)
    with pytest.raises(NotFoundError, match="does not exist"):
        ModelRepository(repo / "missing")


def test_missing_manifest_is_refused(repo):
    (_version_dir(repo) / MANIFEST_FILE).unlink()
    with pytest.raises(ModelArtifactError, match=rf"{MANIFEST_FILE}: manifest missing"):
        ModelRepository(repo)


def test_missing_model_file_is_refused(repo):
    (_version_dir(repo) / MODEL_FILE).unlink()
    with pytest.raises(ModelArtifactError, match=rf"{MODEL_FILE}: file listed in the manifest is missing"):
        load_artifact(_version_dir(repo))


def test_corrupt_manifest_json_is_refused(repo):
    (_version_dir(repo) / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelArtifactError, match="invalid manifest"):
        load_artifact(_version_dir(repo))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("dp", "delta"), 2.0, "dp.delta"),
        (("schema_version",), 99, "schema_version"),
        (("multiplicative_depth",), 9, "multiplicative_depth must equal"),
        (("input", "normalization", "std"), [0.0], "std values must be positive"),
        (("files",), {}, "files must list model.onnx"),
    ],
)
def test_manifest_schema_violations_are_refused(repo, path, value, message):
    manifest_path = _version_dir(repo) / MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ModelArtifactError, match=message):
        load_artifact(_version_dir(repo))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda dp: dp.update(replay_seed=0), "dp.replay_seed"),  # claims secure noise, carries its seed
        (lambda dp: dp.update(seed=0), "dp.seed"),  # schema 1's replay seed
        (lambda dp: dp.pop("secure_rng"), "dp.secure_rng"),  # no record of how the noise was drawn
        (lambda dp: dp.pop("rng"), "dp.rng"),
        (lambda dp: dp.update(secure_rng=False), "dp.replay_seed"),  # replayable, but the seed withheld
    ],
)
def test_a_private_manifest_that_can_replay_its_noise_or_hides_how_is_refused(repo, edit, field):
    """Refused at load, naming the file and the field: an epsilon a published seed can replay is
    not delivered, and one whose randomness is not recorded cannot be checked."""
    manifest_path = _version_dir(repo) / MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    assert data["dp"]["secure_rng"] is True and data["dp"]["replay_seed"] is None
    edit(data["dp"])
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ModelArtifactError, match=rf"{manifest_path}: invalid manifest: .*{field}"):
        load_artifact(_version_dir(repo))


def test_tampered_model_file_is_refused(repo):
    path = _version_dir(repo) / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match=r"sha256 .* does not match"):
        load_artifact(_version_dir(repo))


def test_truncated_model_file_is_refused(repo):
    path = _version_dir(repo) / MODEL_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelArtifactError, match="size 100 bytes"):
        load_artifact(_version_dir(repo))


def test_model_file_that_does_not_match_its_manifest_is_refused(repo):
    """A valid ONNX file with the right hash but another input name: the graph check catches it."""
    directory = _version_dir(repo)
    model = onnx.load(str(directory / MODEL_FILE))
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == "input" else name for name in node.input]
    onnx.save(model, str(directory / MODEL_FILE))
    manifest = json.loads((directory / MANIFEST_FILE).read_text())

    manifest["files"][MODEL_FILE] = json.loads(file_record(directory / MODEL_FILE).model_dump_json())
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelArtifactError, match="do not include 'input'"):
        load_artifact(directory)


def test_misplaced_artifact_is_refused(repo):
    shutil.move(repo / "digits-cnn-eps3" / "1", repo / "digits-cnn-eps3" / "2")
    with pytest.raises(ModelArtifactError, match="lies in digits-cnn-eps3/2"):
        ModelRepository(repo)

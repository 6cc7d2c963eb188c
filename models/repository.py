"""The model repository: ``<root>/<model>/<version>/{model.onnx, manifest.json}``, as in Triton.

Loading validates everything before anything is served: the manifest against its schema, every
listed file against its size and SHA-256, and the ONNX graph's input and output against the
manifest. A problem raises :class:`ModelArtifactError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from pydantic import ValidationError

from models.errors import ModelArtifactError, NotFoundError
from models.manifest import MANIFEST_FILE, MODEL_FILE, EmpiricalAudit, FileRecord, Manifest


@dataclass(frozen=True)
class ModelArtifact:
    """A validated model: its manifest and the path of its int8 ONNX file."""

    manifest: Manifest
    directory: Path

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def model_bytes(self) -> int:
        return self.manifest.files[MODEL_FILE].bytes


def file_record(path: Path) -> FileRecord:
    data = path.read_bytes()
    return FileRecord(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _read_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise ModelArtifactError(f"{path}: manifest missing")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        raise ModelArtifactError(f"{path}: invalid manifest: {problems}") from None


def _check_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ModelArtifactError(f"{path}: file listed in the manifest is missing")
        actual = file_record(path)
        if actual.bytes != expected.bytes:
            raise ModelArtifactError(f"{path}: size {actual.bytes} bytes, manifest says {expected.bytes}")
        if actual.sha256 != expected.sha256:
            raise ModelArtifactError(f"{path}: sha256 {actual.sha256} does not match the manifest's {expected.sha256}")


def _check_graph(path: Path, manifest: Manifest) -> None:
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises several unrelated types for a corrupt protobuf
        raise ModelArtifactError(f"{path}: not a loadable ONNX model ({exc})") from None
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name for o in graph.output}
    expected_shape = ["batch", *manifest.input.shape]
    if inputs.get(manifest.input.name) != expected_shape:
        raise ModelArtifactError(
            f"{path}: graph inputs {inputs} do not include {manifest.input.name!r} with shape {expected_shape}"
        )
    if manifest.output.name not in outputs:
        raise ModelArtifactError(f"{path}: graph outputs {sorted(outputs)} do not include {manifest.output.name!r}")


def load_artifact(directory: Path) -> ModelArtifact:
    """Load and fully validate the artifact in ``<repo>/<model>/<version>``.

    Raises:
        ModelArtifactError: missing, corrupt or mismatching manifest or model file.
    """
    manifest = _read_manifest(directory / MANIFEST_FILE)
    if manifest.name != directory.parent.name or str(manifest.version) != directory.name:
        raise ModelArtifactError(
            f"{directory / MANIFEST_FILE}: names model {manifest.name!r} version {manifest.version}, "
            f"but lies in {directory.parent.name}/{directory.name}"
        )
    _check_files(directory, manifest)
    _check_graph(directory / MODEL_FILE, manifest)
    return ModelArtifact(manifest=manifest, directory=directory)


def write_artifact(root: Path, fields: dict[str, Any], model: onnx.ModelProto) -> ModelArtifact:
    """Write ``model.onnx``, then ``manifest.json`` from ``fields`` plus the file hashes, and load both back."""
    directory = root / fields["name"] / str(fields["version"])
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / MODEL_FILE))
    _write_manifest(directory, Manifest(**fields, files={MODEL_FILE: file_record(directory / MODEL_FILE)}))
    return load_artifact(directory)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    payload = json.loads(manifest.model_dump_json())
    (directory / MANIFEST_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def record_audit(artifact: ModelArtifact, audit: EmpiricalAudit) -> ModelArtifact:
    """Write ``audit`` into the artifact's ``manifest.json`` (replacing any earlier one) and load it back.

    Only the manifest changes: ``files`` hashes ``model.onnx`` alone, so the model and its hash stay
    as they were, and a server or client that validates the artifact accepts it as before.

    Raises:
        ModelArtifactError: the artifact no longer validates after the write.
    """
    _write_manifest(artifact.directory, artifact.manifest.model_copy(update={"audit": audit}))
    return load_artifact(artifact.directory)


class ModelRepository:
    """All artifacts under one root directory, each validated when the repository is opened."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise NotFoundError(f"model repository {root} does not exist")
        self.root = root
        self._artifacts: dict[str, dict[int, ModelArtifact]] = {}
        for version_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
            artifact = load_artifact(version_dir)
            self._artifacts.setdefault(artifact.manifest.name, {})[artifact.manifest.version] = artifact

    def names(self) -> list[str]:
        return sorted(self._artifacts)

    def artifacts(self) -> list[ModelArtifact]:
        return [self._artifacts[name][v] for name in self.names() for v in sorted(self._artifacts[name])]

    def get(self, name: str, version: int | None = None) -> ModelArtifact:
        """The named model at ``version``, or its latest version.

        Raises:
            NotFoundError: unknown model or version.
        """
        versions = self._artifacts.get(name)
        if not versions:
            raise NotFoundError(f"model {name!r} is not in {self.root}; available: {self.names()}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise NotFoundError(f"model {name!r} has no version {version}; available: {sorted(versions)}")
        return versions[version]

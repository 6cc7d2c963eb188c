"""The wire contract: generated code is fresh, and the Open Inference Protocol matches tritonclient's.

tritonclient's generated ``inference`` messages and ours cannot share one process: both register
the same message names in protobuf's default descriptor pool, and the second import fails with
"duplicate symbol". So tritonclient's descriptor is read from the serialized bytes in its
``service_pb2.py`` source, never imported.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "gateway" / "api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
OIP_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")

FileProto = descriptor_pb2.FileDescriptorProto
MessageProto = descriptor_pb2.DescriptorProto


def _load_generator() -> ModuleType:
    """protos/generate.py as a module (protos/ is a directory of sources, not a package)."""
    spec = importlib.util.spec_from_file_location("hegate_protos_generate", REPO / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name.endswith(GENERATED_SUFFIXES)}


# -- (a) staleness -----------------------------------------------------------------------------


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    fresh = _generated_files(tmp_path)
    committed = _generated_files(API_DIR)
    assert sorted(p.name for p in written) == sorted(fresh)
    assert sorted(committed) == sorted(fresh), "run `python protos/generate.py`: gateway/api has other files"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run `python protos/generate.py`: {stale} differ from the .proto files"


def test_generation_is_deterministic_and_leaves_other_files_alone(tmp_path: Path) -> None:
    generator = _load_generator()
    (tmp_path / "__init__.py").write_text('"""hand-written"""\n')
    (tmp_path / "old_pb2.py").write_text("# from a proto that no longer exists\n")
    generator.generate(tmp_path)
    first = _generated_files(tmp_path)
    generator.generate(tmp_path)
    assert _generated_files(tmp_path) == first
    assert "old_pb2.py" not in first
    assert (tmp_path / "__init__.py").read_text() == '"""hand-written"""\n'


def test_grpc_modules_import_their_messages_through_the_package() -> None:
    for name in ("grpc_predict_v2_pb2_grpc.py", "hegate_v1_pb2_grpc.py"):
        text = (API_DIR / name).read_text()
        message_module = name.removesuffix("_grpc.py")
        assert f"from gateway.api import {message_module} as " in text
        assert f"\nimport {message_module}" not in text


# -- (b) the Open Inference Protocol matches tritonclient --------------------------------------


def _serialized_file(source: Path) -> bytes:
    """The bytes passed to ``AddSerializedFile(...)`` in a protoc-generated ``*_pb2.py``."""
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            value = ast.literal_eval(node.args[0])
            assert isinstance(value, bytes)
            return value
    raise AssertionError(f"{source} has no AddSerializedFile call")


@pytest.fixture(scope="module")
def triton() -> FileProto:
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (dev extra)")
    source = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "service_pb2.py"
    return FileProto.FromString(_serialized_file(source))


@pytest.fixture(scope="module")
def ours() -> FileProto:
    from gateway.api import grpc_predict_v2_pb2

    proto = FileProto()
    grpc_predict_v2_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def _messages(file: FileProto) -> dict[str, MessageProto]:
    """Every message of a file, nested ones included, by fully qualified name ('.inference.X.Y')."""
    found: dict[str, MessageProto] = {}

    def visit(message: MessageProto, scope: str) -> None:
        name = f"{scope}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            visit(nested, name)

    for message in file.message_type:
        visit(message, f".{file.package}")
    return found


def _used_messages(file: FileProto) -> set[str]:
    """The messages the six Open Inference Protocol rpcs reach, following field types."""
    messages = _messages(file)
    (service,) = [s for s in file.service if s.name == "GRPCInferenceService"]
    todo = [t for m in service.method if m.name in OIP_METHODS for t in (m.input_type, m.output_type)]
    used: set[str] = set()
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        todo.extend(f.type_name for f in messages[name].field if f.type_name in messages)
    return used


def _shape(message: MessageProto) -> dict[str, tuple[object, ...]]:
    """What a message looks like on the wire and to generated code: per field, its number and types."""
    oneofs = [o.name for o in message.oneof_decl]
    return {
        f.name: (f.number, f.type, f.label, f.type_name, oneofs[f.oneof_index] if f.HasField("oneof_index") else None)
        for f in message.field
    } | {"<map_entry>": (message.options.map_entry,)}


# hegate's one addition to the protocol's messages: the model's privacy record in ModelMetadata.
# Stock clients skip unknown fields (tests/test_gateway.py reads ModelMetadata with tritonclient).
EXTENSIONS = {".inference.ModelMetadataResponse": {"parameters"}}
EXTENSION_MESSAGES = {".inference.ModelMetadataResponse.ParametersEntry"}


def test_every_message_matches_tritonclient(ours: FileProto, triton: FileProto) -> None:
    """Every field tritonclient knows is ours to the number and type; the only extra fields are
    the listed extensions, on numbers tritonclient's message does not use."""
    assert ours.package == triton.package == "inference"
    used = _used_messages(ours)
    assert {".inference.ModelInferRequest.InferInputTensor", ".inference.InferParameter"} <= used
    assert used >= EXTENSION_MESSAGES
    assert _used_messages(triton) >= used - EXTENSION_MESSAGES
    theirs, mine = _messages(triton), _messages(ours)
    for name in sorted(used - EXTENSION_MESSAGES):
        extra = EXTENSIONS.get(name, set())
        shape = {field: value for field, value in _shape(mine[name]).items() if field not in extra}
        assert shape == _shape(theirs[name]), name
        taken = {f.number for f in theirs[name].field}
        assert all(f.number not in taken for f in mine[name].field if f.name in extra), name
        assert extra <= {f.name for f in mine[name].field}, name
    assert set(mine) == used, "grpc_predict_v2.proto defines messages no rpc uses"


def test_service_matches_tritonclient(ours: FileProto, triton: FileProto) -> None:
    (mine,) = ours.service
    (theirs,) = triton.service
    assert f"{ours.package}.{mine.name}" == f"{triton.package}.{theirs.name}" == "inference.GRPCInferenceService"
    assert [m.name for m in mine.method] == list(OIP_METHODS)
    by_name = {m.name: m for m in theirs.method}
    for method in mine.method:
        other = by_name[method.name]
        assert (method.input_type, method.output_type) == (other.input_type, other.output_type)
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)


# -- hegate.v1: numbers are forever ------------------------------------------------------------

HEGATE_V1_FIELDS = {
    "ModelSummary": {"name": 1, "version": 2, "manifest_json": 3, "encrypted": 4, "lanes": 5},
    "ListModelsResponse": {"models": 1},
    "GetEncryptionSpecRequest": {"model_name": 1, "model_version": 2},
    "GetEncryptionSpecResponse": {"model_name": 1, "model_version": 2, "spec_json": 3, "plan_version": 4},
    "KeysHeader": {
        "model_name": 1,
        "model_version": 2,
        "format": 3,
        "relin_keys_bytes": 4,
        "galois_keys_bytes": 5,
        "total_bytes": 6,
    },
    "RegisterKeysChunk": {"header": 1, "data": 2},
    "RegisterKeysResponse": {"key_id": 1, "stored_bytes": 2, "ttl_seconds": 3},
    "DeleteKeysRequest": {"key_id": 1},
    "DeleteKeysResponse": {"deleted": 1},
    "ServerTimings": {"queue_ms": 1, "compute_ms": 2, "total_ms": 3},
    "InferRequest": {"model_name": 1, "model_version": 2, "key_id": 3, "ciphertext": 4, "count": 5, "id": 6},
    "InferResponse": {"model_name": 1, "model_version": 2, "id": 3, "ciphertext": 4, "count": 5, "timings": 6},
}


def test_hegate_v1_keeps_every_published_field_number() -> None:
    """Fields may be added to hegate.v1, but a published name keeps its number (else: hegate.v2)."""
    from gateway.api import hegate_v1_pb2

    file = hegate_v1_pb2.DESCRIPTOR
    assert file.package == "hegate.v1"
    for message, fields in HEGATE_V1_FIELDS.items():
        descriptor = file.message_types_by_name[message]
        assert {name: descriptor.fields_by_name[name].number for name in fields} == fields, message
    assert [v.name for v in file.enum_types_by_name["KeyFormat"].values] == [
        "KEY_FORMAT_UNSPECIFIED",
        "KEY_FORMAT_SEAL",
        "KEY_FORMAT_TENSEAL_CONTEXT",
    ]
    service = file.services_by_name["EncryptedInference"]
    assert service.full_name == "hegate.v1.EncryptedInference"
    register = service.methods_by_name["RegisterKeys"]
    assert (register.client_streaming, register.server_streaming) == (True, False)
    assert {m.name for m in service.methods} >= {
        "ListModels",
        "GetEncryptionSpec",
        "RegisterKeys",
        "DeleteKeys",
        "Infer",
    }


# -- (c) the generated modules import ----------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "attribute"),
    [
        ("gateway.api.grpc_predict_v2_pb2", "ModelInferRequest"),
        ("gateway.api.grpc_predict_v2_pb2_grpc", "add_GRPCInferenceServiceServicer_to_server"),
        ("gateway.api.hegate_v1_pb2", "RegisterKeysChunk"),
        ("gateway.api.hegate_v1_pb2_grpc", "EncryptedInferenceStub"),
    ],
)
def test_generated_modules_import(module: str, attribute: str) -> None:
    assert hasattr(importlib.import_module(module), attribute)


def test_messages_round_trip_through_bytes() -> None:
    from gateway.api import grpc_predict_v2_pb2 as oip
    from gateway.api import hegate_v1_pb2 as v1

    request = oip.ModelInferRequest(model_name="mnist", id="1", raw_input_contents=[b"\x00\x01"])
    request.inputs.add(name="input", datatype="UINT8", shape=[1, 2])
    request.parameters["priority"].int64_param = 3
    assert oip.ModelInferRequest.FromString(request.SerializeToString()) == request

    chunk = v1.RegisterKeysChunk(header=v1.KeysHeader(model_name="mnist", format=v1.KEY_FORMAT_SEAL, total_bytes=9))
    decoded = v1.RegisterKeysChunk.FromString(chunk.SerializeToString())
    assert decoded.WhichOneof("part") == "header"
    assert decoded.header.format == v1.KEY_FORMAT_SEAL

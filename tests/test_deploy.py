"""The Dockerfile and the Kubernetes manifests (deploy/k8s), checked without a cluster.

Kubernetes resources are validated against the API's own OpenAPI schemas (strict: unknown fields
fail), as carried offline by the ``kubernetes-validate`` package, for the oldest and newest
Kubernetes versions named below. The KServe InferenceService is a custom resource that package
does not know: its predictor's containers and volumes (a core PodSpec inlined by KServe) are
validated as a Pod's; its KServe fields (minReplicas, scaleMetric, ...) and every annotation,
ingress-nginx's included, are checked by the assertions here only, not by any schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.api import hegate_v1_pb2
from gateway.client.protocol import KEY_ID_HEADER
from gateway.settings import GatewaySettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # gRPC probes are GA from 1.27
ENCRYPTED_SERVICE = hegate_v1_pb2.DESCRIPTOR.services_by_name["EncryptedInference"].full_name


# -- Dockerfile -------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    return instructions[starts[-1] :]


def test_the_image_runs_as_a_user_and_installs_no_torch():
    instructions = _instructions(ROOT / "Dockerfile")
    assert sum(name == "FROM" for name, _ in instructions) >= 2  # multi-stage: no build context in the image
    final = _final_stage(instructions)
    users = [args for name, args in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    installs = [args for name, args in instructions if name == "RUN" and "pip install" in args]
    assert installs and all("[" not in args.split("pip install", 1)[1].split("&&")[0] for args in installs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "torch" not in core and "opacus" not in core  # the core install, as `make serve`
    for name, args in instructions:
        if name == "COPY" and "--from" not in args:
            assert all((ROOT / source).exists() for source in args.split()[:-1]), args
    entrypoint = json.loads(next(args for name, args in final if name == "ENTRYPOINT"))
    assert entrypoint[:2] == ["hegate", "serve"] and entrypoint[entrypoint.index("--address") + 1] == "0.0.0.0:8001"
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_the_images_healthcheck_asks_the_grpc_health_service():
    """The HEALTHCHECK command, run here against a health server on a free port: 0 while it
    serves, 1 once it does not."""
    final = _final_stage(_instructions(ROOT / "Dockerfile"))
    healthcheck = next(args for name, args in final if name == "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"] and "127.0.0.1:8001" in command[2]
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        script = command[2].replace("127.0.0.1:8001", f"127.0.0.1:{port}")
        run = lambda: subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)  # noqa: E731
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run().returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run().returncode == 1
    finally:
        server.stop(None)


def _container_engine() -> tuple[str | None, str]:
    """An engine that answers (docker or podman), or None and why not."""
    reasons = []
    for engine in ("docker", "podman"):
        path = shutil.which(engine)
        if path is None:
            reasons.append(f"no {engine}")
            continue
        info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60, check=False)
        if info.returncode == 0:
            return path, ""
        last = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        reasons.append(f"{engine} info failed: {last}")
    return None, "; ".join(reasons)


def test_the_image_builds_and_has_no_torch():
    engine, why = _container_engine()
    if engine is None:
        pytest.skip(f"no usable container engine ({why})")
    tag = "hegate:test"
    build = subprocess.run([engine, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-4000:]
    probe = "import importlib.util as u, os; print(os.getuid(), u.find_spec('torch') is None)"
    run = subprocess.run(
        [engine, "run", "--rm", "--entrypoint", "python", tag, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.split() == ["10001", "True"], run.stderr


# -- Kubernetes -------------------------------------------------------------------------------


def _documents() -> dict[str, list[dict]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def _find(kind: str, name: str) -> dict:
    for docs in _documents().values():
        for doc in docs:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise KeyError(f"{kind}/{name}")


def _known(doc: dict) -> bool:
    return not doc["apiVersion"].startswith("serving.kserve.io/")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    checked = 0
    for name, docs in _documents().items():
        for doc in filter(_known, docs):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked += 1
    kinds = {doc["kind"] for docs in _documents().values() for doc in docs}
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet", "ConfigMap", "Secret", "Ingress"}
    assert expected <= kinds and checked >= 12


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kserve_predictor_is_a_valid_pod_spec(version):
    service = _find("InferenceService", "hegate-plaintext")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = service["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": {"containers": predictor["containers"], "volumes": predictor["volumes"]},
    }
    kubernetes_validate.validate(pod, version, strict=True)
    (container,) = predictor["containers"]
    (port,) = container["ports"]
    assert port["name"] == "h2c" and container["readinessProbe"]["grpc"]["port"] == port["containerPort"]
    config = _find("ConfigMap", predictor["volumes"][0]["configMap"]["name"])["data"]["hegate.toml"]
    assert tomllib.loads(config)["fast_path_port"] == port["containerPort"]  # the plaintext Open Inference Protocol


def _load_toml(text: str, tmp_path: Path) -> GatewaySettings:
    path = tmp_path / "hegate.toml"
    path.write_text(text)
    return load_settings(config_file=path)


def test_the_kserve_settings_load(tmp_path):
    config = _find("ConfigMap", "hegate-kserve-config")["data"]["hegate.toml"]
    assert _load_toml(config, tmp_path).fast_path_port == 8003


def test_the_gateways_settings_load_with_the_api_keys_from_their_secret(tmp_path, monkeypatch):
    """The ConfigMap's TOML loads with the gateway's own loader (a renamed field fails here), and
    the API keys Secret's variable gives the gateway its key table."""
    text = _find("ConfigMap", "hegate-config")["data"]["hegate.toml"]
    table = tomllib.loads(text)
    redis = _find("Service", "hegate-redis")
    assert table["key_store"] == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    for name, value in _find("Secret", "hegate-api-keys")["stringData"].items():
        monkeypatch.setenv(name, value)
    settings = _load_toml(text, tmp_path)
    assert settings.api_keys == {"replace-with-a-long-random-key": "tenant-a"}
    assert settings.key_store.get_secret_value() == table["key_store"]


def test_ports_probes_and_selectors_agree():
    deployment = _find("Deployment", "hegate-gateway")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    settings = tomllib.loads(_find("ConfigMap", "hegate-config")["data"]["hegate.toml"])
    assert ports == {"grpc": 8001, "metrics": settings["metrics_port"], "fast-path": settings["fast_path_port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # grpc.health.v1 is served on 8001
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    for name in ("hegate-gateway", "hegate-encrypted"):
        service = _find("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        assert all(port["targetPort"] in ports for port in service["spec"]["ports"])
    target = _find("HorizontalPodAutoscaler", "hegate-gateway")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "hegate-gateway")
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert settings["grace_seconds"] < grace
    keys = container["envFrom"][0]["secretRef"]["name"]
    assert list(_find("Secret", keys)["stringData"]) == ["HEGATE_API_KEYS"]


def test_encrypted_calls_are_hashed_on_the_sdks_key_id_header():
    ingress = _find("Ingress", "hegate-encrypted")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_" + KEY_ID_HEADER.replace("-", "_")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == f"/{ENCRYPTED_SERVICE}" and path["backend"]["service"]["name"] == "hegate-encrypted"
    assert ingress["spec"]["tls"][0]["secretName"] == "hegate-tls"
    assert _find("Secret", "hegate-tls")["type"] == "kubernetes.io/tls"
    for name in ("hegate-grpc", "hegate-fast-path"):  # round robin: no hash
        assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in _find("Ingress", name)["metadata"]["annotations"]


def test_redis_never_evicts_and_persists():
    redis = _find("StatefulSet", "hegate-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert args["--maxmemory-policy"] == "noeviction" and args["--appendonly"] == "yes"
    assert container["volumeMounts"][0]["mountPath"] == args["--dir"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == container["volumeMounts"][0]["name"]


def test_the_kustomization_lists_every_manifest_but_the_kserve_example():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    manifests = {name for name, docs in _documents().items() if all(map(_known, docs))}
    assert sorted(listed) == sorted(manifests) and os.path.exists(K8S / "kserve-inferenceservice.yaml")

"""Gateway settings: defaults < config file < HEGATE_* environment < flags, and clear refusals."""

from __future__ import annotations

import typing

import pytest

from gateway.settings import BUNDLED_REPOSITORY, load_settings
from models.errors import InvalidArgumentError


def test_defaults_serve_the_bundled_models_on_loopback_without_auth(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("HEGATE_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.repository == BUNDLED_REPOSITORY and settings.address == "127.0.0.1:8001"
    assert not settings.authenticated and settings.tls is None and settings.workers >= 1
    assert (settings.metrics_port, settings.fast_path_port) == (8002, 8003)


def test_file_then_environment_then_flags(tmp_path, monkeypatch):
    config = tmp_path / "hegate.toml"
    config.write_text('workers = 3\nqueue_limit = 5\n[api_keys]\nsecret = "alice"\n')
    assert load_settings(config_file=config).workers == 3
    monkeypatch.setenv("HEGATE_WORKERS", "4")
    settings = load_settings(config_file=config)
    assert (settings.workers, settings.queue_limit, settings.api_keys) == (4, 5, {"secret": "alice"})
    assert load_settings(config_file=config, workers=7, queue_limit=None).workers == 7  # None: flag not given


def test_nested_tls_settings_come_from_the_environment(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    monkeypatch.setenv("HEGATE_TLS__CERT_FILE", str(cert))
    monkeypatch.setenv("HEGATE_TLS__KEY_FILE", str(key))
    assert load_settings().tls.cert_file == cert


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "workers: Input should be greater than or equal to 1"),
        ({"address": "8001"}, "address must be host:port"),
        ({"fast_path_port": 70000}, "fast_path_port: Input should be less than or equal to 65535"),
        ({"repository": "/nonexistent"}, "is not a directory"),
        ({"api_keys": {"": "alice"}}, "non-empty keys"),
        ({"tls": {"cert_file": "/nope.pem", "key_file": "/nope.pem"}}, "does not exist"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        load_settings(**overrides)


def test_a_broken_config_file_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_settings(config_file=tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("workers = = 3")
    with pytest.raises(InvalidArgumentError, match=r"broken\.toml"):
        load_settings(config_file=broken)


def test_the_plaintext_backends_and_ckks_profiles_offered_are_the_ones_that_exist():
    """The settings name them without importing numba or TenSEAL (so they load light): keep them equal."""
    from gateway.he.params import PRECISIONS
    from gateway.settings import GatewaySettings
    from kernels.loader import Backend

    fields = GatewaySettings.model_fields
    assert typing.get_args(fields["plaintext_backend"].annotation) == typing.get_args(Backend)
    assert set(typing.get_args(fields["ckks_precision"].annotation)) == set(PRECISIONS)
    settings = load_settings(plaintext_backend="onnxruntime", ckks_precision="high")
    assert (settings.plaintext_backend, settings.ckks_precision) == ("onnxruntime", "high")
    with pytest.raises(InvalidArgumentError, match="ckks_precision"):
        load_settings(ckks_precision="ultra")


def test_edge_limits_from_the_environment_and_their_order(monkeypatch):
    monkeypatch.setenv("HEGATE_LIMITS__MAX_PEER_CONNECTIONS", "8")
    settings = load_settings()
    assert settings.limits.max_peer_connections == 8 and settings.limits.max_connections == 1024
    with pytest.raises(InvalidArgumentError, match="peer_buffer_bytes"):
        load_settings(limits={"connection_buffer_bytes": 64 << 20, "peer_buffer_bytes": 32 << 20})
    with pytest.raises(InvalidArgumentError, match="one whole message"):
        load_settings(max_message_bytes=30 << 20)  # more than a connection may hold
    with pytest.raises(InvalidArgumentError, match="white space"):
        load_settings(api_keys={" padded ": "alice"})


def test_the_readme_documents_every_edge_limit():
    from pathlib import Path

    from gateway.settings import EdgeLimits

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in EdgeLimits.model_fields:
        assert f"| `limits.{name}` |" in readme, name


def test_key_tier_settings_build_the_stores_limits_and_the_upload_spools():
    settings = load_settings(
        key_budget_bytes=64 << 20, tenant_key_bytes=128 << 20, tenant_key_sets=3, key_ttl_seconds=90.0
    )
    limits = settings.key_limits
    assert (limits.budget_bytes, limits.tenant_bytes, limits.tenant_key_sets, limits.ttl_seconds) == (
        64 << 20,
        64 << 20,  # a tenant quota above the budget is the budget
        3,
        90.0,
    )
    uploads = load_settings(upload_max_bytes=8 << 20, tenant_upload_limit=1, upload_idle_seconds=2.5).upload_limits
    assert (uploads.max_bytes, uploads.tenant_uploads, uploads.idle_seconds) == (8 << 20, 1, 2.5)
    with pytest.raises(InvalidArgumentError, match="tenant_queue_limit: Input should be greater than or equal to 1"):
        load_settings(tenant_queue_limit=0)


def test_the_key_store_comes_from_file_environment_or_flag_and_stays_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("HEGATE_KEY_STORE", raising=False)
    assert load_settings().key_store.get_secret_value() == "memory"
    config = tmp_path / "hegate.toml"
    config.write_text('key_store = "redis://:hunter2@10.0.0.5:6390/1"\n')
    settings = load_settings(config_file=config)
    assert settings.key_store.get_secret_value() == "redis://:hunter2@10.0.0.5:6390/1"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    monkeypatch.setenv("HEGATE_KEY_STORE", "redis://cache:6379/2")
    assert load_settings(config_file=config).key_store.get_secret_value() == "redis://cache:6379/2"
    assert load_settings(config_file=config, key_store="memory").key_store.get_secret_value() == "memory"


def test_a_malformed_key_store_is_refused_without_its_password():
    with pytest.raises(InvalidArgumentError, match=r"key_store: .*port must be 1-65535") as caught:
        load_settings(key_store="redis://:hunter2@cache:0/0")
    assert "hunter2" not in str(caught.value)
